//! Portable reference kernels: always compiled, always tested, and the fallback on CPUs without
//! the SIMD extensions. The SIMD paths must equal these (tests compare them on random blocks).

use crate::acts::QuantizedActs;
use half::f16;

use crate::matrix::{Q4K_PACKED, Q5K_PACKED, QuantMatrix, Storage, WeightFormat};

/// One output: row `row` of `w` dotted with activation row `t`.
pub(crate) fn dot(w: &QuantMatrix, row: usize, a: &QuantizedActs, t: usize) -> f32 {
    let cols = w.cols;
    let nb = cols / 32;
    let x = &a.f[t * cols..(t + 1) * cols];
    match &w.storage {
        Storage::F32(v) => v[row * cols..(row + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a * b)
            .sum(),
        Storage::F16(v) => v[row * cols..(row + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a.to_f32() * b)
            .sum(),
        Storage::BF16(v) => v[row * cols..(row + 1) * cols]
            .iter()
            .zip(x)
            .map(|(a, b)| a.to_f32() * b)
            .sum(),
        Storage::Q8_0 { d, q } if !w.q8_acts => {
            let mut acc = 0f32;
            for b in 0..nb {
                let wq = &q[(row * nb + b) * 32..][..32];
                let s: f32 = wq
                    .iter()
                    .zip(&x[b * 32..b * 32 + 32])
                    .map(|(&p, r)| p as f32 * r)
                    .sum();
                acc += d[row * nb + b] * s;
            }
            acc
        }
        Storage::Q4_0 { d, q } | Storage::Q4_1 { d, q, .. } if !w.q8_acts => {
            let min = match &w.storage {
                Storage::Q4_1 { m, .. } => Some(m),
                _ => None,
            };
            let mut acc = 0f32;
            for b in 0..nb {
                let qs = &q[(row * nb + b) * 16..][..16];
                let xs = &x[b * 32..b * 32 + 32];
                let mut s = 0f32;
                for j in 0..16 {
                    s += (qs[j] & 0x0f) as f32 * xs[j] + (qs[j] >> 4) as f32 * xs[j + 16];
                }
                let wd = d[row * nb + b];
                let off = match min {
                    Some(m) => m[row * nb + b],
                    None => -8.0 * wd,
                };
                acc += wd * s + off * a.fsum[t * nb + b];
            }
            acc
        }
        Storage::Q8_0 { d, q } => {
            let mut acc = 0f32;
            for b in 0..nb {
                let wq = &q[(row * nb + b) * 32..][..32];
                let aq = &a.q[(t * nb + b) * 32..][..32];
                let s: i32 = wq.iter().zip(aq).map(|(&p, &r)| p as i32 * r as i32).sum();
                acc += d[row * nb + b] * a.d[t * nb + b] * s as f32;
            }
            acc
        }
        Storage::Q4_0 { d, q } => {
            let mut acc = 0f32;
            for b in 0..nb {
                let s = nibble_dot(
                    &q[(row * nb + b) * 16..][..16],
                    &a.q[(t * nb + b) * 32..][..32],
                );
                let wd = d[row * nb + b];
                // (q - 8) * d_w * d_a * q_a summed = d_w * (d_a * sum(q * q_a) - 8 * d_a * sum(q_a))
                acc += wd * (a.d[t * nb + b] * s as f32 - 8.0 * a.sum[t * nb + b]);
            }
            acc
        }
        Storage::Q4_1 { d, m, q } => {
            let mut acc = 0f32;
            for b in 0..nb {
                let s = nibble_dot(
                    &q[(row * nb + b) * 16..][..16],
                    &a.q[(t * nb + b) * 32..][..32],
                );
                acc += d[row * nb + b] * a.d[t * nb + b] * s as f32
                    + m[row * nb + b] * a.sum[t * nb + b];
            }
            acc
        }
        Storage::Q4K(bytes) | Storage::Q5K(bytes) | Storage::Q6K(bytes) => {
            let mut buf = [0f32; 256];
            let bb = k_block_bytes(w);
            let per_row = cols / 256 * bb;
            let row_bytes = &bytes[row * per_row..(row + 1) * per_row];
            let mut acc = 0f32;
            for (blk, xs) in row_bytes.chunks_exact(bb).zip(x.chunks_exact(256)) {
                decode_k_block(w, blk, &mut buf);
                acc += buf.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
            }
            acc
        }
        Storage::Parts(_) => {
            let (part, row) = w.part_of(row);
            dot(part, row, a, t)
        }
    }
}

/// Sum of unsigned nibbles times signed bytes for one 32-element block.
fn nibble_dot(w: &[u8], a: &[i8]) -> i32 {
    let mut s = 0i32;
    for j in 0..16 {
        s += (w[j] & 0x0f) as i32 * a[j] as i32 + (w[j] >> 4) as i32 * a[j + 16] as i32;
    }
    s
}

pub(crate) fn dequantize_row(w: &QuantMatrix, row: usize, out: &mut [f32]) {
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
fn k_block_bytes(w: &QuantMatrix) -> usize {
    match w.storage {
        Storage::Q4K(_) => Q4K_PACKED,
        Storage::Q5K(_) => Q5K_PACKED,
        _ => w.format.ggml_block_bytes(),
    }
}

fn decode_k_block(w: &QuantMatrix, blk: &[u8], out: &mut [f32; 256]) {
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
