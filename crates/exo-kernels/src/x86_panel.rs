//! AVX-512 VNNI kernels for two tokens or more (prefill, batches). Sixteen rows of a matrix are
//! unpacked into a *panel*: for each group of columns (32, or Q6_K's 16), `group / 4` vectors
//! whose lane `r` holds four consecutive quants of row `r` as unsigned bytes, and the group's
//! sixteen scales (and minimums) beside them. One `vpdpbusd` then multiplies sixteen rows by four
//! activation bytes broadcast from memory, and its sums come out one row per lane: per group of
//! 32 columns and token, eight `vpdpbusd` and three float instructions, where the four-row tiles
//! of [`crate::x86_vnni`] spend five other instructions on every two.
//!
//! The panel is built once per sixteen rows and serves every token, so the stored layout does
//! not change (decode keeps reading it): a task holds one panel (1.125 bytes per weight of its
//! sixteen rows, in the nearest caches) and the activations regrouped for it (one byte per
//! activation and a few words per token and group).
//!
//! An offset (Q4_0's 8, Q5_0's 16, Q6_K's 32, and the 128 that makes Q8_0's weights unsigned)
//! comes off as the integer sums' starting value, `-offset * sum(q_act)` of each token and group;
//! a minimum (Q4_1, Q5_1, Q4_K, Q5_K) as a float term, `min * d_act * sum(q_act)`.
//!
//! 16-bit floats take a panel of f32, one vector per column (sixteen rows widened once), and one
//! fused multiply-add per column and token against the activations as given.
//!
//! Every kernel here equals the integer math of `scalar::dot` up to the order of float additions.

#![allow(unsafe_op_in_unsafe_fn, clippy::needless_range_loop)]

use std::arch::x86_64::*;

use crate::WeightFormat;
use crate::x86::{Q4K_MINS, Q5K_HIGH, Q6K_BYTES, Q6K_D, Q6K_HIGH, Q6K_SCALES, k_layout};
use crate::x86_q8::{IntRows, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use crate::x86_vnni::vnni;

/// Rows per panel: one per 32-bit lane of a 512-bit register.
pub(crate) const ROWS: usize = 16;

/// Tokens per kernel call at most: sixteen accumulators beside a group's eight weight vectors
/// and its scales fill the 32 registers.
const TOKENS: usize = 16;

/// A matrix the panel kernels take, as stored.
pub(crate) enum Weights<'a> {
    /// Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 (`kind`, as `x86_q8` names them): `nb` blocks per row.
    Blocks {
        rows: IntRows<'a>,
        kind: u8,
        nb: usize,
    },
    /// Q4_K or Q5_K super-blocks repacked (`Storage::Q4K`, `Storage::Q5K`), or Q6_K's as ggml
    /// stores them: `nsb` per row, `row_bytes` apart.
    Super {
        format: WeightFormat,
        bytes: &'a [u8],
        row_bytes: usize,
        nsb: usize,
    },
}

impl Weights<'_> {
    /// Columns per group (one scale per row and group).
    fn group(&self) -> usize {
        match self {
            Weights::Super {
                format: WeightFormat::Q6K,
                ..
            } => 16,
            _ => 32,
        }
    }

    /// Groups per row.
    fn groups(&self) -> usize {
        match self {
            Weights::Blocks { nb, .. } => *nb,
            Weights::Super { nsb, .. } => nsb * 256 / self.group(),
        }
    }

    /// What the panel's unsigned quants stand above the weights' integers.
    fn offset(&self) -> i32 {
        match self {
            Weights::Blocks { kind: Q4_0, .. } => 8,
            Weights::Blocks { kind: Q5_0, .. } => 16,
            Weights::Blocks { kind: Q8_0, .. } => 128,
            Weights::Super {
                format: WeightFormat::Q6K,
                ..
            } => 32,
            _ => 0,
        }
    }

    /// Whether the format has a minimum per group.
    fn has_min(&self) -> bool {
        match self {
            Weights::Blocks { kind, .. } => matches!(*kind, Q4_1 | Q5_1),
            Weights::Super { format, .. } => *format != WeightFormat::Q6K,
        }
    }
}

/// Sixteen rows unpacked (see the module's notes): `q[g * group / 4 + j]` holds quants
/// `4j..4j + 4` of group `g`, one row per lane.
struct Panel {
    q: Vec<__m512i>,
    scale: Vec<__m512>,
    min: Vec<__m512>,
}

/// The activations of one product regrouped for the kernels: tokens in chunks of up to
/// [`TOKENS`], and within a chunk group by group, each token's quants of that group one after
/// another. Entry `e = chunk_start * groups + g * chunk_len + t` is token `chunk_start + t`'s
/// group `g`: its quants at `q[e * group..]` (`lo` the second plane's), its integer start
/// `init[e]` (`init_lo[e]`), its scale `d[e]` and its `d * sum(q)` (`am[e]`, two planes
/// together).
struct Acts {
    q: Vec<i8>,
    lo: Vec<i8>,
    init: Vec<i32>,
    init_lo: Vec<i32>,
    d: Vec<f32>,
    am: Vec<f32>,
}

/// The token chunks of `n` tokens: sixteen at a time, then 8, 4, 2 and 1.
fn chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let full = n / TOKENS * TOKENS;
    let rest = n - full;
    (0..full).step_by(TOKENS).map(|t| (t, TOKENS)).chain(
        [8, 4, 2, 1]
            .into_iter()
            .filter(move |&c| rest & c != 0)
            .scan(full, |start, c| {
                let chunk = (*start, c);
                *start += c;
                Some(chunk)
            }),
    )
}

/// Regroups tokens `first..first + n` of `a` (quantized with the second plane when `fine`) for
/// `w`, as tokens `0..n`.
fn regroup(w: &Weights<'_>, a: &crate::QuantizedActs, fine: bool, first: usize, n: usize) -> Acts {
    let (group, groups, offset) = (w.group(), w.groups(), w.offset());
    let (cols, nb) = (a.cols, a.cols / 32);
    let entries = n * groups;
    let mut out = Acts {
        q: vec![0; entries * group],
        lo: if fine {
            vec![0; entries * group]
        } else {
            Vec::new()
        },
        init: vec![0; entries],
        init_lo: if fine { vec![0; entries] } else { Vec::new() },
        d: vec![0.0; entries],
        am: vec![0.0; entries],
    };
    let sums = if fine { &a.sum_fine } else { &a.sum };
    for (start, len) in chunks(n) {
        for t in start..start + len {
            let ta = first + t;
            for g in 0..groups {
                let e = start * groups + g * len + (t - start);
                let at = ta * cols + g * group;
                out.q[e * group..(e + 1) * group].copy_from_slice(&a.q[at..at + group]);
                // Sums of each 16 quants: two per block.
                let s16 = |v: &[i16]| -> i32 {
                    let i = ta * nb * 2 + g * group / 16;
                    v[i..i + group / 16].iter().map(|&s| s as i32).sum()
                };
                out.init[e] = -offset * s16(&a.s16);
                if fine {
                    out.lo[e * group..(e + 1) * group].copy_from_slice(&a.lo[at..at + group]);
                    out.init_lo[e] = -offset * s16(&a.s16lo);
                }
                let b = ta * nb + g * group / 32;
                out.d[e] = a.d[b];
                // Minimums come only with groups of 32.
                out.am[e] = if group == 32 { sums[b] } else { 0.0 };
            }
        }
    }
    out
}

vnni! {
    /// The sixteen bytes at `at` of sixteen rows `stride` bytes apart from `base`, transposed:
    /// lane `r` of vector `j` is the `j`th four bytes of row `r`'s sixteen. Sixteen 128-bit
    /// loads and twelve shuffles, where four gathers cost the panel half of its time.
    ///
    /// The first time it reads a 64-byte stretch of the rows, it asks for the same bytes of
    /// the next sixteen rows, which the next panel reads: a panel's rows are read across, a
    /// few bytes of each at a time, which the hardware prefetchers do not follow (on matrices
    /// bigger than the caches, filling the panel took half of a 16-bit float product).
    #[inline]
    unsafe fn transpose(base: *const u8, stride: usize, at: usize) -> [__m512i; 4] {
        if at % 64 < 16 {
            for r in ROWS..2 * ROWS {
                // A pointer past the matrix is never read: prefetches do not fault.
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(r * stride + at) as *const i8);
            }
        }
        let row = |r: usize| _mm_loadu_si128(base.add(r * stride + at) as *const __m128i);
        // Rows `4k..4k + 4`, one per 128-bit lane, then each lane's four words spread so that
        // 128-bit lane `j` holds word `j` of the four rows.
        let spread = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let b: [__m512i; 4] = std::array::from_fn(|k| {
            let v = _mm512_castsi128_si512(row(4 * k));
            let v = _mm512_inserti32x4::<1>(v, row(4 * k + 1));
            let v = _mm512_inserti32x4::<2>(v, row(4 * k + 2));
            let v = _mm512_inserti32x4::<3>(v, row(4 * k + 3));
            _mm512_permutexvar_epi32(spread, v)
        });
        // A 4 x 4 transpose of 128-bit lanes.
        let c0 = _mm512_shuffle_i64x2::<0b01_00_01_00>(b[0], b[1]);
        let c1 = _mm512_shuffle_i64x2::<0b11_10_11_10>(b[0], b[1]);
        let c2 = _mm512_shuffle_i64x2::<0b01_00_01_00>(b[2], b[3]);
        let c3 = _mm512_shuffle_i64x2::<0b11_10_11_10>(b[2], b[3]);
        [
            _mm512_shuffle_i64x2::<0b10_00_10_00>(c0, c2),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(c0, c2),
            _mm512_shuffle_i64x2::<0b10_00_10_00>(c1, c3),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(c1, c3),
        ]
    }

    /// Word `at` of sixteen rows of `v` (`per_row` words each), one row per lane.
    #[inline]
    unsafe fn column<T: Copy>(v: *const T, per_row: usize, at: usize) -> __m512i {
        let r = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let idx = _mm512_add_epi32(
            _mm512_mullo_epi32(r, _mm512_set1_epi32(per_row as i32)),
            _mm512_set1_epi32(at as i32),
        );
        _mm512_i32gather_epi32::<4>(idx, v as *const i32)
    }

    /// Words `b..b + 4` (or as many as are left of `nb`) of sixteen rows of `v` (`nb` words
    /// each): transposed where four are left, gathered at the end of a row (a transpose would
    /// read past the last row).
    #[inline]
    unsafe fn words<T: Copy>(v: *const T, nb: usize, b: usize) -> [__m512i; 4] {
        if b + 4 <= nb {
            transpose(v as *const u8, nb * 4, b * 4)
        } else {
            std::array::from_fn(|j| {
                if b + j < nb {
                    column(v, nb, b + j)
                } else {
                    _mm512_setzero_si512()
                }
            })
        }
    }

    /// Rows `r..r + 16` of `w` into `p` (sized for `w`).
    unsafe fn fill(p: &mut Panel, w: &Weights<'_>, r: usize) {
        match w {
            Weights::Blocks { rows, kind, nb } => fill_blocks(p, rows, *kind, *nb, r),
            Weights::Super { format: WeightFormat::Q6K, bytes, row_bytes, nsb } => {
                fill_q6k(p, bytes.as_ptr().add(r * row_bytes), *row_bytes, *nsb)
            }
            Weights::Super { format, bytes, row_bytes, nsb } => {
                let base = bytes.as_ptr().add(r * row_bytes);
                if *format == WeightFormat::Q5K {
                    fill_q4k::<true>(p, base, *row_bytes, *nsb)
                } else {
                    fill_q4k::<false>(p, base, *row_bytes, *nsb)
                }
            }
        }
    }

    /// [`fill`] for the 32-blocks.
    unsafe fn fill_blocks(p: &mut Panel, w: &IntRows<'_>, kind: u8, nb: usize, r: usize) {
        let bytes = if kind == Q8_0 { 32 } else { 16 };
        let base = w.wq.as_ptr().add(r * nb * bytes);
        let m4 = _mm512_set1_epi8(0x0f);
        let five = matches!(kind, Q5_0 | Q5_1);
        let zero = [_mm512_setzero_si512(); 4];
        let (mut scales, mut mins, mut fifth) = (zero, zero, zero);
        for b in 0..nb {
            if b % 4 == 0 {
                scales = words(w.wd.as_ptr().add(r * nb), nb, b);
                if matches!(kind, Q4_1 | Q5_1) {
                    mins = words(w.wm.as_ptr().add(r * nb), nb, b);
                }
                if five {
                    fifth = words(w.wh.as_ptr().add(r * nb), nb, b);
                }
            }
            p.scale[b] = _mm512_castsi512_ps(scales[b % 4]);
            if matches!(kind, Q4_1 | Q5_1) {
                p.min[b] = _mm512_castsi512_ps(mins[b % 4]);
            }
            let q = &mut p.q[b * 8..b * 8 + 8];
            if kind == Q8_0 {
                for half in 0..2 {
                    let v = transpose(base, nb * 32, b * 32 + 16 * half);
                    for j in 0..4 {
                        q[4 * half + j] = _mm512_xor_si512(v[j], _mm512_set1_epi8(-128));
                    }
                }
                continue;
            }
            // Byte `i` of a block: element `i` in its low nibble, `i + 16` in its high one.
            let v = transpose(base, nb * 16, b * 16);
            for j in 0..4 {
                q[j] = _mm512_and_si512(v[j], m4);
                q[j + 4] = _mm512_and_si512(_mm512_srli_epi32::<4>(v[j]), m4);
            }
            if five {
                // Bit `e` of the block's word is element `e`'s fifth bit: bits `4j..4j + 4` go
                // to bit 4 of quad `j`'s bytes (the multiply spreads four bits to four bytes).
                let h = fifth[b % 4];
                for j in 0..8 {
                    let bits = _mm512_and_si512(
                        _mm512_srl_epi32(h, _mm_cvtsi32_si128(4 * j as i32)),
                        _mm512_set1_epi32(0xf),
                    );
                    let spread = _mm512_and_si512(
                        _mm512_mullo_epi32(bits, _mm512_set1_epi32(0x0020_4081)),
                        _mm512_set1_epi32(0x0101_0101),
                    );
                    q[j] = _mm512_or_si512(q[j], _mm512_slli_epi32::<4>(spread));
                }
            }
        }
    }

    /// [`fill`] for Q4_K and Q5_K (`HIGH`) repacked super-blocks, row 0 at `base`.
    unsafe fn fill_q4k<const HIGH: bool>(
        p: &mut Panel,
        base: *const u8,
        row_bytes: usize,
        nsb: usize,
    ) {
        let (block, quants) = k_layout(HIGH);
        let m4 = _mm512_set1_epi8(0x0f);
        let byte = _mm512_set1_epi32(0xff);
        for s in 0..nsb {
            let at = s * block;
            // Words 0..5: `d` and `dmin`, four scales, four scales, four minimums, four minimums.
            let [dd, sc0, sc1, mn0] = transpose(base, row_bytes, at);
            let mn1 = transpose(base, row_bytes, at + Q4K_MINS - 8)[3];
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dd));
            let dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dd)));
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), dmin);
            for k in 0..8 {
                let nth = |v: [__m512i; 2]| {
                    let shift = _mm_cvtsi32_si128(8 * (k % 4) as i32);
                    _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srl_epi32(v[k / 4], shift), byte))
                };
                p.scale[s * 8 + k] = _mm512_mul_ps(nth([sc0, sc1]), d);
                // Stored so that a minimum adds: `-dmin * m`.
                p.min[s * 8 + k] = _mm512_mul_ps(nth([mn0, mn1]), neg);
            }
            let fifth: [__m512i; 8] = if HIGH {
                let [a, b, c, d] = transpose(base, row_bytes, at + Q5K_HIGH);
                let [e, f, g, h] = transpose(base, row_bytes, at + Q5K_HIGH + 16);
                [a, b, c, d, e, f, g, h]
            } else {
                [_mm512_setzero_si512(); 8]
            };
            // Chunk `c` of 32 bytes: sub-block `2c` in the low nibbles, `2c + 1` in the high.
            for c in 0..4 {
                for half in 0..2 {
                    let v = transpose(base, row_bytes, at + quants + 32 * c + 16 * half);
                    for i in 0..4 {
                        let j = 4 * half + i;
                        let nibbles = [
                            _mm512_and_si512(v[i], m4),
                            _mm512_and_si512(_mm512_srli_epi32::<4>(v[i]), m4),
                        ];
                        for (n, nibble) in nibbles.into_iter().enumerate() {
                            let k = 2 * c + n;
                            let mut q = nibble;
                            if HIGH {
                                // Bit `k` of each fifth-bit byte to bit 4.
                                let h = _mm512_srl_epi32(fifth[j], _mm_cvtsi32_si128(k as i32));
                                let h = _mm512_and_si512(h, _mm512_set1_epi8(1));
                                q = _mm512_or_si512(q, _mm512_slli_epi32::<4>(h));
                            }
                            p.q[(s * 8 + k) * 8 + j] = q;
                        }
                    }
                }
            }
        }
    }

    /// [`fill`] for Q6_K super-blocks (ggml's layout), row 0 at `base`: groups of 16.
    unsafe fn fill_q6k(p: &mut Panel, base: *const u8, row_bytes: usize, nsb: usize) {
        let m4 = _mm512_set1_epi8(0x0f);
        let m2 = _mm512_set1_epi8(0x03);
        for s in 0..nsb {
            let at = s * Q6K_BYTES;
            // `d` is the last two bytes: read the sixteen that end with them, not past the row.
            let d = transpose(base, row_bytes, at + Q6K_D + 2 - 16)[3];
            let d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(d)));
            let scales = transpose(base, row_bytes, at + Q6K_SCALES);
            for q4 in 0..4 {
                for k in 0..4 {
                    // Signed byte `k` of the word.
                    let v = _mm512_sll_epi32(scales[q4], _mm_cvtsi32_si128(24 - 8 * k as i32));
                    let v = _mm512_srai_epi32::<24>(v);
                    p.scale[s * 16 + q4 * 4 + k] = _mm512_mul_ps(_mm512_cvtepi32_ps(v), d);
                }
            }
            // Element `128h + l`: low bits in nibble `l / 64` of byte `64h + l % 64`, high bits
            // at bits `2 * (l / 32)` of byte `128 + 32h + l % 32`; scale `(128h + l) / 16`.
            for h in 0..2 {
                let [a, b, c, d] = transpose(base, row_bytes, at + Q6K_HIGH + 32 * h);
                let [e, f, g, hh] = transpose(base, row_bytes, at + Q6K_HIGH + 16 + 32 * h);
                let high = [a, b, c, d, e, f, g, hh];
                for i4 in 0..4 {
                    let low4 = transpose(base, row_bytes, at + 64 * h + 16 * i4);
                    for k in 0..4 {
                        let (i, low) = (4 * i4 + k, low4[k]);
                        for sel in 0..2 {
                            let l = 4 * i + 64 * sel;
                            let shift = |n: usize| _mm_cvtsi32_si128(n as i32);
                            let lo4 = _mm512_and_si512(_mm512_srl_epi32(low, shift(4 * sel)), m4);
                            let hi2 = _mm512_srl_epi32(high[(l % 32) / 4], shift(2 * (l / 32)));
                            let hi2 = _mm512_slli_epi32::<4>(_mm512_and_si512(hi2, m2));
                            p.q[s * 64 + (128 * h + l) / 4] = _mm512_or_si512(lo4, hi2);
                        }
                    }
                }
            }
        }
    }

    /// The panel `p` (`groups` groups of `G` columns) against `T` tokens of the regrouped
    /// activations, whose entries for group `g` start at `x + g * T` (see [`Acts`]): each
    /// token's sixteen outputs, one row per lane.
    #[inline]
    unsafe fn tokens<const T: usize, const G: usize, const MIN: bool, const FINE: bool>(
        p: &Panel,
        groups: usize,
        x: &Acts,
        e0: usize,
    ) -> [__m512; T] {
        let quads = G / 4;
        let mut acc = [_mm512_setzero_ps(); T];
        let third = _mm512_set1_ps(1.0 / 254.0);
        for g in 0..groups {
            let e = e0 + g * T;
            let w: [__m512i; 8] = std::array::from_fn(|j| {
                if j < quads {
                    _mm512_load_si512(p.q.as_ptr().add(g * quads + j))
                } else {
                    _mm512_setzero_si512()
                }
            });
            let sc = p.scale[g];
            let xq = x.q.as_ptr().add(e * G) as *const i32;
            let xlo = x.lo.as_ptr().add(if FINE { e * G } else { 0 }) as *const i32;
            // One plane of a token's group: its integer sums from `init`, as floats.
            let plane = |words: *const i32, init: i32| {
                let mut i = _mm512_set1_epi32(init);
                for j in 0..quads {
                    let a = _mm512_set1_epi32(words.add(j).read_unaligned());
                    i = _mm512_dpbusd_epi32(i, w[j], a);
                }
                _mm512_cvtepi32_ps(i)
            };
            // One token's products (written out sixteen times: LLVM keeps a loop over tokens
            // rolled, and the accumulators in memory).
            macro_rules! token {
                ($($t:literal)*) => {$(
                    if $t < T {
                        let mut f = plane(xq.add($t * quads), *x.init.get_unchecked(e + $t));
                        if FINE {
                            let lo = plane(xlo.add($t * quads), *x.init_lo.get_unchecked(e + $t));
                            f = _mm512_fmadd_ps(lo, third, f);
                        }
                        let d = _mm512_set1_ps(*x.d.get_unchecked(e + $t));
                        acc[$t] = _mm512_fmadd_ps(_mm512_mul_ps(f, sc), d, acc[$t]);
                        if MIN {
                            let m = _mm512_set1_ps(*x.am.get_unchecked(e + $t));
                            acc[$t] = _mm512_fmadd_ps(p.min[g], m, acc[$t]);
                        }
                    }
                )*};
            }
            token!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        acc
    }

    /// Each token's sixteen outputs `acc` (tokens from `start` on) to `put`.
    #[inline]
    unsafe fn hand_out(start: usize, acc: &[__m512], put: &mut impl FnMut(usize, &[f32; ROWS])) {
        for (t, v) in acc.iter().enumerate() {
            let mut row = [0f32; ROWS];
            _mm512_storeu_ps(row.as_mut_ptr(), *v);
            put(start + t, &row);
        }
    }

    /// [`tokens`] with the chunk length chosen at run time.
    #[inline]
    unsafe fn chunk<const G: usize, const MIN: bool, const FINE: bool>(
        p: &Panel,
        groups: usize,
        x: &Acts,
        (start, len): (usize, usize),
        mut put: impl FnMut(usize, &[f32; ROWS]),
    ) {
        let e0 = start * groups;
        let mut give = |acc: &[__m512]| hand_out(start, acc, &mut put);
        match len {
            16 => give(&tokens::<16, G, MIN, FINE>(p, groups, x, e0)),
            8 => give(&tokens::<8, G, MIN, FINE>(p, groups, x, e0)),
            4 => give(&tokens::<4, G, MIN, FINE>(p, groups, x, e0)),
            2 => give(&tokens::<2, G, MIN, FINE>(p, groups, x, e0)),
            _ => give(&tokens::<1, G, MIN, FINE>(p, groups, x, e0)),
        }
    }

    /// Rows `r0..` of `w` in whole panels of sixteen, up to `r1`, against all `n` tokens of
    /// `a` (quantized with the second plane when `fine`): each panel's outputs for token `t`
    /// given to `put(t, row, values)` (rows `row..row + 16`). Returns the first row not
    /// computed (`r1` less what does not fill a panel).
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/DQ/VL/VNNI, AVX2, FMA, F16C and BMI2; `w` holds every
    /// row up to `r1` as it says, and `a` `n` activation rows of `w`'s columns quantized to 8
    /// bits (and the second plane with `fine`).
    pub(crate) unsafe fn rows_into(
        w: &Weights<'_>,
        a: &crate::QuantizedActs,
        fine: bool,
        n: usize,
        (r0, r1): (usize, usize),
        mut put: impl FnMut(usize, usize, &[f32; ROWS]),
    ) -> usize {
        let (group, groups) = (w.group(), w.groups());
        let mut p = Panel {
            q: vec![_mm512_setzero_si512(); groups * group / 4],
            scale: vec![_mm512_setzero_ps(); groups],
            min: vec![_mm512_setzero_ps(); if w.has_min() { groups } else { 0 }],
        };
        // Tokens in blocks whose regrouped activations take at most `SCRATCH` bytes (whole
        // chunks of sixteen): a task's copy of a long prompt's activations for the 1B shape's
        // MLP down projection was 2.5 MiB, and two tasks at once raised the peak memory of a
        // two-thread prefill by 6 MiB. Each block fills the panels again.
        const SCRATCH: usize = 512 << 10;
        let planes = if fine { 2 } else { 1 };
        let per_token = groups * (group * planes + 16);
        let block = (SCRATCH / per_token.max(1)).max(TOKENS) / TOKENS * TOKENS;
        let mut first = 0;
        while first < n {
            let len = block.min(n - first);
            let x = regroup(w, a, fine, first, len);
            let mut r = r0;
            while r + ROWS <= r1 {
                fill(&mut p, w, r);
                for c in chunks(len) {
                    let put = |t: usize, v: &[f32; ROWS]| put(first + t, r, v);
                    match (group, w.has_min(), fine) {
                        (16, _, false) => chunk::<16, false, false>(&p, groups, &x, c, put),
                        (16, _, true) => chunk::<16, false, true>(&p, groups, &x, c, put),
                        (_, false, false) => chunk::<32, false, false>(&p, groups, &x, c, put),
                        (_, true, false) => chunk::<32, true, false>(&p, groups, &x, c, put),
                        (_, false, true) => chunk::<32, false, true>(&p, groups, &x, c, put),
                        (_, true, true) => chunk::<32, true, true>(&p, groups, &x, c, put),
                    }
                }
                r += ROWS;
            }
            first += len;
        }
        r0 + (r1.saturating_sub(r0)) / ROWS * ROWS
    }

    /// Sixteen rows of a 16-bit float matrix (`cols` values each, row 0 at `base`; bfloat16
    /// with `BF16`) widened to f32 into `p`: `p[k]` holds column `k`, one row per lane.
    unsafe fn fill_half<const BF16: bool>(p: &mut [__m512], base: *const u16, cols: usize) {
        let eight = cols / 8 * 8;
        for k in (0..eight).step_by(8) {
            // Word `j` of a row's sixteen bytes: columns `k + 2j` (low half) and `k + 2j + 1`.
            let v = transpose(base as *const u8, cols * 2, k * 2);
            for j in 0..4 {
                let (even, odd) = if BF16 {
                    (
                        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v[j])),
                        _mm512_castsi512_ps(_mm512_and_si512(v[j], _mm512_set1_epi32(-65536))),
                    )
                } else {
                    (
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v[j])),
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(v[j]))),
                    )
                };
                p[k + 2 * j] = even;
                p[k + 2 * j + 1] = odd;
            }
        }
        for k in eight..cols {
            let column: [f32; ROWS] = std::array::from_fn(|r| {
                let b = *base.add(r * cols + k);
                if BF16 {
                    half::bf16::from_bits(b).to_f32()
                } else {
                    half::f16::from_bits(b).to_f32()
                }
            });
            p[k] = _mm512_loadu_ps(column.as_ptr());
        }
    }

    /// The widened panel `p` against `T` tokens whose column `k` lies at `x[k * T..]`: each
    /// token's sixteen outputs, one row per lane.
    #[inline]
    unsafe fn half_tokens<const T: usize>(p: &[__m512], x: *const f32) -> [__m512; T] {
        let mut acc = [_mm512_setzero_ps(); T];
        for (k, w) in p.iter().enumerate() {
            let xk = x.add(k * T);
            // Written out sixteen times, as in `tokens`.
            macro_rules! token {
                ($($t:literal)*) => {$(
                    if $t < T {
                        acc[$t] = _mm512_fmadd_ps(*w, _mm512_set1_ps(*xk.add($t)), acc[$t]);
                    }
                )*};
            }
            token!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        acc
    }

    /// Rows `r0..` of a 16-bit float matrix (`bits`, `cols` values per row; bfloat16 with
    /// `BF16`) in whole panels of sixteen, up to `r1`, against the `n` f32 activation rows
    /// `x`, as [`rows_into`]: one fused multiply-add per sixteen rows, column and token, the
    /// weights widened once per panel. Returns the first row not computed.
    ///
    /// # Safety
    /// As [`rows_into`]; `bits` holds every row up to `r1` and `x` `n` rows of `cols` values.
    pub(crate) unsafe fn half_rows_into<const BF16: bool>(
        bits: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        (r0, r1): (usize, usize),
        mut put: impl FnMut(usize, usize, &[f32; ROWS]),
    ) -> usize {
        // The activations chunk by chunk, column by column, the chunk's tokens side by side.
        let mut xs = vec![0f32; n * cols];
        for (start, len) in chunks(n) {
            for t in 0..len {
                let row = &x[(start + t) * cols..(start + t + 1) * cols];
                for (k, v) in row.iter().enumerate() {
                    xs[start * cols + k * len + t] = *v;
                }
            }
        }
        let mut p = vec![_mm512_setzero_ps(); cols];
        let mut r = r0;
        while r + ROWS <= r1 {
            fill_half::<BF16>(&mut p, bits.as_ptr().add(r * cols), cols);
            for (start, len) in chunks(n) {
                let xc = xs.as_ptr().add(start * cols);
                let mut put = |t: usize, v: &[f32; ROWS]| put(t, r, v);
                match len {
                    16 => hand_out(start, &half_tokens::<16>(&p, xc), &mut put),
                    8 => hand_out(start, &half_tokens::<8>(&p, xc), &mut put),
                    4 => hand_out(start, &half_tokens::<4>(&p, xc), &mut put),
                    2 => hand_out(start, &half_tokens::<2>(&p, xc), &mut put),
                    _ => hand_out(start, &half_tokens::<1>(&p, xc), &mut put),
                }
            }
            r += ROWS;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_every_token_once_in_order() {
        for n in 0..70 {
            let mut next = 0;
            for (start, len) in chunks(n) {
                assert_eq!(start, next, "n {n}");
                assert!([1, 2, 4, 8, 16].contains(&len));
                next += len;
            }
            assert_eq!(next, n);
        }
    }
}
