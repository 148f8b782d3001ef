//! AVX2 kernels that take activations quantized to 8-bit blocks of 32 (llama.cpp's scheme):
//! weights stay bytes, and `vpmaddubsw` + `vpmaddwd` multiply 32 weights by 32 activations in
//! two instructions (the f32 kernels widen each weight to a float and need four FMAs for the
//! same work). Each block's integer sum is scaled once, in float, by the weight scale times
//! the activation block's scale.
//!
//! Every kernel computes `R` consecutive weight rows against `T` activation rows (`R x 1` for
//! decode, `2 x 4` for prefill tiles) and equals the integer math of `scalar::dot`, up to the
//! order of float additions.

#![allow(unsafe_op_in_unsafe_fn, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::x86::{
    Q4K_MINS, Q4K_SCALES, Q5K_HIGH, Q6K_BYTES, Q6K_D, Q6K_HIGH, Q6K_SCALES, f16_at, hsum256,
    k_layout, q6k_unsigned,
};

/// One activation row, quantized: `nb` blocks of 32.
#[derive(Clone, Copy)]
pub(crate) struct Q8Row<'a> {
    /// Scale of each block.
    pub(crate) d: &'a [f32],
    /// `d * sum(q)` of each block.
    pub(crate) sum: &'a [f32],
    /// Integer sum of each 16 quants (two per block).
    pub(crate) s16: &'a [i16],
    /// The quants, 32 per block.
    pub(crate) q: &'a [i8],
    /// The second plane (empty without one): what `q` leaves, in steps of `d / 254`.
    pub(crate) lo: &'a [i8],
    /// Integer sum of each 16 of the second plane (empty without one).
    pub(crate) s16lo: &'a [i16],
}

/// Scales, minimums (Q4_1 and Q5_1 only), quant bytes and fifth bits (Q5_0 and Q5_1 only) of
/// `R` consecutive rows of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix (`nb` blocks per row).
pub(crate) struct IntRows<'a> {
    pub(crate) wd: &'a [f32],
    pub(crate) wm: &'a [f32],
    pub(crate) wq: &'a [u8],
    pub(crate) wh: &'a [u32],
}

/// With a second plane, `254 * dot(w, hi) + dot(w, lo)`, in units of `d / 254` (see
/// [`dot_u8_i8`]); without, `dot(w, hi)`.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_planes<const FINE: bool>(w: __m256i, hi: *const i8, lo: *const i8) -> __m256i {
    let a = _mm256_loadu_si256(hi as *const __m256i);
    if !FINE {
        return dot_u8_i8(w, a);
    }
    let b = _mm256_loadu_si256(lo as *const __m256i);
    _mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(254)),
        dot_u8_i8(w, b),
    )
}

/// The factor of a block's scale for the integer sums of [`dot_planes`].
const fn unit<const FINE: bool>() -> f32 {
    if FINE { 1.0 / 254.0 } else { 1.0 }
}

/// The sum of `vpmaddubsw(w, a)` pairs as eight 32-bit lanes (lane `m` covers elements
/// `4m..4m + 4`): unsigned weight bytes times signed activation bytes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_u8_i8(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

/// `R` consecutive rows of a Q4_K (`HIGH = false`) or Q5_K matrix (repacked super-blocks,
/// `row_bytes` apart) against `T` activation rows quantized to 8 bits. Per sub-block of 32:
/// the integer dot product of the 4- (5-) bit quants with the activation bytes, scaled by
/// `d * scale * d_act`; the minimums come off as `dmin * min * d_act * sum(q_act)` per
/// sub-block. Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `R` rows of `nsb` super-blocks and each
/// activation row `nsb * 8` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k_q8<const R: usize, const T: usize, const HIGH: bool, const FINE: bool>(
    w: &[u8],
    row_bytes: usize,
    a: [Q8Row<'_>; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let (block, quants) = k_layout(HIGH);
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    // `d * scale_j * d_act_j` of each row, token and sub-block.
    let mut scale = [[[0f32; 8]; T]; R];
    for s in 0..nsb {
        for r in 0..R {
            let b = w.as_ptr().add(r * row_bytes + s * block);
            // The next super-block of each row is ~150 bytes on: ask for it one block ahead.
            if s + 1 < nsb {
                for line in (64..=block).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(block + line) as *const i8);
                }
            }
            let bytes = |at: usize| {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    b.add(at) as *const __m128i
                )))
            };
            let sc = _mm256_mul_ps(bytes(Q4K_SCALES), _mm256_set1_ps(f16_at(b)));
            let mins = _mm256_mul_ps(bytes(Q4K_MINS), _mm256_set1_ps(f16_at(b.add(2))));
            let sc = _mm256_mul_ps(sc, _mm256_set1_ps(unit::<FINE>()));
            for t in 0..T {
                let ad = _mm256_loadu_ps(a[t].d.as_ptr().add(s * 8));
                _mm256_storeu_ps(scale[r][t].as_mut_ptr(), _mm256_mul_ps(sc, ad));
                // The minimums, lane j for sub-block j: summed with the rest at the end.
                let asum = _mm256_loadu_ps(a[t].sum.as_ptr().add(s * 8));
                acc[r][t] = _mm256_fnmadd_ps(mins, asum, acc[r][t]);
            }
        }
        for c in 0..4 {
            for r in 0..R {
                let b = w.as_ptr().add(r * row_bytes + s * block);
                let q = _mm256_loadu_si256(b.add(quants + c * 32) as *const __m256i);
                let mut lo = _mm256_and_si256(q, mask);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                if HIGH {
                    // Bits 2c and 2c + 1 of each high byte, as 16.
                    let h = _mm256_loadu_si256(b.add(Q5K_HIGH) as *const __m256i);
                    let sixteen = _mm256_set1_epi8(16);
                    let h = _mm256_srl_epi16(h, _mm_cvtsi32_si128(2 * c as i32));
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(h, 4), sixteen));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(h, 3), sixteen));
                }
                for t in 0..T {
                    let e = s * 256 + c * 64;
                    let (ap, bp) = (a[t].q.as_ptr().add(e), a[t].lo.as_ptr().wrapping_add(e));
                    let s0 = _mm256_set1_ps(scale[r][t][2 * c]);
                    let s1 = _mm256_set1_ps(scale[r][t][2 * c + 1]);
                    let p0 = dot_planes::<FINE>(lo, ap, bp);
                    let p1 = dot_planes::<FINE>(hi, ap.add(32), bp.wrapping_add(32));
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, acc[r][t]);
                    acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, acc[r][t]);
                }
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum256(acc[r][t]);
        }
    }
    out
}

/// `vpshufb` controls that spread scale bytes `2b` and `2b + 1` of a Q6_K super-block over
/// the low and high eight bytes: with `vpmovsxbw` they become the sixteen 16-bit scales of
/// block `b`'s `vpmaddubsw` lanes.
static Q6K_SCALE_SHUFFLE: [[u8; 16]; 8] = {
    let mut t = [[0u8; 16]; 8];
    let mut b = 0;
    while b < 8 {
        let mut i = 0;
        while i < 16 {
            t[b][i] = (2 * b + i / 8) as u8;
            i += 1;
        }
        b += 1;
    }
    t
};

/// `R` consecutive rows of a Q6_K matrix (ggml's super-blocks, `row_bytes` apart) against `T`
/// activation rows quantized to 8 bits. Per block of 32: the quants as unsigned 0..63 times the
/// activation bytes, each 16 weighted by its signed scale in 16-bit integers, scaled by
/// `d * d_act`; the quants' offset of 32 comes off once per super-block as
/// `32 * sum(scale * sum16(q_act))`. Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `R` rows of `nsb` super-blocks and each
/// activation row `nsb * 8` blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k_q8<const R: usize, const T: usize, const FINE: bool>(
    w: &[u8],
    row_bytes: usize,
    a: [Q8Row<'_>; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    // `d * d_act` of each row, token and block.
    let mut scale = [[[0f32; 8]; T]; R];
    for s in 0..nsb {
        for r in 0..R {
            let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
            if s + 1 < nsb {
                for line in [64, 128, 192, 256] {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(Q6K_BYTES + line - 64) as *const i8);
                }
            }
            let d = _mm256_set1_ps(f16_at(b.add(Q6K_D)) * unit::<FINE>());
            let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(Q6K_SCALES) as *const __m128i));
            for t in 0..T {
                let dd = _mm256_mul_ps(d, _mm256_loadu_ps(a[t].d.as_ptr().add(s * 8)));
                _mm256_storeu_ps(scale[r][t].as_mut_ptr(), dd);
                // 32 * sum over each block's two 16s of scale * sum16(q_act), lane b for block b.
                let s16 = _mm256_loadu_si256(a[t].s16.as_ptr().add(s * 16) as *const __m256i);
                let mut off = _mm256_madd_epi16(sc, s16);
                if FINE {
                    let lo = a[t].s16lo.as_ptr().add(s * 16);
                    let lo = _mm256_madd_epi16(sc, _mm256_loadu_si256(lo as *const __m256i));
                    off = _mm256_add_epi32(_mm256_mullo_epi32(off, _mm256_set1_epi32(254)), lo);
                }
                // Times 32 in float: with two planes the integer may pass 2^31 / 32.
                let off = _mm256_mul_ps(_mm256_cvtepi32_ps(off), _mm256_set1_ps(32.0));
                acc[r][t] = _mm256_fnmadd_ps(off, dd, acc[r][t]);
            }
        }
        for h in 0..2 {
            for g in 0..4 {
                let blk = h * 4 + g;
                let shuffle = _mm_loadu_si128(Q6K_SCALE_SHUFFLE[blk].as_ptr() as *const __m128i);
                for r in 0..R {
                    let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
                    let q = q6k_unsigned(b.add(h * 64), b.add(Q6K_HIGH + h * 32), g);
                    let raw = _mm_loadu_si128(b.add(Q6K_SCALES) as *const __m128i);
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(raw, shuffle));
                    // |scale| <= 128, so 254 * scale still fits 16 bits.
                    let sc_hi = if FINE {
                        _mm256_mullo_epi16(sc, _mm256_set1_epi16(254))
                    } else {
                        sc
                    };
                    for t in 0..T {
                        let e = s * 256 + blk * 32;
                        let ap = a[t].q.as_ptr().add(e);
                        let av = _mm256_loadu_si256(ap as *const __m256i);
                        let mut p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, av), sc_hi);
                        if FINE {
                            let bv = _mm256_loadu_si256(a[t].lo.as_ptr().add(e) as *const __m256i);
                            p = _mm256_add_epi32(
                                p,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(q, bv), sc),
                            );
                        }
                        acc[r][t] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(p),
                            _mm256_set1_ps(scale[r][t][blk]),
                            acc[r][t],
                        );
                    }
                }
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum256(acc[r][t]);
        }
    }
    out
}

/// Block kinds of [`int_q8`].
pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q8_0: u8 = 2;
pub(crate) const Q5_0: u8 = 3;
pub(crate) const Q5_1: u8 = 4;

/// The 32 bits of `x` as bytes of 16 (bit set) or 0, byte `j` for bit `j`: a Q5 block's fifth
/// bits, ready to join its nibbles.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn fifth_bits(x: u32) -> __m256i {
    // Byte `j` takes byte `j / 8` of `x`, then tests its bit `j % 8`.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(x as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// `R` consecutive rows of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix (`KIND`; `nb` blocks per
/// row) against `T` activation rows quantized to 8 bits (two planes with `FINE`): per block the
/// integer dot product, scaled by `d_w * d_act`; Q4_0's offset of 8 (Q5_0's of 16) and the
/// minimums come off with the blocks' activation sums at the end. Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w` holds `R` rows of `nb` blocks (`w.wm` too for
/// Q4_1) and each activation row `nb` blocks (and the second plane with `FINE`).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn int_q8<const R: usize, const T: usize, const FINE: bool, const KIND: u8>(
    w: &IntRows<'_>,
    a: [Q8Row<'_>; T],
    nb: usize,
) -> [[f32; T]; R] {
    let mask = _mm_set1_epi8(0x0f);
    let (wq, wd) = (w.wq.as_ptr(), w.wd.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        // This block of every token: its bytes (both planes) and its scale.
        let mut hi = [_mm256_setzero_si256(); T];
        let mut lo = [_mm256_setzero_si256(); T];
        let mut ad = [0f32; T];
        for t in 0..T {
            hi[t] = _mm256_loadu_si256(a[t].q.as_ptr().add(b * 32) as *const __m256i);
            if FINE {
                lo[t] = _mm256_loadu_si256(a[t].lo.as_ptr().add(b * 32) as *const __m256i);
            }
            ad[t] = *a[t].d.as_ptr().add(b) * unit::<FINE>();
        }
        for k in 0..R {
            let i = k * nb + b;
            // The weights as unsigned bytes; Q8_0 moves their signs onto the activations.
            let (wv, sign) = if KIND == Q8_0 {
                let p = wq.add(i * 32);
                if b % 2 == 0 && (i + 4) * 32 < w.wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(4 * 32) as *const i8);
                }
                let v = _mm256_loadu_si256(p as *const __m256i);
                (_mm256_sign_epi8(v, v), v)
            } else {
                let p = wq.add(i * 16);
                if b % 4 == 0 && (i + 8) * 16 < w.wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(8 * 16) as *const i8);
                }
                let nib = _mm_loadu_si128(p as *const __m128i);
                let l = _mm_and_si128(nib, mask);
                let h = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
                let v = _mm256_set_m128i(h, l);
                if KIND == Q5_0 || KIND == Q5_1 {
                    (
                        _mm256_or_si256(v, fifth_bits(*w.wh.as_ptr().add(i))),
                        _mm256_setzero_si256(),
                    )
                } else {
                    (v, _mm256_setzero_si256())
                }
            };
            let d = *wd.add(i);
            for t in 0..T {
                let signed = |v: __m256i| {
                    if KIND == Q8_0 {
                        _mm256_sign_epi8(v, sign)
                    } else {
                        v
                    }
                };
                let p = if FINE {
                    let h = _mm256_maddubs_epi16(wv, signed(hi[t]));
                    let h = _mm256_madd_epi16(h, _mm256_set1_epi16(254));
                    _mm256_add_epi32(h, dot_u8_i8(wv, signed(lo[t])))
                } else {
                    dot_u8_i8(wv, signed(hi[t]))
                };
                let s = _mm256_set1_ps(d * ad[t]);
                acc[k][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[k][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for k in 0..R {
        for t in 0..T {
            // Q8_0's signs moved onto the activations: no offset.
            out[k][t] = hsum256(acc[k][t]) + block_sum_terms(KIND, w, k, nb, a[t].sum, 0.0);
        }
    }
    out
}

/// What the activations' block sums (`sum`, `d * sum(q)` per block) add to row `r` of `w`
/// (`nb` blocks per row) in the integer kernels: each block's offset times its scale, for
/// Q4_0 (-8), Q5_0 (-16) and Q8_0 (`q8_offset`: -128 where a kernel made its weights unsigned
/// by adding 128, 0 where it moved their signs onto the activations), or the minimums of Q4_1
/// and Q5_1.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w` holds row `r` (its minimums for Q4_1 and Q5_1) and
/// `sum` at least `nb` values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn block_sum_terms(
    kind: u8,
    w: &IntRows<'_>,
    r: usize,
    nb: usize,
    sum: &[f32],
    q8_offset: f32,
) -> f32 {
    let row = r * nb..(r + 1) * nb;
    let dot = |v: &[f32]| crate::x86::dot_f32_avx2(&v[row.clone()], &sum[..nb]);
    match kind {
        Q4_0 => -8.0 * dot(w.wd),
        Q5_0 => -16.0 * dot(w.wd),
        Q8_0 if q8_offset != 0.0 => q8_offset * dot(w.wd),
        Q4_1 | Q5_1 => dot(w.wm),
        _ => 0.0,
    }
}
