//! x86-64 SIMD kernels: AVX2 + FMA, and AVX-512 with VNNI. Each function computes one dot
//! product of a weight row with an activation row, exactly as `scalar::dot` does (the order of
//! float additions differs, so results agree to rounding).
//!
//! Only plain AVX2/AVX-512 instructions are used. AMX is never used: this machine's CPU
//! advertises it, but AMX instructions fault here.

#![allow(unsafe_op_in_unsafe_fn, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::{BlockKind, RowArgs};

#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum256(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// f32 weights against f32 activations.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `w` and `x` have the same length.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(
            _mm256_loadu_ps(w.as_ptr().add(i)),
            _mm256_loadu_ps(x.as_ptr().add(i)),
            acc0,
        );
        acc1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(w.as_ptr().add(i + 8)),
            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
            acc1,
        );
        i += 16;
    }
    let mut s = hsum256(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += w[i] * x[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn hsum512(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// One weight row of 4-bit blocks (`offset`: Q4_0, else Q4_1) against f32 activations with
/// their per-block sums, for projections whose inputs have outliers 8-bit blocks would flatten.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `nb * 32` values and `xsum` `nb` sums.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_q4_f32_avx2(
    r: &RowArgs<'_>,
    x: &[f32],
    xsum: &[f32],
    nb: usize,
    offset: bool,
) -> f32 {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    for b in 0..nb {
        let nib = _mm_loadu_si128(r.wq.as_ptr().add(b * 16) as *const __m128i);
        let lo = _mm_and_si128(nib, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
        let xp = x.as_ptr().add(b * 32);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        let mut t = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp));
        t = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xp.add(8)), t);
        t = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xp.add(16)), t);
        t = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xp.add(24)), t);
        acc = _mm256_fmadd_ps(t, _mm256_set1_ps(r.wd[b]), acc);
        extra += if offset { -8.0 * r.wd[b] } else { r.wm[b] } * xsum[b];
    }
    hsum256(acc) + extra
}

/// Q8_0 weights against f32 activations.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` holds `nb * 32` values.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_q8_f32_avx2(r: &RowArgs<'_>, x: &[f32], nb: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let wq = r.wq.as_ptr();
    for b in 0..nb {
        let xp = x.as_ptr().add(b * 32);
        let mut t = _mm256_setzero_ps();
        for k in 0..4 {
            let q = _mm_loadl_epi64(wq.add(b * 32 + k * 8) as *const __m128i);
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            t = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(k * 8)), t);
        }
        acc = _mm256_fmadd_ps(t, _mm256_set1_ps(r.wd[b]), acc);
    }
    hsum256(acc)
}

/// `sum_b a[b] * b[b]` for short per-block vectors (scales against block sums).
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_short(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_avx2(a, b)
}

/// As [`dot_q4_f32_avx2`], sixteen lanes at a time, two blocks per step on separate
/// accumulators so that consecutive blocks do not wait on each other's FMA.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ; `x` holds `nb * 32` values and `xsum` `nb` sums.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot_q4_f32_avx512(
    r: &RowArgs<'_>,
    x: &[f32],
    xsum: &[f32],
    nb: usize,
    offset: bool,
) -> f32 {
    let mask = _mm_set1_epi8(0x0f);
    let block = |b: usize| -> __m512 {
        let nib = _mm_loadu_si128(r.wq.as_ptr().add(b * 16) as *const __m128i);
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(nib, mask)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
            _mm_srli_epi16(nib, 4),
            mask,
        )));
        let xp = x.as_ptr().add(b * 32);
        _mm512_fmadd_ps(
            hi,
            _mm512_loadu_ps(xp.add(16)),
            _mm512_mul_ps(lo, _mm512_loadu_ps(xp)),
        )
    };
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut b = 0;
    while b + 2 <= nb {
        acc0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(r.wd[b]), acc0);
        acc1 = _mm512_fmadd_ps(block(b + 1), _mm512_set1_ps(r.wd[b + 1]), acc1);
        b += 2;
    }
    if b < nb {
        acc0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(r.wd[b]), acc0);
    }
    // The offset term: sum_b m_b * xsum_b (Q4_1), or -8 * sum_b d_b * xsum_b (Q4_0).
    let extra = if offset {
        -8.0 * dot_short(&r.wd[..nb], &xsum[..nb])
    } else {
        dot_short(&r.wm[..nb], &xsum[..nb])
    };
    hsum512(_mm512_add_ps(acc0, acc1)) + extra
}

/// As [`dot_q8_f32_avx2`], sixteen lanes at a time, two blocks per step.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ; `x` holds `nb * 32` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot_q8_f32_avx512(r: &RowArgs<'_>, x: &[f32], nb: usize) -> f32 {
    let wq = r.wq.as_ptr();
    let block = |b: usize| -> __m512 {
        let xp = x.as_ptr().add(b * 32);
        let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            wq.add(b * 32) as *const __m128i
        )));
        let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            wq.add(b * 32 + 16) as *const __m128i
        )));
        _mm512_fmadd_ps(
            w1,
            _mm512_loadu_ps(xp.add(16)),
            _mm512_mul_ps(w0, _mm512_loadu_ps(xp)),
        )
    };
    let mut acc0 = _mm512_setzero_ps();
    let mut acc1 = _mm512_setzero_ps();
    let mut b = 0;
    while b + 2 <= nb {
        acc0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(r.wd[b]), acc0);
        acc1 = _mm512_fmadd_ps(block(b + 1), _mm512_set1_ps(r.wd[b + 1]), acc1);
        b += 2;
    }
    if b < nb {
        acc0 = _mm512_fmadd_ps(block(b), _mm512_set1_ps(r.wd[b]), acc0);
    }
    hsum512(_mm512_add_ps(acc0, acc1))
}

/// Four consecutive rows of a 4-bit matrix against one f32 activation row: the activation
/// loads are shared and the four rows' FMA chains run side by side.
///
/// `wd`/`wm` hold the four rows' scales (`4 * nb`), `wq` their nibbles (`4 * nb * 16`).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ; slices hold four rows of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot4_q4_f32_avx512(
    r: &RowArgs<'_>,
    x: &[f32],
    xsum: &[f32],
    nb: usize,
    offset: bool,
) -> [f32; 4] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [_mm512_setzero_ps(); 4];
    for b in 0..nb {
        let xp = x.as_ptr().add(b * 32);
        let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
        // Four row streams are more than the hardware prefetcher follows well: ask for each
        // row's cache line 8 blocks (two lines) ahead, once per line.
        if b % 4 == 0 {
            for k in 0..4 {
                let ahead = (k * nb + b + 8) * 16;
                if ahead < r.wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(r.wq.as_ptr().add(ahead) as *const i8);
                }
            }
        }
        for (k, a) in acc.iter_mut().enumerate() {
            let i = k * nb + b;
            let nib = _mm_loadu_si128(r.wq.as_ptr().add(i * 16) as *const __m128i);
            let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(nib, mask)));
            let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                _mm_srli_epi16(nib, 4),
                mask,
            )));
            let t = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
            *a = _mm512_fmadd_ps(t, _mm512_set1_ps(r.wd[i]), *a);
        }
    }
    let mut out = [0f32; 4];
    for (k, o) in out.iter_mut().enumerate() {
        let scales = &r.wd[k * nb..(k + 1) * nb];
        let extra = if offset {
            -8.0 * dot_short(scales, &xsum[..nb])
        } else {
            dot_short(&r.wm[k * nb..(k + 1) * nb], &xsum[..nb])
        };
        *o = hsum512(acc[k]) + extra;
    }
    out
}

/// Four consecutive rows of a Q8_0 matrix against one f32 activation row.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ; slices hold four rows of `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot4_q8_f32_avx512(r: &RowArgs<'_>, x: &[f32], nb: usize) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let wq = r.wq.as_ptr();
    for b in 0..nb {
        let xp = x.as_ptr().add(b * 32);
        let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
        if b % 2 == 0 {
            for k in 0..4 {
                let ahead = (k * nb + b + 4) * 32;
                if ahead < r.wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(wq.add(ahead) as *const i8);
                }
            }
        }
        for (k, a) in acc.iter_mut().enumerate() {
            let i = k * nb + b;
            let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                wq.add(i * 32) as *const __m128i
            )));
            let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                wq.add(i * 32 + 16) as *const __m128i
            )));
            let t = _mm512_fmadd_ps(w1, x1, _mm512_mul_ps(w0, x0));
            *a = _mm512_fmadd_ps(t, _mm512_set1_ps(r.wd[i]), *a);
        }
    }
    let mut out = [0f32; 4];
    for (k, o) in out.iter_mut().enumerate() {
        *o = hsum512(acc[k]);
    }
    out
}

/// Four rows against four activation rows (prefill): each weight block is unpacked once and
/// used for all four tokens. Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ; `r` holds four rows of `nb` blocks, each `x[t]`
/// `nb * 32` values and each `xsum[t]` `nb` sums.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot4x4_f32_avx512(
    r: &RowArgs<'_>,
    x: [&[f32]; 4],
    xsum: [&[f32]; 4],
    nb: usize,
    kind: BlockKind,
) -> [[f32; 4]; 4] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    for b in 0..nb {
        let mut xs = [[_mm512_setzero_ps(); 2]; 4];
        for (t, xt) in xs.iter_mut().enumerate() {
            let xp = x[t].as_ptr().add(b * 32);
            *xt = [_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16))];
        }
        for (k, row_acc) in acc.iter_mut().enumerate() {
            let i = k * nb + b;
            let (lo, hi) = match kind {
                BlockKind::Q4 { .. } => {
                    let nib = _mm_loadu_si128(r.wq.as_ptr().add(i * 16) as *const __m128i);
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(nib, mask))),
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(
                            _mm_srli_epi16(nib, 4),
                            mask,
                        ))),
                    )
                }
                BlockKind::Q8 => {
                    let p = r.wq.as_ptr().add(i * 32);
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            p as *const __m128i,
                        ))),
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            p.add(16) as *const __m128i
                        ))),
                    )
                }
            };
            let d = _mm512_set1_ps(r.wd[i]);
            for (t, a) in row_acc.iter_mut().enumerate() {
                let v = _mm512_fmadd_ps(hi, xs[t][1], _mm512_mul_ps(lo, xs[t][0]));
                *a = _mm512_fmadd_ps(v, d, *a);
            }
        }
    }
    let mut out = [[0f32; 4]; 4];
    for k in 0..4 {
        for t in 0..4 {
            let extra = match kind {
                BlockKind::Q4 { offset: true } => {
                    -8.0 * dot_short(&r.wd[k * nb..(k + 1) * nb], &xsum[t][..nb])
                }
                BlockKind::Q4 { offset: false } => {
                    dot_short(&r.wm[k * nb..(k + 1) * nb], &xsum[t][..nb])
                }
                BlockKind::Q8 => 0.0,
            };
            out[k][t] = hsum512(acc[k][t]) + extra;
        }
    }
    out
}

/// Bytes of a repacked Q4_K super-block, and where its parts start (see `Storage::Q4K`); the
/// AVX2 8-bit, VNNI and panel kernels read the same layouts through these.
const Q4K_BYTES: usize = crate::matrix::Q4K_PACKED;
pub(crate) const Q4K_SCALES: usize = 4;
pub(crate) const Q4K_MINS: usize = 12;
const Q4K_QUANTS: usize = 20;
/// A repacked Q5_K super-block: Q4_K's header, then 32 bytes of fifth bits, then the quants.
const Q5K_BYTES: usize = crate::matrix::Q5K_PACKED;
pub(crate) const Q5K_HIGH: usize = 20;
const Q5K_QUANTS: usize = 52;

/// Bytes per super-block and offset of the quants of a repacked Q4_K (`HIGH = false`) or
/// Q5_K super-block.
pub(crate) const fn k_layout(high: bool) -> (usize, usize) {
    if high {
        (Q5K_BYTES, Q5K_QUANTS)
    } else {
        (Q4K_BYTES, Q4K_QUANTS)
    }
}
/// Bytes of a Q6_K super-block, and where its parts start (ggml's layout).
pub(crate) const Q6K_BYTES: usize = 210;
pub(crate) const Q6K_HIGH: usize = 128;
pub(crate) const Q6K_SCALES: usize = 192;
pub(crate) const Q6K_D: usize = 208;

/// The f16 at `p` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = std::ptr::read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The minimum part of `R` rows of a Q4_K (`HIGH = false`) or Q5_K matrix against `T`
/// activation rows:
/// `sum over super-blocks s, sub-blocks j of dmin_s * min_sj * xsum_sj`, which the caller
/// subtracts from the scale part.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` holds `R` rows of `nsb` repacked super-blocks,
/// `row_bytes` apart, and each `xsum[t]` holds `nsb * 8` block sums.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_mins<const R: usize, const T: usize, const HIGH: bool>(
    w: &[u8],
    row_bytes: usize,
    xsum: [&[f32]; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let (block, _) = k_layout(HIGH);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for s in 0..nsb {
        for (r, row_acc) in acc.iter_mut().enumerate() {
            let b = w.as_ptr().add(r * row_bytes + s * block);
            let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                b.add(Q4K_MINS) as *const __m128i
            )));
            let m = _mm256_mul_ps(m, _mm256_set1_ps(f16_at(b.add(2))));
            for (t, a) in row_acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(m, _mm256_loadu_ps(xsum[t].as_ptr().add(s * 8)), *a);
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

/// `R` consecutive rows of a Q4_K (`HIGH = false`) or Q5_K matrix (repacked super-blocks,
/// `row_bytes` apart) against `T` f32 activation rows, sixteen lanes at a time: each sub-block's
/// quants are widened to floats and scaled once, then used for every token. Returns
/// `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ, AVX2, FMA and F16C; `w` holds `R` rows of `nsb`
/// super-blocks, each `x[t]` `nsb * 256` values and each `xsum[t]` `nsb * 8` block sums.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q4k_avx512<const R: usize, const T: usize, const HIGH: bool>(
    w: &[u8],
    row_bytes: usize,
    x: [&[f32]; T],
    xsum: [&[f32]; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let (block, quants) = k_layout(HIGH);
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut scales = [[0f32; 8]; R];
    for s in 0..nsb {
        for (r, sc) in scales.iter_mut().enumerate() {
            let b = w.as_ptr().add(r * row_bytes + s * block);
            // The next super-block of each row is ~150 bytes on: ask for it one block ahead.
            if s + 1 < nsb {
                for line in (64..=block).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(block + line) as *const i8);
                }
            }
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                b.add(Q4K_SCALES) as *const __m128i
            )));
            _mm256_storeu_ps(sc.as_mut_ptr(), _mm256_mul_ps(v, _mm256_set1_ps(f16_at(b))));
        }
        for j in 0..8 {
            let e = s * 256 + j * 32;
            let mut xs = [[_mm512_setzero_ps(); 2]; T];
            for (t, xt) in xs.iter_mut().enumerate() {
                let p = x[t].as_ptr().add(e);
                *xt = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            }
            for r in 0..R {
                let b = w.as_ptr().add(r * row_bytes + s * block);
                let q = _mm256_loadu_si256(b.add(quants + (j / 2) * 32) as *const __m256i);
                let mut v = if j % 2 == 0 {
                    _mm256_and_si256(q, mask)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), mask)
                };
                if HIGH {
                    // Bit `j` of each high byte, as 16.
                    let bit = _mm256_set1_epi8(1 << j);
                    let h = _mm256_loadu_si256(b.add(Q5K_HIGH) as *const __m256i);
                    let h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
                    v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(16)));
                }
                let sc = _mm512_set1_ps(scales[r][j]);
                let w0 = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(v))),
                    sc,
                );
                let w1 = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(v, 1))),
                    sc,
                );
                for (t, xt) in xs.iter().enumerate() {
                    acc[r][t] = _mm512_fmadd_ps(w1, xt[1], _mm512_fmadd_ps(w0, xt[0], acc[r][t]));
                }
            }
        }
    }
    let mins = q4k_mins::<R, T, HIGH>(w, row_bytes, xsum, nsb);
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum512(acc[r][t]) - mins[r][t];
        }
    }
    out
}

/// Four groups of eight unsigned bytes of `v` (32 bytes) widened to floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_u8x32(v: __m256i) -> [__m256; 4] {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let f = |q: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    [
        f(lo),
        f(_mm_srli_si128(lo, 8)),
        f(hi),
        f(_mm_srli_si128(hi, 8)),
    ]
}

/// Four groups of eight signed bytes of `v` (32 bytes) widened to floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn widen_i8x32(v: __m256i) -> [__m256; 4] {
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let f = |q: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    [
        f(lo),
        f(_mm_srli_si128(lo, 8)),
        f(hi),
        f(_mm_srli_si128(hi, 8)),
    ]
}

/// `sum_k w[k] * x[8k..8k + 8]` over `K` groups of eight lanes starting at `x`.
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_groups<const K: usize>(w: &[__m256; K], x: *const f32) -> __m256 {
    let mut t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
    for (k, wk) in w.iter().enumerate().skip(1) {
        t = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(x.add(8 * k)), t);
    }
    t
}

/// As [`q4k_avx512`] (Q4_K, or Q5_K with `HIGH`), eight lanes at a time: each sub-block's
/// 32 weights are widened once, dotted with every token's values, and the sum scaled once.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; slices as for [`q4k_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q4k_avx2<const R: usize, const T: usize, const HIGH: bool>(
    w: &[u8],
    row_bytes: usize,
    x: [&[f32]; T],
    xsum: [&[f32]; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let (block, quants) = k_layout(HIGH);
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut scales = [[0f32; 8]; R];
    for s in 0..nsb {
        for (r, sc) in scales.iter_mut().enumerate() {
            let b = w.as_ptr().add(r * row_bytes + s * block);
            if s + 1 < nsb {
                for line in (64..=block).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(block + line) as *const i8);
                }
            }
            let v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                b.add(Q4K_SCALES) as *const __m128i
            )));
            _mm256_storeu_ps(sc.as_mut_ptr(), _mm256_mul_ps(v, _mm256_set1_ps(f16_at(b))));
        }
        for j in 0..8 {
            let e = s * 256 + j * 32;
            for r in 0..R {
                let b = w.as_ptr().add(r * row_bytes + s * block);
                let q = _mm256_loadu_si256(b.add(quants + (j / 2) * 32) as *const __m256i);
                let mut v = if j % 2 == 0 {
                    _mm256_and_si256(q, mask)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), mask)
                };
                if HIGH {
                    let bit = _mm256_set1_epi8(1 << j);
                    let h = _mm256_loadu_si256(b.add(Q5K_HIGH) as *const __m256i);
                    let h = _mm256_cmpeq_epi8(_mm256_and_si256(h, bit), bit);
                    v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi8(16)));
                }
                let wv = widen_u8x32(v);
                let sc = _mm256_set1_ps(scales[r][j]);
                for t in 0..T {
                    let d = dot_groups(&wv, x[t].as_ptr().add(e));
                    acc[r][t] = _mm256_fmadd_ps(d, sc, acc[r][t]);
                }
            }
        }
    }
    let mins = q4k_mins::<R, T, HIGH>(w, row_bytes, xsum, nsb);
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum256(acc[r][t]) - mins[r][t];
        }
    }
    out
}

/// The 32 six-bit quants (minus 32, as signed bytes) of group `g` (0..4) of one half of a
/// Q6_K super-block, from its 64 low-bit bytes at `ql` and 32 high-bit bytes at `qh`.
#[target_feature(enable = "avx2,fma")]
unsafe fn q6k_group(ql: *const u8, qh: *const u8, g: usize) -> __m256i {
    _mm256_sub_epi8(q6k_unsigned(ql, qh, g), _mm256_set1_epi8(32))
}

/// The 32 six-bit quants (0..63, unsigned) of group `g` (0..4) of one half of a Q6_K
/// super-block, from its 64 low-bit bytes at `ql` and 32 high-bit bytes at `qh`.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn q6k_unsigned(ql: *const u8, qh: *const u8, g: usize) -> __m256i {
    let low = _mm256_loadu_si256(ql.add((g & 1) * 32) as *const __m256i);
    let high = _mm256_loadu_si256(qh as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0f);
    let m2 = _mm256_set1_epi8(0x30);
    let low = if g < 2 {
        _mm256_and_si256(low, m4)
    } else {
        _mm256_and_si256(_mm256_srli_epi16(low, 4), m4)
    };
    // Bits 2g..2g+2 of each high byte, moved to bits 4..6.
    let high = match g {
        0 => _mm256_and_si256(_mm256_slli_epi16(high, 4), m2),
        1 => _mm256_and_si256(_mm256_slli_epi16(high, 2), m2),
        2 => _mm256_and_si256(high, m2),
        _ => _mm256_and_si256(_mm256_srli_epi16(high, 2), m2),
    };
    _mm256_or_si256(low, high)
}

/// `R` consecutive rows of a Q6_K matrix (ggml's super-blocks, `row_bytes` apart) against `T`
/// f32 activation rows, sixteen lanes at a time (one lane group per 16-element scale).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ, AVX2, FMA and F16C; `w` holds `R` rows of `nsb`
/// super-blocks and each `x[t]` `nsb * 256` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn q6k_avx512<const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    x: [&[f32]; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut scales = [[0f32; 16]; R];
    for s in 0..nsb {
        for (r, sc) in scales.iter_mut().enumerate() {
            let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
            if s + 1 < nsb {
                for line in [64, 128, 192, 256] {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(Q6K_BYTES + line - 64) as *const i8);
                }
            }
            let v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                b.add(Q6K_SCALES) as *const __m128i
            )));
            _mm512_storeu_ps(
                sc.as_mut_ptr(),
                _mm512_mul_ps(v, _mm512_set1_ps(f16_at(b.add(Q6K_D)))),
            );
        }
        for h in 0..2 {
            for g in 0..4 {
                let e = s * 256 + h * 128 + g * 32;
                let mut xs = [[_mm512_setzero_ps(); 2]; T];
                for (t, xt) in xs.iter_mut().enumerate() {
                    let p = x[t].as_ptr().add(e);
                    *xt = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
                }
                for r in 0..R {
                    let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
                    let q = q6k_group(b.add(h * 64), b.add(Q6K_HIGH + h * 32), g);
                    let k = h * 8 + g * 2;
                    let w0 = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))),
                        _mm512_set1_ps(scales[r][k]),
                    );
                    let w1 = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))),
                        _mm512_set1_ps(scales[r][k + 1]),
                    );
                    for (t, xt) in xs.iter().enumerate() {
                        acc[r][t] =
                            _mm512_fmadd_ps(w1, xt[1], _mm512_fmadd_ps(w0, xt[0], acc[r][t]));
                    }
                }
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum512(acc[r][t]);
        }
    }
    out
}

/// As [`q6k_avx512`], eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; slices as for [`q6k_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k_avx2<const R: usize, const T: usize>(
    w: &[u8],
    row_bytes: usize,
    x: [&[f32]; T],
    nsb: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut scales = [[0f32; 16]; R];
    for s in 0..nsb {
        for (r, sc) in scales.iter_mut().enumerate() {
            let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
            if s + 1 < nsb {
                for line in [64, 128, 192, 256] {
                    _mm_prefetch::<_MM_HINT_T0>(b.add(Q6K_BYTES + line - 64) as *const i8);
                }
            }
            let d = _mm256_set1_ps(f16_at(b.add(Q6K_D)));
            let raw = _mm_loadu_si128(b.add(Q6K_SCALES) as *const __m128i);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
            _mm256_storeu_ps(sc.as_mut_ptr(), _mm256_mul_ps(lo, d));
            _mm256_storeu_ps(sc.as_mut_ptr().add(8), _mm256_mul_ps(hi, d));
        }
        for h in 0..2 {
            for g in 0..4 {
                let e = s * 256 + h * 128 + g * 32;
                let k = h * 8 + g * 2;
                for r in 0..R {
                    let b = w.as_ptr().add(r * row_bytes + s * Q6K_BYTES);
                    let q = q6k_group(b.add(h * 64), b.add(Q6K_HIGH + h * 32), g);
                    let [w0, w1, w2, w3] = widen_i8x32(q);
                    let (s0, s1) = (
                        _mm256_set1_ps(scales[r][k]),
                        _mm256_set1_ps(scales[r][k + 1]),
                    );
                    for t in 0..T {
                        let p = x[t].as_ptr().add(e);
                        let d0 = dot_groups(&[w0, w1], p);
                        let d1 = dot_groups(&[w2, w3], p.add(16));
                        acc[r][t] = _mm256_fmadd_ps(d1, s1, _mm256_fmadd_ps(d0, s0, acc[r][t]));
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

/// `R` consecutive rows of a Q4_0, Q4_1 or Q8_0 matrix against `T` f32 activation rows (with
/// their per-block sums for the 4-bit offsets), eight lanes at a time: each block's weights are
/// widened once and dotted with every token's values. Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `r` holds `R` rows of `nb` blocks (`r.wm` too for
/// Q4_1), each `x[t]` `nb * 32` values and each `xsum[t]` `nb` sums.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn int_rows_avx2<const R: usize, const T: usize>(
    r: &RowArgs<'_>,
    x: [&[f32]; T],
    xsum: [&[f32]; T],
    nb: usize,
    kind: BlockKind,
) -> [[f32; T]; R] {
    let mask = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        for k in 0..R {
            let i = k * nb + b;
            let wv = match kind {
                BlockKind::Q4 { .. } => {
                    let p = r.wq.as_ptr().add(i * 16);
                    if b % 4 == 0 && (i + 8) * 16 < r.wq.len() {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(8 * 16) as *const i8);
                    }
                    let nib = _mm_loadu_si128(p as *const __m128i);
                    let lo = _mm_and_si128(nib, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
                    widen_u8x32(_mm256_set_m128i(hi, lo))
                }
                BlockKind::Q8 => {
                    let p = r.wq.as_ptr().add(i * 32);
                    if b % 2 == 0 && (i + 4) * 32 < r.wq.len() {
                        _mm_prefetch::<_MM_HINT_T0>(p.add(4 * 32) as *const i8);
                    }
                    widen_i8x32(_mm256_loadu_si256(p as *const __m256i))
                }
            };
            let d = _mm256_set1_ps(r.wd[i]);
            for t in 0..T {
                let s = dot_groups(&wv, x[t].as_ptr().add(b * 32));
                acc[k][t] = _mm256_fmadd_ps(s, d, acc[k][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for k in 0..R {
        for t in 0..T {
            let extra = match kind {
                BlockKind::Q4 { offset: true } => {
                    -8.0 * dot_short(&r.wd[k * nb..(k + 1) * nb], &xsum[t][..nb])
                }
                BlockKind::Q4 { offset: false } => {
                    dot_short(&r.wm[k * nb..(k + 1) * nb], &xsum[t][..nb])
                }
                BlockKind::Q8 => 0.0,
            };
            out[k][t] = hsum256(acc[k][t]) + extra;
        }
    }
    out
}

/// One row of a Q4_0, Q4_1 or Q8_0 matrix against eight f32 activation rows (prefill tiles and
/// batches on AVX2). Each block's 32 weights are widened and scaled once and serve all eight
/// tokens, whose sums stay in eight registers: with the four widened weights that is twelve of
/// AVX2's sixteen, where [`int_rows_avx2`]'s 2 x 4 tile (eight sums, four weights, the scale
/// and the group sum) spilled its sums to the stack on every block. Returns one value per token.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `wd` holds `nb` scales (`wm` too for Q4_1), `wq` the
/// row's `nb` blocks, each `x[t]` `nb * 32` values and each `xsum[t]` `nb` sums.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn int_row_x8_avx2(
    wd: &[f32],
    wm: &[f32],
    wq: &[u8],
    x: [&[f32]; 8],
    xsum: [&[f32]; 8],
    nb: usize,
    kind: BlockKind,
) -> [f32; 8] {
    let mask = _mm_set1_epi8(0x0f);
    let f = |q: __m128i, d: __m256| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q)), d);
    let s = |q: __m128i, d: __m256| _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    let mut acc = [_mm256_setzero_ps(); 8];
    for b in 0..nb {
        let d = _mm256_set1_ps(*wd.get_unchecked(b));
        let w = match kind {
            BlockKind::Q4 { .. } => {
                let p = wq.as_ptr().add(b * 16);
                if b % 4 == 0 && (b + 8) * 16 < wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(8 * 16) as *const i8);
                }
                let nib = _mm_loadu_si128(p as *const __m128i);
                let lo = _mm_and_si128(nib, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
                [
                    f(lo, d),
                    f(_mm_srli_si128(lo, 8), d),
                    f(hi, d),
                    f(_mm_srli_si128(hi, 8), d),
                ]
            }
            BlockKind::Q8 => {
                let p = wq.as_ptr().add(b * 32);
                if b % 2 == 0 && (b + 4) * 32 < wq.len() {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(4 * 32) as *const i8);
                }
                let lo = _mm_loadu_si128(p as *const __m128i);
                let hi = _mm_loadu_si128(p.add(16) as *const __m128i);
                [
                    s(lo, d),
                    s(_mm_srli_si128(lo, 8), d),
                    s(hi, d),
                    s(_mm_srli_si128(hi, 8), d),
                ]
            }
        };
        for t in 0..8 {
            let p = x[t].as_ptr().add(b * 32);
            let mut a = acc[t];
            for (k, wk) in w.iter().enumerate() {
                a = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(p.add(8 * k)), a);
            }
            acc[t] = a;
        }
    }
    let mut out = [0f32; 8];
    for t in 0..8 {
        let extra = match kind {
            BlockKind::Q4 { offset: true } => -8.0 * dot_short(&wd[..nb], &xsum[t][..nb]),
            BlockKind::Q4 { offset: false } => dot_short(&wm[..nb], &xsum[t][..nb]),
            BlockKind::Q8 => 0.0,
        };
        out[t] = hsum256(acc[t]) + extra;
    }
    out
}

/// Sixteen 16-bit floats at `p` as f32: f16 (`BF16 = false`) or bfloat16.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn half16<const BF16: bool>(p: *const u16) -> __m512 {
    let h = _mm256_loadu_si256(p as *const __m256i);
    if BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    } else {
        _mm512_cvtph_ps(h)
    }
}

/// Eight 16-bit floats at `p` as f32: f16 (`BF16 = false`) or bfloat16.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half8<const BF16: bool>(p: *const u16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    if BF16 {
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    } else {
        _mm256_cvtph_ps(h)
    }
}

/// The f32 value of one 16-bit float.
fn half1<const BF16: bool>(v: u16) -> f32 {
    if BF16 {
        half::bf16::from_bits(v).to_f32()
    } else {
        half::f16::from_bits(v).to_f32()
    }
}

/// `R` consecutive rows of an f16 (`BF16 = false`) or bfloat16 matrix (`cols` apart in `w`)
/// against `T` f32 activation rows: each 16 weights are widened once and used for every token.
/// Returns `out[row][token]`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ, AVX2, FMA and F16C; `w` holds `R` rows of `cols`
/// values and each `x[t]` `cols` values.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn half_rows_avx512<const R: usize, const T: usize, const BF16: bool>(
    w: &[u16],
    cols: usize,
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // Each row asks for its line at least 4 KiB ahead, rounded up to whole groups of `R` rows
    // (as the VNNI kernels do: 256 bytes ahead left decode waiting on memory, 8 against 12-15
    // Gweights/s on the 1B shape's matrices, one thread).
    let group = R * cols;
    let ahead = group * (2048usize).div_ceil(group.max(1));
    let mut i = 0;
    while i + 16 <= cols {
        let mut xs = [_mm512_setzero_ps(); T];
        for (t, v) in xs.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(x[t].as_ptr().add(i));
        }
        for r in 0..R {
            let p = w.as_ptr().add(r * cols + i);
            // Once per 64-byte line; a pointer past the matrix is never read.
            if i % 32 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(ahead) as *const i8);
            }
            let wv = half16::<BF16>(p);
            for (t, v) in xs.iter().enumerate() {
                acc[r][t] = _mm512_fmadd_ps(wv, *v, acc[r][t]);
            }
        }
        i += 16;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum512(acc[r][t]);
            for j in i..cols {
                s += half1::<BF16>(w[r * cols + j]) * x[t][j];
            }
            out[r][t] = s;
        }
    }
    out
}

/// As [`half_rows_avx512`], eight lanes at a time.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; slices as for [`half_rows_avx512`].
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn half_rows_avx2<const R: usize, const T: usize, const BF16: bool>(
    w: &[u16],
    cols: usize,
    x: [&[f32]; T],
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut i = 0;
    while i + 8 <= cols {
        for r in 0..R {
            let wv = half8::<BF16>(w.as_ptr().add(r * cols + i));
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t].as_ptr().add(i)), acc[r][t]);
            }
        }
        i += 8;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let mut s = hsum256(acc[r][t]);
            for j in i..cols {
                s += half1::<BF16>(w[r * cols + j]) * x[t][j];
            }
            out[r][t] = s;
        }
    }
    out
}
