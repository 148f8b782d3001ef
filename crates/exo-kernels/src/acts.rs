//! Activations quantized to 8-bit blocks of 32, as the integer kernels consume them.

/// Rows of activations quantized to blocks of 32 signed bytes with one scale each.
///
/// Stored as separate arrays (scales, scaled sums, quants) so that SIMD kernels load whole
/// blocks with single instructions.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    /// Scale of each block: value = `d * q`.
    pub(crate) d: Vec<f32>,
    /// `d * sum(q)` of each block, for formats with an offset or a minimum (Q4_0, Q4_1, Q4_K,
    /// Q5_K).
    pub(crate) sum: Vec<f32>,
    /// `sum(q)` of each 16 values (two per block), for Q6_K's offset of 32 under its 16-value
    /// scales.
    pub(crate) s16: Vec<i16>,
    /// The quantized values, 32 per block.
    pub(crate) q: Vec<i8>,
    /// With two planes ([`QuantizedActs::quantize`]'s `fine`): what `q` leaves, in steps of
    /// `d / 254`, so that a value is `d * (q + lo / 254)` (about 15 bits per value).
    pub(crate) lo: Vec<i8>,
    /// `sum(lo)` of each 16 values.
    pub(crate) s16lo: Vec<i16>,
    /// `d * (sum(q) + sum(lo) / 254)` of each block: `sum` for two planes.
    pub(crate) sum_fine: Vec<f32>,
    /// The activations as given, for float and K-quant kernels.
    pub(crate) f: Vec<f32>,
    /// Sum of each 32-block of `f`, for 4-bit weights against f32 activations.
    pub(crate) fsum: Vec<f32>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Set per product: matrices whose default is two planes take f32 activations instead
    /// (prefill, where the f32 kernels' widened weights serve four tokens and measured faster
    /// than twice the byte products).
    pub(crate) fine_as_f32: bool,
}

impl QuantizedActs {
    /// An empty buffer; [`QuantizedActs::quantize`] sizes it on first use and reuses it after.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x`, `rows` rows of `cols` values (`cols` a multiple of 32), reusing buffers;
    /// with `fine`, also the second plane of what the first leaves.
    pub(crate) fn quantize(&mut self, x: &[f32], rows: usize, cols: usize, fine: bool) {
        let blocks = rows * cols / 32;
        self.rows = rows;
        self.cols = cols;
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0.0);
        self.s16.resize(blocks * 2, 0);
        self.q.resize(blocks * 32, 0);
        // The float values and block sums too: a stack may mix formats that take them.
        self.keep_f32(x, rows, cols);
        #[cfg(target_arch = "x86_64")]
        if crate::Isa::Avx2.is_supported() {
            // SAFETY: AVX2 and FMA were checked just above; `x` holds `blocks` blocks of 32
            // and the buffers were sized for them.
            unsafe { self.quantize_avx2(x, blocks, fine) };
            return;
        }
        self.quantize_portable(x, blocks, fine);
    }

    /// [`QuantizedActs::quantize`]'s blocks in portable code.
    fn quantize_portable(&mut self, x: &[f32], blocks: usize, fine: bool) {
        for (b, chunk) in x.chunks_exact(32).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.q[b * 32..b * 32 + 32];
            let mut half = [0i32; 2];
            for (i, (o, v)) in q.iter_mut().zip(chunk).enumerate() {
                // |v * inv| <= 127 up to rounding; the clamp keeps NaN and rounding in range.
                let r = ((v * inv).round() as i32).clamp(-127, 127);
                *o = r as i8;
                half[i / 16] += r;
            }
            self.d[b] = d;
            self.sum[b] = d * (half[0] + half[1]) as f32;
            // |sum of 16| <= 16 * 127, well inside i16.
            self.s16[b * 2] = half[0] as i16;
            self.s16[b * 2 + 1] = half[1] as i16;
        }
        if fine {
            self.quantize_rest(x, blocks);
        }
    }

    /// [`QuantizedActs::quantize`]'s blocks (both planes with `fine`) with AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` holds `blocks` blocks of 32 values, and `d`, `sum`,
    /// `s16` and `q` are sized for them.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quantize_avx2(&mut self, x: &[f32], blocks: usize, fine: bool) {
        if fine {
            self.lo.resize(blocks * 32, 0);
            self.s16lo.resize(blocks * 2, 0);
            self.sum_fine.resize(blocks, 0.0);
        }
        // SAFETY: guaranteed by the caller; the second plane's buffers were sized just above.
        unsafe { x86::quantize(self, x, blocks, fine) }
    }

    /// The second plane: each value's remainder after the first (at most half a step, `d / 2`)
    /// in steps of `d / 254`.
    fn quantize_rest(&mut self, x: &[f32], blocks: usize) {
        self.lo.resize(blocks * 32, 0);
        self.s16lo.resize(blocks * 2, 0);
        self.sum_fine.resize(blocks, 0.0);
        for (b, chunk) in x.chunks_exact(32).enumerate() {
            let d = self.d[b];
            let inv = if d > 0.0 { 254.0 / d } else { 0.0 };
            let (q, lo) = (
                &self.q[b * 32..b * 32 + 32],
                &mut self.lo[b * 32..b * 32 + 32],
            );
            let mut half = [0i32; 2];
            for (i, ((o, v), &h)) in lo.iter_mut().zip(chunk).zip(q).enumerate() {
                let r = (((v - d * h as f32) * inv).round() as i32).clamp(-127, 127);
                *o = r as i8;
                half[i / 16] += r;
            }
            self.s16lo[b * 2] = half[0] as i16;
            self.s16lo[b * 2 + 1] = half[1] as i16;
            let high = self.s16[b * 2] as i32 + self.s16[b * 2 + 1] as i32;
            self.sum_fine[b] = d / 254.0 * (254 * high + half[0] + half[1]) as f32;
        }
    }

    /// The f32 rows `t..t + T` (as [`QuantizedActs::keep_f32`] kept them), for the tile kernels.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn f32_rows<const T: usize>(&self, t: usize) -> [&[f32]; T] {
        let cols = self.cols;
        std::array::from_fn(|k| &self.f[(t + k) * cols..(t + k + 1) * cols])
    }

    /// The 32-block sums of the f32 rows `t..t + T`.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn f32_sums<const T: usize>(&self, t: usize) -> [&[f32]; T] {
        let nb = self.cols / 32;
        std::array::from_fn(|k| &self.fsum[(t + k) * nb..(t + k + 1) * nb])
    }

    /// Just keeps `x` as floats (for weights whose kernels take f32 activations), with the sum
    /// of each 32-block when `cols` allows blocks.
    pub(crate) fn keep_f32(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.rows = rows;
        self.cols = cols;
        self.f.clear();
        self.f.extend_from_slice(x);
        self.fsum.clear();
        if cols.is_multiple_of(32) {
            self.fsum
                .extend(x.chunks_exact(32).map(|c| c.iter().sum::<f32>()));
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::QuantizedActs;

    /// The AVX2 quantizer gives the portable loops' values to the bit, both planes, on random
    /// blocks and on the edges: ties at half a step, zeros, NaN, infinities, tiny values.
    #[test]
    fn the_avx2_quantizer_equals_the_portable_one_to_the_bit() {
        if !crate::Isa::Avx2.is_supported() {
            return;
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut x: Vec<f32> = (0..32 * 64)
            .map(|_| (next() % 20001) as f32 / 1000.0 - 10.0)
            .collect();
        // Ties: a block of amax 127 makes the step 1, so k + 0.5 sits half-way.
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 {
                127.0
            } else {
                (i as f32 - 16.0) + 0.5
            };
        }
        x[32..64].fill(0.0);
        x[64] = f32::NAN;
        x[96] = f32::INFINITY;
        x[97] = -1.0;
        x[128..160].fill(1e-40);
        x[160] = -f32::INFINITY;
        for fine in [false, true] {
            let (mut simd, mut portable) = (QuantizedActs::new(), QuantizedActs::new());
            simd.quantize(&x, 64, 32, fine);
            portable.quantize(&x, 64, 32, fine);
            portable.quantize_portable(&x, 64, fine);
            assert_eq!(simd.q, portable.q, "fine {fine}");
            assert_eq!(simd.s16, portable.s16);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&simd.d), bits(&portable.d));
            assert_eq!(bits(&simd.sum), bits(&portable.sum));
            if fine {
                assert_eq!(simd.lo, portable.lo);
                assert_eq!(simd.s16lo, portable.s16lo);
                assert_eq!(bits(&simd.sum_fine), bits(&portable.sum_fine));
            }
        }
    }
}

/// The AVX2 quantizer: the same values to the bit as the portable loops (rounding half away
/// from zero, NaN to 0), several times faster (the portable loops' `roundf` calls were 5 % of a
/// decode step on the default model).
#[cfg(target_arch = "x86_64")]
mod x86 {
    #![allow(unsafe_op_in_unsafe_fn)]

    use std::arch::x86_64::*;

    use super::QuantizedActs;

    /// `round` (half away from zero) of eight values, exactly, clamped to -127..=127, as
    /// integers: truncate, then step away from zero where the part cut off is half or more.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn round(v: __m256) -> __m256i {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let cut = _mm256_and_ps(_mm256_sub_ps(v, t), abs);
        // One, with the sign of `v`.
        let one = _mm256_or_ps(_mm256_set1_ps(1.0), _mm256_andnot_ps(abs, v));
        let step = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(cut, _mm256_set1_ps(0.5)), one);
        // NaN becomes 0, as `as i32` makes it.
        let r = _mm256_and_ps(_mm256_add_ps(t, step), _mm256_cmp_ps::<_CMP_ORD_Q>(v, v));
        let r = _mm256_min_ps(
            _mm256_max_ps(r, _mm256_set1_ps(-127.0)),
            _mm256_set1_ps(127.0),
        );
        _mm256_cvtps_epi32(r)
    }

    /// Four vectors of eight integers in -127..=127 stored as 32 bytes in order at `out`;
    /// returns the sums of each 16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn pack(i: [__m256i; 4], out: *mut i8) -> [i32; 2] {
        let bytes = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        _mm256_storeu_si256(
            out as *mut __m256i,
            _mm256_permutevar8x32_epi32(bytes, order),
        );
        [
            hsum(_mm256_add_epi32(i[0], i[1])),
            hsum(_mm256_add_epi32(i[2], i[3])),
        ]
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` holds `blocks` blocks of 32 values and every
    /// buffer of `a` is sized for them (the second plane's too with `fine`).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize(a: &mut QuantizedActs, x: &[f32], blocks: usize, fine: bool) {
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for b in 0..blocks {
            let p = x.as_ptr().add(b * 32);
            let v: [__m256; 4] = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            // `f32::max` ignores NaN; `max_ps` gives its second operand when either is NaN.
            let mut m = _mm256_setzero_ps();
            for vk in v {
                m = _mm256_max_ps(_mm256_and_ps(vk, abs), m);
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            let d = _mm_cvtss_f32(m) / 127.0;
            let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let q = [
                round(_mm256_mul_ps(v[0], inv)),
                round(_mm256_mul_ps(v[1], inv)),
                round(_mm256_mul_ps(v[2], inv)),
                round(_mm256_mul_ps(v[3], inv)),
            ];
            let half = pack(q, a.q.as_mut_ptr().add(b * 32));
            a.d[b] = d;
            a.sum[b] = d * (half[0] + half[1]) as f32;
            // |sum of 16| <= 16 * 127, well inside i16.
            a.s16[b * 2] = half[0] as i16;
            a.s16[b * 2 + 1] = half[1] as i16;
            if fine {
                // What the first plane leaves, in steps of d / 254 (as `quantize_rest`).
                let inv = _mm256_set1_ps(if d > 0.0 { 254.0 / d } else { 0.0 });
                let dv = _mm256_set1_ps(d);
                let rest = |k: usize| {
                    let h = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(q[k]));
                    _mm256_mul_ps(_mm256_sub_ps(v[k], h), inv)
                };
                let lo = [
                    round(rest(0)),
                    round(rest(1)),
                    round(rest(2)),
                    round(rest(3)),
                ];
                let rest = pack(lo, a.lo.as_mut_ptr().add(b * 32));
                a.s16lo[b * 2] = rest[0] as i16;
                a.s16lo[b * 2 + 1] = rest[1] as i16;
                let high = half[0] + half[1];
                a.sum_fine[b] = d / 254.0 * (254 * high + rest[0] + rest[1]) as f32;
            }
        }
    }
}
