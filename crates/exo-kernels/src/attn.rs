//! Attention of one query head over cached keys and values, with the instruction set chosen at
//! run time like the matrix kernels.
//!
//! The portable code is the reference; the SIMD paths (x86 on 8 or 16 lanes, NEON on 4) use
//! fused multiply-adds and keep an output row in registers, and agree with it to rounding.

use crate::{Error, Isa, Result};

/// One head of scaled dot-product attention for one query:
/// `out = softmax(scale * q . keys[j]) . values[j]` over `j < visible`.
///
/// Key and value `j` are `keys[j * stride..][..q.len()]` and `values[j * stride..][..q.len()]`
/// (the caches of several heads may be interleaved). `scores` is scratch of at least `visible`
/// values. With `visible == 0`, `out` is zero.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    visible: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    attend_with(
        Isa::detected(),
        q,
        keys,
        values,
        stride,
        visible,
        scale,
        scores,
        out,
    )
}

/// [`attend`] on a chosen instruction-set path (falls back to scalar if the CPU lacks it).
#[allow(clippy::too_many_arguments)]
pub fn attend_with(
    isa: Isa,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    visible: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) -> Result<()> {
    let hd = q.len();
    let check = |what, expected: usize, actual: usize| {
        if actual < expected {
            Err(Error::Shape {
                what,
                expected,
                actual,
            })
        } else {
            Ok(())
        }
    };
    if out.len() != hd {
        return Err(Error::Shape {
            what: "attention output",
            expected: hd,
            actual: out.len(),
        });
    }
    if visible == 0 {
        out.fill(0.0);
        return Ok(());
    }
    let span = (visible - 1) * stride + hd;
    check("attention keys", span, keys.len())?;
    check("attention values", span, values.len())?;
    check("attention scores", visible, scores.len())?;
    let scores = &mut scores[..visible];
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if isa.is_supported() => {
            // SAFETY: the CPU supports the path's features (checked just above).
            unsafe { attend_avx512(q, keys, values, stride, scale, scores, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.is_supported() => {
            // SAFETY: as above.
            unsafe { attend_avx2(q, keys, values, stride, scale, scores, out) }
        }
        #[cfg(target_arch = "aarch64")]
        Isa::Neon if isa.is_supported() => {
            // SAFETY: as above.
            unsafe { attend_neon(q, keys, values, stride, scale, scores, out) }
        }
        _ => attend_body(q, keys, values, stride, scale, scores, out),
    }
    Ok(())
}

/// Writes a SIMD path of [`attend`] with the intrinsics of `std::arch::$arch`: one fused
/// multiply-add chain of `$lanes`-wide vectors per key, and the output row accumulated in
/// registers four vectors at a time. `$fma(a, b, c)` is `a * b + c`. Head sizes that are not a
/// multiple of `$lanes` take the portable code, compiled for the path's features.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! simd_attend {
    ($(#[$doc:meta])* $name:ident, $arch:ident, $features:literal, $lanes:literal, $zero:path,
     $load:path, $store:path, $fma:path, $splat:path, $sum:path) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        #[allow(unsafe_op_in_unsafe_fn)]
        unsafe fn $name(
            q: &[f32],
            keys: &[f32],
            values: &[f32],
            stride: usize,
            scale: f32,
            scores: &mut [f32],
            out: &mut [f32],
        ) {
            use std::arch::$arch::*;
            const L: usize = $lanes;
            let hd = q.len();
            if !hd.is_multiple_of(L) {
                return attend_body(q, keys, values, stride, scale, scores, out);
            }
            let nv = hd / L;
            let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
            // SAFETY (every pointer below): `attend_with` checked that keys and values hold
            // `(visible - 1) * stride + hd` values and that `scores` holds `visible`.
            for (j, s) in scores.iter_mut().enumerate() {
                let k = kp.add(j * stride);
                let mut acc = $zero();
                for c in 0..nv {
                    acc = $fma($load(qp.add(L * c)), $load(k.add(L * c)), acc);
                }
                *s = $sum(acc) * scale;
            }
            let inv = 1.0 / softmax_weights(scores);
            let mut c = 0;
            while c < nv {
                let width = (nv - c).min(4);
                let mut acc = [$zero(); 4];
                for (j, p) in scores.iter().enumerate() {
                    let w = $splat(p * inv);
                    let v = vp.add(j * stride + L * c);
                    if width == 4 {
                        for (i, a) in acc.iter_mut().enumerate() {
                            *a = $fma(w, $load(v.add(L * i)), *a);
                        }
                    } else {
                        for (i, a) in acc.iter_mut().enumerate().take(width) {
                            *a = $fma(w, $load(v.add(L * i)), *a);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(width) {
                    $store(out.as_mut_ptr().add(L * (c + i)), *a);
                }
                c += width;
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_attend!(
    /// AVX-512: 16 lanes.
    attend_avx512, x86_64, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma", 16, _mm512_setzero_ps,
    _mm512_loadu_ps, _mm512_storeu_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_reduce_add_ps
);

#[cfg(target_arch = "x86_64")]
simd_attend!(
    /// AVX2 + FMA: 8 lanes.
    attend_avx2, x86_64, "avx2,fma", 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_storeu_ps,
    _mm256_fmadd_ps, _mm256_set1_ps, crate::x86::hsum256
);

#[cfg(target_arch = "aarch64")]
simd_attend!(
    /// NEON: 4 lanes.
    attend_neon, aarch64, "neon", 4, crate::neon::zero, vld1q_f32, vst1q_f32, crate::neon::fmadd,
    vdupq_n_f32, vaddvq_f32
);

/// The arithmetic of [`attend`] in portable Rust (the scalar path, and the fallback of the SIMD
/// paths for odd head sizes); shapes already checked, `scores.len()` is the visible count.
#[inline(always)]
fn attend_body(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    for (j, s) in scores.iter_mut().enumerate() {
        *s = dot(q, &keys[j * stride..][..hd]) * scale;
    }
    let inv = 1.0 / softmax_weights(scores);
    out.fill(0.0);
    for (j, p) in scores.iter().enumerate() {
        let w = p * inv;
        let value = &values[j * stride..][..hd];
        out.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
    }
}

/// Replaces each score by `exp(score - max)`, `max` being the largest, and returns their sum.
#[inline(always)]
fn softmax_weights(scores: &mut [f32]) -> f32 {
    let mut top = [f32::NEG_INFINITY; 16];
    let chunks = scores.chunks_exact(16);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for i in 0..16 {
            top[i] = top[i].max(c[i]);
        }
    }
    for v in top {
        max = max.max(v);
    }
    for s in scores.iter_mut() {
        *s = exp(*s - max);
    }
    let mut acc = [0f32; 16];
    let chunks = scores.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    sum16(acc) + tail
}

/// The sum of sixteen lanes as a tree of pairwise additions (a left-to-right sum is a chain of
/// sixteen dependent additions).
#[inline(always)]
fn sum16(mut a: [f32; 16]) -> f32 {
    for width in [8, 4, 2, 1] {
        for i in 0..width {
            a[i] += a[i + width];
        }
    }
    a[0]
}

/// `e^x` for `x <= 0` (softmax weights), within 2 units in the last place of the exact value
/// down to `e^-87`, and 0 below. Branch-free, plain arithmetic and integer bit operations, so
/// the compiler vectorizes loops of it (the C library's `expf` is one call per value).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts (Cody and Waite): `n * LN2_HI` is exact for the n that occur here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let vanishes = x < -87.0;
    let x = x.clamp(-87.0, 0.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let f = (x - n * LN2_HI) - n * LN2_LO;
    // e^f for |f| <= ln2 / 2: Taylor terms up to f^6 (the next is below 6e-8 relative).
    let p = 1.0 / 720.0;
    let p = p * f + 1.0 / 120.0;
    let p = p * f + 1.0 / 24.0;
    let p = p * f + 1.0 / 6.0;
    let p = p * f + 0.5;
    let p = p * f + 1.0;
    let p = p * f + 1.0;
    // 2^n from the rounded value's low bits: n is in -126..=0, so the exponent stays normal.
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let two_n = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if vanishes { 0.0 } else { p * two_n }
}

/// Dot product with sixteen independent sums, so that the compiler can keep them in SIMD
/// registers (a single running sum is a chain of dependent additions it may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    sum16(acc) + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_buffers_are_errors_not_panics() {
        let q = [1.0f32; 8];
        let mut out = [0f32; 8];
        let mut scores = [0f32; 4];
        let kv = [0.5f32; 8 * 4];
        assert!(attend(&q, &kv, &kv, 8, 4, 1.0, &mut scores, &mut out).is_ok());
        assert!(attend(&q, &kv[..30], &kv, 8, 4, 1.0, &mut scores, &mut out).is_err());
        assert!(attend(&q, &kv, &kv[..30], 8, 4, 1.0, &mut scores, &mut out).is_err());
        assert!(attend(&q, &kv, &kv, 8, 5, 1.0, &mut scores, &mut out).is_err());
        assert!(attend(&q, &kv, &kv, 8, 4, 1.0, &mut scores, &mut out[..7]).is_err());
        assert!(attend(&q, &[], &[], 8, 0, 1.0, &mut [], &mut out).is_ok());
        assert_eq!(out, [0.0; 8]);
    }

    #[test]
    fn exp_is_close_to_the_c_library_over_its_range() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp(x), (x as f64).exp());
            let rel = ((got as f64 - want) / want).abs() as f32;
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn equal_keys_average_the_values() {
        let q = [0.3f32; 4];
        let keys = [1.0f32; 12];
        let values = [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 6.0, 6.0, 6.0, 6.0];
        let (mut scores, mut out) = ([0f32; 3], [0f32; 4]);
        attend(&q, &keys, &values, 4, 3, 0.5, &mut scores, &mut out).unwrap_or_default();
        for v in out {
            assert!((v - 3.0).abs() < 1e-6, "{out:?}");
        }
    }
}
