//! Decoding stored rows back to `f32`: what embedding lookups use, and what the portable
//! kernels build on. Its own module (an `impl` block of `QuantMatrix` among it) so that the
//! matrix types do not depend on the kernels, nor the kernels on each other.

use half::f16;

use crate::error::{Error, Result};
use crate::matrix::{Q4K_PACKED, Q5K_PACKED, QuantMatrix, Storage, WeightFormat};

impl QuantMatrix {
    /// Decodes one row to `f32` into `out` (`cols` values): embedding lookups use this.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols {
            return Err(Error::Shape {
                what: "row to dequantize",
                expected: self.cols,
                actual: out.len(),
            });
        }
        let (part, row) = self.part_of(row);
        dequantize_row(part, row, out);
        Ok(())
    }
}

fn dequantize_row(w: &QuantMatrix, row: usize, out: &mut [f32]) {
    let cols = w.cols;
    let nb = cols / 32;
    match &w.storage {
        Storage::F32(v) => out.copy_from_slice(&v[row * cols..(row + 1) * cols]),
        Storage::F16(v) => {
            for (o, h) in out.iter_mut().zip(&v[row * cols..(row + 1) * cols]) {
                *o = h.to_f32();
            }
        }
        Storage::BF16(v) => {
            for (o, h) in out.iter_mut().zip(&v[row * cols..(row + 1) * cols]) {
                *o = h.to_f32();
            }
        }
        Storage::Q8_0 { d, q } => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = d[row * nb + i / 32] * q[row * cols + i] as f32;
            }
        }
        Storage::Q4_0 { d, q } | Storage::Q4_1 { d, q, .. } => {
            let min = match &w.storage {
                Storage::Q4_1 { m, .. } => Some(m),
                _ => None,
            };
            for b in 0..nb {
                let qs = &q[(row * nb + b) * 16..][..16];
                let scale = d[row * nb + b];
                let (offset, add) = match min {
                    Some(m) => (0.0, m[row * nb + b]),
                    None => (8.0, 0.0),
                };
                for j in 0..16 {
                    out[b * 32 + j] = ((qs[j] & 0x0f) as f32 - offset) * scale + add;
                    out[b * 32 + j + 16] = ((qs[j] >> 4) as f32 - offset) * scale + add;
                }
            }
        }
        Storage::Q5 { d, m, qh, q } => {
            for b in 0..nb {
                let i = row * nb + b;
                let qs = &q[i * 16..][..16];
                let (offset, add) = match m.get(i) {
                    Some(&min) => (0.0, min),
                    None => (16.0, 0.0),
                };
                for j in 0..16 {
                    let lo = (qs[j] & 0x0f) as u32 | (((qh[i] >> j) & 1) << 4);
                    let hi = (qs[j] >> 4) as u32 | (((qh[i] >> (j + 16)) & 1) << 4);
                    out[b * 32 + j] = (lo as f32 - offset) * d[i] + add;
                    out[b * 32 + j + 16] = (hi as f32 - offset) * d[i] + add;
                }
            }
        }
        Storage::Q4K(bytes) | Storage::Q5K(bytes) | Storage::Q6K(bytes) => {
            let bb = k_block_bytes(w);
            let per_row = cols / 256 * bb;
            let row_bytes = &bytes[row * per_row..(row + 1) * per_row];
            for (blk, o) in row_bytes.chunks_exact(bb).zip(out.chunks_exact_mut(256)) {
                let mut buf = [0f32; 256];
                decode_k_block(w, blk, &mut buf);
                o.copy_from_slice(&buf);
            }
        }
        Storage::Parts(_) => {
            let (part, row) = w.part_of(row);
            dequantize_row(part, row, out);
        }
    }
}

/// Bytes of one super-block of a K-quant matrix as the kernels keep it.
pub(crate) fn k_block_bytes(w: &QuantMatrix) -> usize {
    match w.storage {
        Storage::Q4K(_) => Q4K_PACKED,
        Storage::Q5K(_) => Q5K_PACKED,
        _ => w.format.ggml_block_bytes(),
    }
}

pub(crate) fn decode_k_block(w: &QuantMatrix, blk: &[u8], out: &mut [f32; 256]) {
    match w.format {
        WeightFormat::Q6K => crate::ggml::decode_q6_k(blk, out),
        WeightFormat::Q5K => decode_q5k_packed(blk, out),
        _ => decode_q4k_packed(blk, out),
    }
}

/// Decodes one repacked Q4_K super-block (see `Storage::Q4K`): `d * scale * q - dmin * min`.
pub(crate) fn decode_q4k_packed(b: &[u8], out: &mut [f32; 256]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let (sc, m, qs) = (&b[4..12], &b[12..20], &b[20..148]);
    for (c, q) in qs.chunks_exact(32).enumerate() {
        let (d1, m1) = (d * sc[2 * c] as f32, dmin * m[2 * c] as f32);
        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * m[2 * c + 1] as f32);
        let o = &mut out[c * 64..c * 64 + 64];
        for (l, &x) in q.iter().enumerate() {
            o[l] = d1 * (x & 0x0f) as f32 - m1;
            o[l + 32] = d2 * (x >> 4) as f32 - m2;
        }
    }
}

/// Decodes one repacked Q5_K super-block (see `Storage::Q5K`): `d * scale * q - dmin * min`
/// with `q` taking its fifth bit from bit `j` of byte `l` of the high bits.
pub(crate) fn decode_q5k_packed(b: &[u8], out: &mut [f32; 256]) {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let (sc, m, qh, qs) = (&b[4..12], &b[12..20], &b[20..52], &b[52..180]);
    for j in 0..8 {
        let (scale, min) = (d * sc[j] as f32, dmin * m[j] as f32);
        let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        for l in 0..32 {
            let low = if j % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
            let high = ((qh[l] >> j) & 1) << 4;
            out[j * 32 + l] = scale * (low | high) as f32 - min;
        }
    }
}
