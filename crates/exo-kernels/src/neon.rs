//! aarch64 NEON kernels. Each computes what `scalar::dot` computes for one row, or four
//! consecutive rows, of an integer-format matrix (the order of float additions differs, so
//! results agree to rounding).
//!
//! Kernels here: Q8_0, Q4_0 and Q4_1 weights against f32 activations and against 8-bit
//! activation blocks, one row or four rows sharing each activation load; and f32 weights.
//! 8-bit activations use SDOT where the CPU has the dot-product extension and widening
//! multiplies (`smull` + `sadalp`) where it does not. f16, Q4_K and Q6_K weights take the
//! scalar code on the NEON path, and there is no four-rows-by-four-tokens kernel: prefill runs
//! the four-row kernel once per token.

#![allow(unsafe_op_in_unsafe_fn)]

use std::arch::aarch64::*;
use std::arch::asm;

use crate::{BlockKind, RowArgs};

/// Whether the CPU has the dot-product extension (SDOT).
pub(crate) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// A way to add the products of 16 signed byte pairs into four 32-bit lanes.
trait DotI8 {
    /// `acc` plus the products `w[i] * a[i]`, spread over the lanes (the lanes' total is what
    /// counts; which lane holds which product differs between implementations).
    ///
    /// # Safety
    /// The CPU must support the implementation's instructions.
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t;
}

/// SDOT, from the dot-product extension.
struct Sdot;

/// Plain NEON: widening multiplies to 16 bits, pairwise added into 32 bits.
struct Widen;

impl DotI8 for Sdot {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        sdot(acc, w, a)
    }
}

impl DotI8 for Widen {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
        // Each product fits 16 bits (|w|, |a| <= 128); `sadalp` widens pairs into the lanes.
        let acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(w), vget_low_s8(a)));
        vpadalq_s16(acc, vmull_high_s8(w, a))
    }
}

/// `acc` plus, in each lane, the products of the four bytes of `w` and `a` in that lane.
/// Written as inline assembly because `vdotq_s32` is not stable Rust yet.
///
/// # Safety
/// The CPU must support the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
#[inline]
unsafe fn sdot(mut acc: int32x4_t, w: int8x16_t, a: int8x16_t) -> int32x4_t {
    asm!(
        "sdot {acc:v}.4s, {w:v}.16b, {a:v}.16b",
        acc = inout(vreg) acc,
        w = in(vreg) w,
        a = in(vreg) a,
        options(pure, nomem, nostack, preserves_flags),
    );
    acc
}

/// The 32 nibbles of one 4-bit block: elements `0..16` (low nibbles) and `16..32` (high).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (uint8x16_t, uint8x16_t) {
    let nib = vld1q_u8(p);
    (vandq_u8(nib, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(nib))
}

/// Sixteen unsigned bytes as four vectors of floats, in order.
#[inline(always)]
unsafe fn u8_to_f32(v: uint8x16_t) -> [float32x4_t; 4] {
    let (lo, hi) = (vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v));
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
        vcvtq_f32_u32(vmovl_high_u16(lo)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
        vcvtq_f32_u32(vmovl_high_u16(hi)),
    ]
}

/// Sixteen signed bytes as four vectors of floats, in order.
#[inline(always)]
unsafe fn i8_to_f32(v: int8x16_t) -> [float32x4_t; 4] {
    let (lo, hi) = (vmovl_s8(vget_low_s8(v)), vmovl_high_s8(v));
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}

/// Two groups of four vectors as one block of eight.
#[inline(always)]
fn cat(a: [float32x4_t; 4], b: [float32x4_t; 4]) -> [float32x4_t; 8] {
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The 32 weights of block `i` (counted over all rows) as floats: unsigned nibbles for Q4
/// (the offset or minimum is added separately), signed bytes for Q8.
#[inline(always)]
unsafe fn block_weights<const Q8: bool>(wq: &[u8], i: usize) -> [float32x4_t; 8] {
    if Q8 {
        let p = wq.as_ptr().add(i * 32) as *const i8;
        cat(i8_to_f32(vld1q_s8(p)), i8_to_f32(vld1q_s8(p.add(16))))
    } else {
        let (lo, hi) = nibbles(wq.as_ptr().add(i * 16));
        cat(u8_to_f32(lo), u8_to_f32(hi))
    }
}

/// The 32 weights of block `i` (counted over all rows) as signed bytes, two vectors in
/// element order; 4-bit weights as their unsigned nibble values (0..=15).
#[inline(always)]
unsafe fn block_bytes<const Q8: bool>(wq: &[u8], i: usize) -> (int8x16_t, int8x16_t) {
    if Q8 {
        let p = wq.as_ptr().add(i * 32) as *const i8;
        (vld1q_s8(p), vld1q_s8(p.add(16)))
    } else {
        let (lo, hi) = nibbles(wq.as_ptr().add(i * 16));
        (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
    }
}

/// One block of weights times one block of activations, as four partial sums; two FMA chains
/// so that they do not wait on each other.
#[inline(always)]
unsafe fn block_dot(w: &[float32x4_t; 8], x: &[float32x4_t; 8]) -> float32x4_t {
    let mut t0 = vmulq_f32(w[0], x[0]);
    let mut t1 = vmulq_f32(w[1], x[1]);
    for j in (2..8).step_by(2) {
        t0 = vfmaq_f32(t0, w[j], x[j]);
        t1 = vfmaq_f32(t1, w[j + 1], x[j + 1]);
    }
    vaddq_f32(t0, t1)
}

/// f32 weights against f32 activations (also the short scale-by-sum products of the 4-bit
/// kernels).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = vfmaq_f32(
                *a,
                vld1q_f32(wp.add(i + 4 * j)),
                vld1q_f32(xp.add(i + 4 * j)),
            );
        }
        i += 16;
    }
    while i + 4 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(wp.add(i)), vld1q_f32(xp.add(i)));
        i += 4;
    }
    let mut s = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        s += w[i] * x[i];
        i += 1;
    }
    s
}

/// The offset term of row `k` of a 4-bit matrix: `sum_b m_b * sums_b` (Q4_1), or
/// `-8 * sum_b d_b * sums_b` (Q4_0); `sums` are the activation blocks' sums.
#[inline(always)]
unsafe fn q4_offset(r: &RowArgs<'_>, k: usize, nb: usize, sums: &[f32], offset: bool) -> f32 {
    if offset {
        -8.0 * dot_f32(&r.wd[k * nb..(k + 1) * nb], &sums[..nb])
    } else {
        dot_f32(&r.wm[k * nb..(k + 1) * nb], &sums[..nb])
    }
}

/// Rows `0..R` of `r` against one f32 activation row: each activation block is loaded once
/// and used for every row, whose FMA chains run side by side.
///
/// # Safety
/// The CPU must support NEON; `r` holds `R` rows of `nb` blocks (`wd`, and `wm` for Q4_1,
/// `R * nb` values), `x` holds `nb * 32` values and `xsum` `nb` sums.
#[target_feature(enable = "neon")]
unsafe fn f32_acts_rows<const Q8: bool, const R: usize>(
    r: &RowArgs<'_>,
    x: &[f32],
    xsum: &[f32],
    nb: usize,
    offset: bool,
) -> [f32; R] {
    let mut acc = [vdupq_n_f32(0.0); R];
    for b in 0..nb {
        let xp = x.as_ptr().add(b * 32);
        let load = |j: usize| vld1q_f32(xp.add(4 * j));
        let xs = [
            load(0),
            load(1),
            load(2),
            load(3),
            load(4),
            load(5),
            load(6),
            load(7),
        ];
        for (k, a) in acc.iter_mut().enumerate() {
            let i = k * nb + b;
            let w = block_weights::<Q8>(r.wq, i);
            *a = vfmaq_f32(*a, block_dot(&w, &xs), vdupq_n_f32(r.wd[i]));
        }
    }
    let mut out = [0f32; R];
    for (k, o) in out.iter_mut().enumerate() {
        let extra = if Q8 {
            0.0
        } else {
            q4_offset(r, k, nb, xsum, offset)
        };
        *o = vaddvq_f32(acc[k]) + extra;
    }
    out
}

/// Rows `0..R` of `r` against one row of 8-bit activation blocks: integer products of each
/// block (with `D`), scaled by the weight and activation scales.
///
/// # Safety
/// The CPU must support NEON and `D`'s instructions; `r` holds `R` rows of `nb` blocks and
/// `nb` activation blocks.
#[inline(always)]
unsafe fn q8_acts_rows<D: DotI8, const Q8: bool, const R: usize>(
    r: &RowArgs<'_>,
    nb: usize,
    offset: bool,
) -> [f32; R] {
    let mut acc = [vdupq_n_f32(0.0); R];
    for b in 0..nb {
        let ap = r.aq.as_ptr().add(b * 32);
        let (a0, a1) = (vld1q_s8(ap), vld1q_s8(ap.add(16)));
        let ad = r.ad[b];
        for (k, a) in acc.iter_mut().enumerate() {
            let i = k * nb + b;
            let (w0, w1) = block_bytes::<Q8>(r.wq, i);
            let p = D::dot(D::dot(vdupq_n_s32(0), w0, a0), w1, a1);
            *a = vfmaq_f32(*a, vcvtq_f32_s32(p), vdupq_n_f32(r.wd[i] * ad));
        }
    }
    let mut out = [0f32; R];
    for (k, o) in out.iter_mut().enumerate() {
        let extra = if Q8 {
            0.0
        } else {
            q4_offset(r, k, nb, r.asum, offset)
        };
        *o = vaddvq_f32(acc[k]) + extra;
    }
    out
}

/// [`q8_acts_rows`] with SDOT.
///
/// # Safety
/// The CPU must support NEON and the dot-product extension; slices as [`q8_acts_rows`].
#[target_feature(enable = "neon,dotprod")]
unsafe fn q8_acts_rows_sdot<const Q8: bool, const R: usize>(
    r: &RowArgs<'_>,
    nb: usize,
    offset: bool,
) -> [f32; R] {
    q8_acts_rows::<Sdot, Q8, R>(r, nb, offset)
}

/// [`q8_acts_rows`] with widening multiplies.
///
/// # Safety
/// The CPU must support NEON; slices as [`q8_acts_rows`].
#[target_feature(enable = "neon")]
unsafe fn q8_acts_rows_widen<const Q8: bool, const R: usize>(
    r: &RowArgs<'_>,
    nb: usize,
    offset: bool,
) -> [f32; R] {
    q8_acts_rows::<Widen, Q8, R>(r, nb, offset)
}

/// `R` consecutive rows (1 or 4) of a Q8_0/Q4_0/Q4_1 matrix against f32 activations with
/// their per-block sums (used by the 4-bit formats' offset term).
///
/// # Safety
/// The CPU must support NEON; `r` holds `R` rows of `nb` blocks (`wd`, and `wm` for Q4_1,
/// `R * nb` values), `x` holds `nb * 32` values and `xsum` `nb` sums.
#[target_feature(enable = "neon")]
pub(crate) unsafe fn dot_f32_acts<const R: usize>(
    r: &RowArgs<'_>,
    x: &[f32],
    xsum: &[f32],
    nb: usize,
    kind: BlockKind,
) -> [f32; R] {
    match kind {
        BlockKind::Q8 => f32_acts_rows::<true, R>(r, x, xsum, nb, false),
        BlockKind::Q4 { offset } => f32_acts_rows::<false, R>(r, x, xsum, nb, offset),
    }
}

/// `R` consecutive rows (1 or 4) of a Q8_0/Q4_0/Q4_1 matrix against 8-bit activation blocks:
/// SDOT where the CPU has the dot-product extension, widening multiplies otherwise.
///
/// # Safety
/// The CPU must support NEON; `r` holds `R` rows of `nb` blocks and `nb` activation blocks
/// (`ad`, `asum`, and `nb * 32` quants in `aq`).
pub(crate) unsafe fn dot_q8_acts<const R: usize>(
    r: &RowArgs<'_>,
    nb: usize,
    kind: BlockKind,
) -> [f32; R] {
    q8_acts_with::<R>(r, nb, kind, has_dotprod())
}

/// [`dot_q8_acts`] with the SDOT variant (`sdot`) or the widening one chosen by the caller.
///
/// # Safety
/// As [`dot_q8_acts`]; with `sdot`, the CPU must also support the dot-product extension.
unsafe fn q8_acts_with<const R: usize>(
    r: &RowArgs<'_>,
    nb: usize,
    kind: BlockKind,
    sdot: bool,
) -> [f32; R] {
    match (kind, sdot) {
        (BlockKind::Q8, true) => q8_acts_rows_sdot::<true, R>(r, nb, false),
        (BlockKind::Q8, false) => q8_acts_rows_widen::<true, R>(r, nb, false),
        (BlockKind::Q4 { offset }, true) => q8_acts_rows_sdot::<false, R>(r, nb, offset),
        (BlockKind::Q4 { offset }, false) => q8_acts_rows_widen::<false, R>(r, nb, offset),
    }
}

/// Four zero lanes (for the attention kernel written by `attn`'s macro).
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) unsafe fn zero() -> float32x4_t {
    vdupq_n_f32(0.0)
}

/// `a * b + c`, in the operand order of x86's `fmadd` (NEON's `vfmaq_f32` takes the addend
/// first), for the attention kernel written by `attn`'s macro.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) unsafe fn fmadd(a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
    vfmaq_f32(c, a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QuantMatrix, QuantizedActs, Result, WeightFormat, int_rows, row_args, scalar};

    /// Reproducible values in -1..=1 (xorshift).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn close(got: f32, want: f32) -> bool {
        (got - want).abs() <= 1e-4 * want.abs().max(1.0)
    }

    /// Both 8-bit-activation variants (SDOT only where the CPU has it), one row and four rows,
    /// against the scalar reference; whichever variant `Isa::Neon` picks is covered by the
    /// integration tests as well.
    #[test]
    fn both_q8_activation_variants_equal_the_scalar_reference() -> Result<()> {
        let variants: &[bool] = if has_dotprod() {
            &[false, true]
        } else {
            &[false]
        };
        for format in [WeightFormat::Q8_0, WeightFormat::Q4_0, WeightFormat::Q4_1] {
            for (blocks, seed) in [(1usize, 3u64), (3, 5), (8, 7)] {
                let (rows, cols, n) = (6, blocks * 32, 2);
                let w = QuantMatrix::from_f32(format, rows, cols, &values(rows * cols, seed))?
                    .with_q8_activations();
                let x: Vec<f32> = values(n * cols, seed + 1).iter().map(|v| v * 3.0).collect();
                let mut a = QuantizedActs::new();
                a.quantize(&x, n, cols, false);
                for &sdot in variants {
                    for t in 0..n {
                        let (ab, aq) = (t * blocks, t * blocks * 32);
                        for row in 0..rows {
                            let Some((wd, wm, wq, kind)) = int_rows(&w, row, 1) else {
                                return Err(crate::Error::Shape {
                                    what: "integer rows",
                                    expected: 1,
                                    actual: 0,
                                });
                            };
                            let r = row_args(wd, wm, wq, &a, ab, aq, blocks);
                            // SAFETY: NEON is part of the aarch64 baseline and SDOT is used
                            // only where detected; `r` holds one row and one token's blocks.
                            let [got] = unsafe { q8_acts_with::<1>(&r, blocks, kind, sdot) };
                            let want = scalar::dot(&w, row, &a, t);
                            assert!(
                                close(got, want),
                                "{format} sdot {sdot} row {row}: {got} vs {want}"
                            );
                        }
                        for row in 0..=rows - 4 {
                            let Some((wd, wm, wq, kind)) = int_rows(&w, row, 4) else {
                                continue;
                            };
                            let r = row_args(wd, wm, wq, &a, ab, aq, blocks);
                            // SAFETY: as above, with four rows.
                            let got = unsafe { q8_acts_with::<4>(&r, blocks, kind, sdot) };
                            for (k, g) in got.into_iter().enumerate() {
                                let want = scalar::dot(&w, row + k, &a, t);
                                assert!(
                                    close(g, want),
                                    "{format} sdot {sdot} rows {row}+{k}: {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
