//! Activations quantized to 8-bit blocks of 32, as the integer kernels consume them.

/// Rows of activations quantized to blocks of 32 signed bytes with one scale each.
///
/// Stored as separate arrays (scales, scaled sums, quants) so that SIMD kernels load whole
/// blocks with single instructions.
#[derive(Clone, Debug, Default)]
pub struct QuantizedActs {
    /// Scale of each block: value = `d * q`.
    pub(crate) d: Vec<f32>,
    /// `d * sum(q)` of each block, for formats with an offset (Q4_0, Q4_1).
    pub(crate) sum: Vec<f32>,
    /// The quantized values, 32 per block.
    pub(crate) q: Vec<i8>,
    /// The activations as given, for float and K-quant kernels.
    pub(crate) f: Vec<f32>,
    /// Sum of each 32-block of `f`, for 4-bit weights against f32 activations.
    pub(crate) fsum: Vec<f32>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl QuantizedActs {
    /// An empty buffer; [`QuantizedActs::quantize`] sizes it on first use and reuses it after.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x`, `rows` rows of `cols` values (`cols` a multiple of 32), reusing buffers.
    pub(crate) fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        let blocks = rows * cols / 32;
        self.rows = rows;
        self.cols = cols;
        self.d.resize(blocks, 0.0);
        self.sum.resize(blocks, 0.0);
        self.q.resize(blocks * 32, 0);
        // The float values and block sums too: a stack may mix formats that take them.
        self.keep_f32(x, rows, cols);
        for (b, chunk) in x.chunks_exact(32).enumerate() {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.q[b * 32..b * 32 + 32];
            let mut isum = 0i32;
            for (o, v) in q.iter_mut().zip(chunk) {
                let r = (v * inv).round() as i32;
                *o = r as i8;
                isum += r;
            }
            self.d[b] = d;
            self.sum[b] = d * isum as f32;
        }
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
