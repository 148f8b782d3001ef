//! AVX-512 VNNI kernels for the 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) against activations
//! quantized to 8 bits: four blocks (128 weights) of a row per step in 512-bit registers, where
//! the AVX2 kernels of [`crate::x86_q8`] take one block per step. `vpdpbusd` multiplies 64
//! unsigned weight bytes by 64 signed activation bytes and adds them into sixteen 32-bit lanes
//! in one instruction.
//!
//! The nibble formats keep their stored layout: a step loads the 64 bytes of four blocks, whose
//! low nibbles (each block's elements 0..16) and high nibbles (16..32) give two vectors with one
//! block per 128-bit lane. The activations are shuffled to match, once per step and token for
//! all `R` rows. Q8_0 weights are signed: they take 128 on (`xor 0x80`), which makes them
//! unsigned, and `128 * d_w * sum(q_act)` comes off at the end, as Q4_0's offset of 8 does.
//! Each lane's integer sum is scaled by its block's `d_w * d_act` in float. A last step of fewer
//! than four blocks loads with masks: the missing lanes read as zeros and add nothing.
//!
//! Q6_K takes 64 quants per `vpdpbusd` (each 128-bit lane group under one of its 16-element
//! scales) and Q4_K/Q5_K two sub-blocks per register. A product picks its kernel once per task
//! (`rows_into`, `k_rows_into`): four rows by four tokens, or four rows by one for decode.
//!
//! Every kernel equals the integer math of `scalar::dot` up to the order of float additions.

#![allow(unsafe_op_in_unsafe_fn, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::x86::{
    Q4K_MINS, Q4K_SCALES, Q5K_HIGH, Q6K_BYTES, Q6K_D, Q6K_HIGH, Q6K_SCALES, k_layout,
};
use crate::x86_q8::{IntRows, Q5_0, Q5_1, Q8_0, Q8Row, block_sum_terms};

/// The target features every kernel here and in `x86_panel` needs (checked by
/// [`crate::Isa::Avx512Vnni`]).
macro_rules! vnni {
    ($($item:item)*) => {
        $(
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
            $item
        )*
    };
}
pub(crate) use vnni;

/// At least how far ahead of a row's current step its weight bytes are asked for: decode
/// streams the weights from memory, and without this it waited on them (Q4_0 on the default
/// model, one thread: 2,048 bytes 1.36x and 4,096 1.52-1.59x the tokens/s of none; 8,192 no
/// better). The distance is rounded up to whole groups of `R` rows, so that each row asks for
/// the same step of a later group's row, not for bytes another row of its group is reading.
const AHEAD: usize = 4096;

/// Lane `i` takes float `i / 4`: four blocks' scales, each over its 128-bit lane.
const SPREAD: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];

vnni! {
    /// The fifth bits of `k` (up to four) Q5 blocks (`h` at block `b`) as byte masks over the
    /// low and high nibble vectors: bit `j` of block `b + g` at byte `16g + j` of the first for
    /// `j < 16`, of the second for the rest; zeros for blocks past `k`.
    #[inline]
    unsafe fn fifth_masks(h: *const u32, k: usize) -> (u64, u64) {
        let (h01, h23) = if k == 4 {
            (
                (h as *const u64).read_unaligned(),
                (h.add(2) as *const u64).read_unaligned(),
            )
        } else {
            let mut v = [0u32; 4];
            std::ptr::copy_nonoverlapping(h, v.as_mut_ptr(), k);
            (
                v[0] as u64 | (v[1] as u64) << 32,
                v[2] as u64 | (v[3] as u64) << 32,
            )
        };
        const LOW: u64 = 0x0000_ffff_0000_ffff;
        const HIGH: u64 = 0xffff_0000_ffff_0000;
        (
            _pext_u64(h01, LOW) | _pext_u64(h23, LOW) << 32,
            _pext_u64(h01, HIGH) | _pext_u64(h23, HIGH) << 32,
        )
    }

    /// `R` consecutive rows of a Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 matrix (`KIND`; `nb` blocks
    /// per row) against `T` activation rows quantized to 8 bits (two planes with `FINE`).
    /// Returns `out[row][token]`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/DQ/VL/VNNI, AVX2, FMA and BMI2; `w` holds `R` rows of
    /// `nb` blocks (`w.wm` too for Q4_1 and Q5_1, `w.wh` for Q5) and each activation row `nb`
    /// blocks (and the second plane with `FINE`).
    #[inline]
    pub(crate) unsafe fn int_vnni<const R: usize, const T: usize, const FINE: bool, const KIND: u8>(
        w: &IntRows<'_>,
        a: &[Q8Row<'_>; T],
        nb: usize,
    ) -> [[f32; T]; R] {
        let nibbles = KIND != Q8_0;
        let mask = _mm512_set1_epi8(0x0f);
        let sixteen = _mm512_set1_epi8(16);
        let flip = _mm512_set1_epi8(-128);
        let spread = _mm512_loadu_si512(SPREAD.as_ptr() as *const __m512i);
        let (wq, wd) = (w.wq.as_ptr(), w.wd.as_ptr());
        let bytes = if nibbles { 16 } else { 32 };
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let group = R * nb * bytes;
        let ahead = group * AHEAD.div_ceil(group);
        let mut b = 0;
        while b < nb {
            // A step of four blocks; the last may have fewer, whose missing lanes load as
            // zeros (weights, activations and scales alike), so they add nothing.
            let k = (nb - b).min(4);
            let bits = |n: usize| if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
            let (m0, m1) = (bits(32 * k), bits((32 * k).saturating_sub(64)));
            let m4 = bits(k) as __mmask8;
            // This step's activations of every token, in the weights' layout, and their scales.
            let mut x = [[_mm512_setzero_si512(); 2]; T];
            let mut y = [[_mm512_setzero_si512(); 2]; T];
            let mut ad = [_mm_setzero_ps(); T];
            // Masked loads only for a last, short step: on Zen 5 they cost a third of decode
            // when every step takes them.
            let full = k == 4;
            let bytes64 = |m: u64, p: *const i8| {
                if full {
                    _mm512_loadu_si512(p as *const __m512i)
                } else {
                    _mm512_maskz_loadu_epi8(m, p)
                }
            };
            let load = |p: *const i8| {
                let u = bytes64(m0, p);
                let v = bytes64(m1, p.wrapping_add(64));
                if nibbles {
                    // Block `b + g`'s elements 0..16 in lane `g` of the first, 16..32 of the
                    // second, as the nibbles lie.
                    [
                        _mm512_shuffle_i64x2::<0b10_00_10_00>(u, v),
                        _mm512_shuffle_i64x2::<0b11_01_11_01>(u, v),
                    ]
                } else {
                    [u, v]
                }
            };
            for t in 0..T {
                x[t] = load(a[t].q.as_ptr().add(b * 32));
                if FINE {
                    y[t] = load(a[t].lo.as_ptr().add(b * 32));
                }
                ad[t] = if full {
                    _mm_loadu_ps(a[t].d.as_ptr().add(b))
                } else {
                    _mm_maskz_loadu_ps(m4, a[t].d.as_ptr().add(b))
                };
            }
            for r in 0..R {
                let i = r * nb + b;
                let p = wq.add(i * bytes);
                // Ask for the bytes `ahead` on (see `AHEAD`). A pointer past the matrix is never
                // read: prefetches do not fault.
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
                if !nibbles {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead + 64) as *const i8);
                }
                // The scales, a step's 16 bytes, as far ahead in blocks: once per 64 bytes.
                if b % 16 == 0 {
                    let d = wd.add(i) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(d.wrapping_add(ahead / bytes * 4));
                }
                // Two vectors of weight bytes, unsigned.
                let v = if nibbles {
                    let q = bytes64(bits(16 * k), p as *const i8);
                    let mut lo = _mm512_and_si512(q, mask);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), mask);
                    if KIND == Q5_0 || KIND == Q5_1 {
                        let (ml, mh) = fifth_masks(w.wh.as_ptr().add(i), k);
                        lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi8(ml, sixteen));
                        hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi8(mh, sixteen));
                    }
                    [lo, hi]
                } else {
                    // Bytes past the last block become 128 here, against zero activations.
                    let p = p as *const i8;
                    [
                        _mm512_xor_si512(bytes64(m0, p), flip),
                        _mm512_xor_si512(bytes64(m1, p.wrapping_add(64)), flip),
                    ]
                };
                let dw = if full {
                    _mm_loadu_ps(wd.add(i))
                } else {
                    _mm_maskz_loadu_ps(m4, wd.add(i))
                };
                for t in 0..T {
                    let zero = _mm512_setzero_si512();
                    let s = _mm512_permutexvar_ps(
                        spread,
                        _mm512_castps128_ps512(_mm_mul_ps(dw, ad[t])),
                    );
                    let sums = |xs: [__m512i; 2]| {
                        if nibbles {
                            // One block per 128-bit lane already.
                            _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, v[0], xs[0]), v[1], xs[1])
                        } else {
                            // Blocks b, b + 1 per 256-bit half of the first, b + 2, b + 3 of
                            // the second: add each block's two 128-bit lanes.
                            let p = _mm512_dpbusd_epi32(zero, v[0], xs[0]);
                            let q = _mm512_dpbusd_epi32(zero, v[1], xs[1]);
                            _mm512_add_epi32(
                                _mm512_shuffle_i64x2::<0b10_00_10_00>(p, q),
                                _mm512_shuffle_i64x2::<0b11_01_11_01>(p, q),
                            )
                        }
                    };
                    let mut f = _mm512_cvtepi32_ps(sums(x[t]));
                    if FINE {
                        let lo = _mm512_cvtepi32_ps(sums(y[t]));
                        f = _mm512_fmadd_ps(lo, _mm512_set1_ps(1.0 / 254.0), f);
                    }
                    acc[r][t] = _mm512_fmadd_ps(f, s, acc[r][t]);
                }
            }
            b += k;
        }
        let mut out = [[0f32; T]; R];
        for r in 0..R {
            for t in 0..T {
                // Q8_0's weights took 128 on.
                let extra = block_sum_terms(KIND, w, r, nb, a[t].sum, -128.0);
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]) + extra;
            }
        }
        out
    }

    /// `R` consecutive rows of a Q6_K matrix (ggml's super-blocks of 210 bytes, `row_bytes`
    /// apart) against `T` activation rows quantized to 8 bits (one plane). Per half super-block
    /// the 64 low-bit bytes and the 32 high-bit bytes make two vectors of 64 unsigned quants
    /// (0..63); each `vpdpbusd` lane group of 16 elements has one scale, so the sixteen lanes of
    /// `d * scale * d_act` multiply the integer sums directly. The offset of 32 comes off once
    /// per super-block as `32 * sum(d * scale * d_act * sum16(q_act))`. Returns
    /// `out[row][token]`.
    ///
    /// # Safety
    /// As [`int_vnni`], plus F16C; `w` holds `R` rows of `nsb` super-blocks and each activation
    /// row `nsb * 8` blocks.
    #[inline]
    pub(crate) unsafe fn q6k_vnni<const R: usize, const T: usize>(
        w: &[u8],
        row_bytes: usize,
        a: &[Q8Row<'_>; T],
        nsb: usize,
    ) -> [[f32; T]; R] {
        let m4 = _mm512_set1_epi8(0x0f);
        let m2 = _mm512_set1_epi8(0x30);
        // The high bits of elements 0..32 and 32..64 of a half (the first vector) sit at bits
        // 0..2 and 2..4 of its high bytes; of 64..96 and 96..128 at 4..6 and 6..8: shifted
        // (in 16-bit lanes, which the mask then cleans) to bits 4..6.
        let up = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
        let down = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(2));
        // Lane group `k` of the integer sums of half `h`'s first vector takes scale `8h + k`,
        // of its second `8h + 4 + k`.
        let pick = |first: i32| {
            _mm512_setr_epi32(
                first, first, first, first, first + 1, first + 1, first + 1, first + 1,
                first + 2, first + 2, first + 2, first + 2, first + 3, first + 3, first + 3,
                first + 3,
            )
        };
        let picks = [pick(0), pick(4), pick(8), pick(12)];
        // Activation block `k / 2` for scale `k`.
        let halves = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        let group = R * row_bytes;
        let ahead = group * AHEAD.div_ceil(group.max(1));
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for s in 0..nsb {
            // Per token: the activation scale of each 16 and the sums of each 16.
            let mut dact = [_mm512_setzero_ps(); T];
            let mut sum16 = [_mm512_setzero_ps(); T];
            for t in 0..T {
                let d = _mm512_castps256_ps512(_mm256_loadu_ps(a[t].d.as_ptr().add(s * 8)));
                dact[t] = _mm512_permutexvar_ps(halves, d);
                let s16 = _mm256_loadu_si256(a[t].s16.as_ptr().add(s * 16) as *const __m256i);
                sum16[t] = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(s16));
            }
            for r in 0..R {
                let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
                for line in [0, 64, 128, 192] {
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(ahead + line) as *const i8);
                }
                let d = crate::x86::f16_at(b.add(Q6K_D));
                let sc = _mm_loadu_si128(b.add(Q6K_SCALES) as *const __m128i);
                let sc = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)),
                    _mm512_set1_ps(d),
                );
                let mut q = [_mm512_setzero_si512(); 4];
                for h in 0..2 {
                    let low = _mm512_loadu_si512(b.add(h * 64) as *const __m512i);
                    let high = _mm256_loadu_si256(b.add(Q6K_HIGH + h * 32) as *const __m256i);
                    let high = _mm512_broadcast_i64x4(high);
                    let hi_a = _mm512_and_si512(_mm512_sllv_epi16(high, up), m2);
                    let hi_b = _mm512_and_si512(_mm512_srlv_epi16(high, down), m2);
                    q[2 * h] = _mm512_or_si512(_mm512_and_si512(low, m4), hi_a);
                    q[2 * h + 1] = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(low), m4),
                        hi_b,
                    );
                }
                for t in 0..T {
                    let scale = _mm512_mul_ps(sc, dact[t]);
                    let off = _mm512_mul_ps(scale, _mm512_set1_ps(32.0));
                    let mut sum = _mm512_fnmadd_ps(off, sum16[t], acc[r][t]);
                    let ap = a[t].q.as_ptr().add(s * 256);
                    for k in 0..4 {
                        let x = _mm512_loadu_si512(ap.add(64 * k) as *const __m512i);
                        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], x);
                        let lanes = _mm512_permutexvar_ps(picks[k], scale);
                        sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), lanes, sum);
                    }
                    acc[r][t] = sum;
                }
            }
        }
        acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
    }

    /// `R` consecutive rows of a Q4_K (`HIGH = false`) or Q5_K matrix (repacked super-blocks,
    /// `row_bytes` apart, as `x86_q8::q4k_q8` reads them) against `T` activation rows quantized
    /// to 8 bits (one plane). A step takes 64 quant bytes: their low nibbles are sub-blocks
    /// `2c` and `2c + 2`, their high ones `2c + 1` and `2c + 3` (Q5_K's fifth bits joined in),
    /// one sub-block per 256-bit half, each half scaled by `d * scale * d_act` of its
    /// sub-block. The minimums come off per super-block as `dmin * min * d_act * sum(q_act)`.
    /// Returns `out[row][token]`.
    ///
    /// # Safety
    /// As [`int_vnni`], plus F16C; `w` holds `R` rows of `nsb` super-blocks and each activation
    /// row `nsb * 8` blocks.
    #[inline]
    pub(crate) unsafe fn q4k_vnni<const R: usize, const T: usize, const HIGH: bool>(
        w: &[u8],
        row_bytes: usize,
        a: &[Q8Row<'_>; T],
        nsb: usize,
    ) -> [[f32; T]; R] {
        let (block, quants) = k_layout(HIGH);
        let m4 = _mm512_set1_epi8(0x0f);
        let sixteen = _mm512_set1_epi8(16);
        // Q5_K: bit 2c of each fifth-bit byte goes to sub-block 2c (bit 4 of the quant),
        // 2c + 1 to 2c + 1; per half of a step (c, c + 1), in 16-bit lanes the mask then cleans.
        let shifts = |lo: i16, hi: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(lo), _mm256_set1_epi16(hi));
        // Lane `i` takes scale `first + 2 * (i / 8)`.
        let pick = |first: i32| {
            _mm512_setr_epi32(
                first, first, first, first, first, first, first, first, first + 2, first + 2,
                first + 2, first + 2, first + 2, first + 2, first + 2, first + 2,
            )
        };
        let picks = [pick(0), pick(1), pick(4), pick(5)];
        let group = R * row_bytes;
        let ahead = group * AHEAD.div_ceil(group.max(1));
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        for s in 0..nsb {
            // Per token: each sub-block's activation scale and scaled sum, and the step's
            // activations matched to the quant layout.
            let mut dact = [_mm256_setzero_ps(); T];
            let mut asum = [_mm256_setzero_ps(); T];
            let mut x = [[_mm512_setzero_si512(); 4]; T];
            for t in 0..T {
                dact[t] = _mm256_loadu_ps(a[t].d.as_ptr().add(s * 8));
                asum[t] = _mm256_loadu_ps(a[t].sum.as_ptr().add(s * 8));
                let p = a[t].q.as_ptr().add(s * 256);
                for half in 0..2 {
                    let u = _mm512_loadu_si512(p.add(128 * half) as *const __m512i);
                    let v = _mm512_loadu_si512(p.add(128 * half + 64) as *const __m512i);
                    // Sub-blocks (2c, 2c + 2) and (2c + 1, 2c + 3) of c = 2 * half.
                    x[t][2 * half] = _mm512_shuffle_i64x2::<0b01_00_01_00>(u, v);
                    x[t][2 * half + 1] = _mm512_shuffle_i64x2::<0b11_10_11_10>(u, v);
                }
            }
            for r in 0..R {
                let b = w.as_ptr().add(r * row_bytes + s * block);
                for line in (0..block).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(ahead + line) as *const i8);
                }
                let bytes = |at: usize| {
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                        b.add(at) as *const __m128i
                    )))
                };
                let sc = _mm256_mul_ps(bytes(Q4K_SCALES), _mm256_set1_ps(crate::x86::f16_at(b)));
                let mins = _mm256_mul_ps(bytes(Q4K_MINS), _mm256_set1_ps(crate::x86::f16_at(b.add(2))));
                let mut q = [_mm512_setzero_si512(); 4];
                for half in 0..2 {
                    let v = _mm512_loadu_si512(b.add(quants + 64 * half) as *const __m512i);
                    let mut lo = _mm512_and_si512(v, m4);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m4);
                    if HIGH {
                        let h = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(Q5K_HIGH) as *const __m256i));
                        // Bits 4c, 4c + 2 (low nibbles) and 4c + 1, 4c + 3 (high) of this half's
                        // two steps c = 2 * half, 2 * half + 1, moved to bit 4.
                        let (l, hh) = if half == 0 {
                            (_mm512_sllv_epi16(h, shifts(4, 2)), _mm512_sllv_epi16(h, shifts(3, 1)))
                        } else {
                            (_mm512_srlv_epi16(h, shifts(0, 2)), _mm512_srlv_epi16(h, shifts(1, 3)))
                        };
                        lo = _mm512_or_si512(lo, _mm512_and_si512(l, sixteen));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(hh, sixteen));
                    }
                    q[2 * half] = lo;
                    q[2 * half + 1] = hi;
                }
                for t in 0..T {
                    let scale = _mm512_castps256_ps512(_mm256_mul_ps(sc, dact[t]));
                    let mut sum = acc[r][t];
                    for k in 0..4 {
                        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], x[t][k]);
                        let lanes = _mm512_permutexvar_ps(picks[k], scale);
                        sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), lanes, sum);
                    }
                    let m = _mm512_castps256_ps512(_mm256_mul_ps(mins, asum[t]));
                    acc[r][t] = _mm512_sub_ps(sum, _mm512_maskz_mov_ps(0x00ff, m));
                }
            }
        }
        acc.map(|row| row.map(|v| _mm512_reduce_add_ps(v)))
    }

    /// Rows `r0..r1` of a whole matrix `w` (`KIND`, `nb` blocks per row) against all `n`
    /// activation rows of `a` (quantized with the second plane when `FINE`), each output given
    /// to `put(token, row, value)`.
    ///
    /// # Safety
    /// As [`int_vnni`], for rows `r0..r1` of `w` and `n` activation rows.
    pub(crate) unsafe fn rows_into<const FINE: bool, const KIND: u8>(
        w: &IntRows<'_>,
        a: &crate::QuantizedActs,
        nb: usize,
        n: usize,
        range: (usize, usize),
        put: impl FnMut(usize, usize, f32),
    ) {
        let bytes = if KIND == Q8_0 { 32 } else { 16 };
        let from = |r: usize| IntRows {
            wd: &w.wd[r * nb..],
            wm: w.wm.get(r * nb..).unwrap_or(&[]),
            wq: &w.wq[r * nb * bytes..],
            wh: w.wh.get(r * nb..).unwrap_or(&[]),
        };
        let tile = |r: usize, four: bool, x: &[Q8Row<'_>]| {
            let rows = from(r);
            let mut out = [[0f32; 4]; 4];
            match (four, x.first_chunk::<4>()) {
                (true, Some(x)) => out = int_vnni::<4, 4, FINE, KIND>(&rows, x, nb),
                (false, Some(x)) => out[0] = int_vnni::<1, 4, FINE, KIND>(&rows, x, nb)[0],
                (true, None) => {
                    let v = int_vnni::<4, 1, FINE, KIND>(&rows, &[x[0]], nb);
                    (0..4).for_each(|k| out[k][0] = v[k][0]);
                }
                (false, None) => out[0][0] = int_vnni::<1, 1, FINE, KIND>(&rows, &[x[0]], nb)[0][0],
            }
            out
        };
        tiles_into(a, nb, FINE, n, range, tile, put);
    }

    /// Rows `r0..r1` of a Q4_K, Q5_K or Q6_K matrix (`w` its whole bytes, `row_bytes` per
    /// row, `nsb` super-blocks) against all `n` activation rows of `a` (one plane), as
    /// [`rows_into`].
    ///
    /// # Safety
    /// As [`q4k_vnni`] and [`q6k_vnni`], for rows `r0..r1` of `w` and `n` activation rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn k_rows_into(
        format: crate::WeightFormat,
        w: &[u8],
        row_bytes: usize,
        a: &crate::QuantizedActs,
        nsb: usize,
        n: usize,
        range: (usize, usize),
        put: impl FnMut(usize, usize, f32),
    ) {
        use crate::WeightFormat::{Q4K, Q5K};
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")]
        unsafe fn run<const R: usize, const T: usize>(
            format: crate::WeightFormat,
            rows: &[u8],
            row_bytes: usize,
            x: &[Q8Row<'_>; T],
            nsb: usize,
        ) -> [[f32; T]; R] {
            match format {
                Q4K => q4k_vnni::<R, T, false>(rows, row_bytes, x, nsb),
                Q5K => q4k_vnni::<R, T, true>(rows, row_bytes, x, nsb),
                _ => q6k_vnni::<R, T>(rows, row_bytes, x, nsb),
            }
        }
        let tile = |r: usize, four: bool, x: &[Q8Row<'_>]| {
            let rows = &w[r * row_bytes..];
            let mut out = [[0f32; 4]; 4];
            match (four, x.first_chunk::<4>()) {
                (true, Some(x)) => out = run::<4, 4>(format, rows, row_bytes, x, nsb),
                (false, Some(x)) => out[0] = run::<1, 4>(format, rows, row_bytes, x, nsb)[0],
                (true, None) => {
                    let v = run::<4, 1>(format, rows, row_bytes, &[x[0]], nsb);
                    (0..4).for_each(|k| out[k][0] = v[k][0]);
                }
                (false, None) => out[0][0] = run::<1, 1>(format, rows, row_bytes, &[x[0]], nsb)[0][0],
            }
            out
        };
        tiles_into(a, nsb * 8, false, n, range, tile, put);
    }

    /// Rows `r0..r1` for all `n` activation rows of `a` (`nb` blocks each) through `tile(row,
    /// four, x)`, which computes rows `row..row + 4` (or only `row`) against the activation
    /// rows `x` (four, or one) as `out[row][token]`. Four rows at a time for a block of 32
    /// tokens, four tokens at a time within it: the four rows stay in the nearest cache while
    /// the block's activations stream past. The kernel is chosen once per task, not once per
    /// tile (on the default model's small matrices that choice and its argument copies cost a
    /// seventh of a decode step).
    #[inline]
    unsafe fn tiles_into(
        a: &crate::QuantizedActs,
        nb: usize,
        fine: bool,
        n: usize,
        (r0, r1): (usize, usize),
        mut tile: impl FnMut(usize, bool, &[Q8Row<'_>]) -> [[f32; 4]; 4],
        mut put: impl FnMut(usize, usize, f32),
    ) {
        const TOKENS: usize = 32;
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + TOKENS).min(n);
            let acts: [Q8Row<'_>; TOKENS] =
                std::array::from_fn(|k| crate::q8_row(a, (t0 + k).min(t1 - 1), nb, fine));
            let quads = (t1 - t0) / 4;
            let mut r = r0;
            while r < r1 {
                let (four, count) = if r + 4 <= r1 { (true, 4) } else { (false, 1) };
                for q in 0..quads {
                    let (t, v) = (t0 + 4 * q, tile(r, four, &acts[4 * q..4 * q + 4]));
                    for k in 0..count {
                        for j in 0..4 {
                            put(t + j, r + k, v[k][j]);
                        }
                    }
                }
                for t in t0 + 4 * quads..t1 {
                    let v = tile(r, four, &acts[t - t0..t - t0 + 1]);
                    for k in 0..count {
                        put(t, r + k, v[k][0]);
                    }
                }
                r += count;
            }
            t0 = t1;
        }
    }

}
