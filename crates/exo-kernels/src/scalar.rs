//! Portable reference kernels: always compiled, always tested, and the fallback on CPUs without
//! the SIMD extensions. The SIMD paths must equal these (tests compare them on random blocks).

use crate::acts::QuantizedActs;

use crate::decode::{decode_k_block, k_block_bytes};
use crate::matrix::{QuantMatrix, Storage};

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
