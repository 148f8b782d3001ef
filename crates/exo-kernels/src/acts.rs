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
