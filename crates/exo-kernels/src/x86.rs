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

/// The 32 nibbles of one block as 32 unsigned bytes in element order.
#[target_feature(enable = "avx2,fma")]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let mask = _mm_set1_epi8(0x0f);
    let nib = _mm_loadu_si128(p as *const __m128i);
    let lo = _mm_and_si128(nib, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(nib, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// Q4_0 (`offset = true`, minimum unused) or Q4_1 weights against Q8 activations.
///
/// # Safety
/// The CPU must support AVX2 and FMA; slices must hold `nb` blocks.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_q4_avx2(r: &RowArgs<'_>, nb: usize, offset: bool) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut extra = 0f32;
    for b in 0..nb {
        let w = unpack_nibbles(r.wq.as_ptr().add(b * 16));
        let a = _mm256_loadu_si256(r.aq.as_ptr().add(b * 32) as *const __m256i);
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), ones);
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(p),
            _mm256_set1_ps(r.wd[b] * r.ad[b]),
            acc,
        );
        extra += if offset {
            -8.0 * r.wd[b] * r.asum[b]
        } else {
            r.wm[b] * r.asum[b]
        };
    }
    hsum256(acc) + extra
}

/// Q8_0 weights against Q8 activations.
///
/// # Safety
/// The CPU must support AVX2 and FMA; slices must hold `nb` blocks.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_q8_avx2(r: &RowArgs<'_>, nb: usize) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let wq = r.wq.as_ptr() as *const i8;
    for b in 0..nb {
        let w = _mm256_loadu_si256(wq.add(b * 32) as *const __m256i);
        let a = _mm256_loadu_si256(r.aq.as_ptr().add(b * 32) as *const __m256i);
        // maddubs needs one unsigned operand: move w's sign onto a.
        let p = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)),
            ones,
        );
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(p),
            _mm256_set1_ps(r.wd[b] * r.ad[b]),
            acc,
        );
    }
    hsum256(acc)
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

/// f16 weights against f32 activations (F16C conversion).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` and `x` have the same length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_avx2(w: &[half::f16], x: &[f32]) -> f32 {
    let n = w.len().min(x.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(w.as_ptr().add(i) as *const __m128i);
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x.as_ptr().add(i)), acc);
        i += 8;
    }
    let mut s = hsum256(acc);
    while i < n {
        s += w[i].to_f32() * x[i];
        i += 1;
    }
    s
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn hsum512(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

/// Two blocks' scales, one per 256-bit half.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
unsafe fn scales2(s0: f32, s1: f32) -> __m512 {
    _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1)
}

/// As [`dot_q4_avx2`], two blocks per step with VNNI's `vpdpbusd`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VNNI; slices must hold `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot_q4_avx512(r: &RowArgs<'_>, nb: usize, offset: bool) -> f32 {
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = _mm512_setzero_ps();
    let mut extra = 0f32;
    let mut b = 0;
    while b + 2 <= nb {
        // 32 bytes: the nibbles of blocks b and b+1.
        let nib = _mm256_loadu_si256(r.wq.as_ptr().add(b * 16) as *const __m256i);
        let lo = _mm256_and_si256(nib, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16(nib, 4), mask);
        let first = _mm256_permute2x128_si256(lo, hi, 0x20);
        let second = _mm256_permute2x128_si256(lo, hi, 0x31);
        let w = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
        let a = _mm512_loadu_si512(r.aq.as_ptr().add(b * 32) as *const __m512i);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
        let s = scales2(r.wd[b] * r.ad[b], r.wd[b + 1] * r.ad[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
        for k in b..b + 2 {
            extra += if offset {
                -8.0 * r.wd[k] * r.asum[k]
            } else {
                r.wm[k] * r.asum[k]
            };
        }
        b += 2;
    }
    let mut total = hsum512(acc) + extra;
    if b < nb {
        let tail = RowArgs {
            wd: &r.wd[b..],
            wm: if offset { r.wm } else { &r.wm[b..] },
            wq: &r.wq[b * 16..],
            ad: &r.ad[b..],
            asum: &r.asum[b..],
            aq: &r.aq[b * 32..],
        };
        total += dot_q4_avx2(&tail, nb - b, offset);
    }
    total
}

/// As [`dot_q8_avx2`], two blocks per step with VNNI.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/DQ/VNNI; slices must hold `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
pub(crate) unsafe fn dot_q8_avx512(r: &RowArgs<'_>, nb: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let wq = r.wq.as_ptr() as *const i8;
    let mut b = 0;
    while b + 2 <= nb {
        let w = _mm512_loadu_si512(wq.add(b * 32) as *const __m512i);
        let a = _mm512_loadu_si512(r.aq.as_ptr().add(b * 32) as *const __m512i);
        // vpdpbusd needs one unsigned operand: |w| against a with w's sign.
        let aw = _mm512_abs_epi8(w);
        let neg = _mm512_movepi8_mask(w);
        let sa = _mm512_mask_sub_epi8(a, neg, _mm512_setzero_si512(), a);
        let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sa);
        let s = scales2(r.wd[b] * r.ad[b], r.wd[b + 1] * r.ad[b + 1]);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
        b += 2;
    }
    let mut total = hsum512(acc);
    if b < nb {
        let tail = RowArgs {
            wd: &r.wd[b..],
            wm: r.wm,
            wq: &r.wq[b * 32..],
            ad: &r.ad[b..],
            asum: &r.asum[b..],
            aq: &r.aq[b * 32..],
        };
        total += dot_q8_avx2(&tail, nb - b);
    }
    total
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
