//! Portable reference kernels: always compiled, always tested, and the fallback on CPUs without
//! the SIMD extensions. The SIMD paths must equal these (tests compare them on random blocks).

use crate::acts::QuantizedActs;

use crate::decode::{decode_k_block, k_block_bytes};
use crate::matrix::{QuantMatrix, Storage, WeightFormat};

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
        Storage::Q8_0 { d, q } if !crate::takes_q8(w, a) => {
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
        Storage::Q4_0 { d, q } | Storage::Q4_1 { d, q, .. } if !crate::takes_q8(w, a) => {
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
        Storage::Q5 { d, m, qh, q } if !crate::takes_q8(w, a) => {
            let mut acc = 0f32;
            for b in 0..nb {
                let i = row * nb + b;
                let mut s = 0f32;
                for (j, xv) in x[b * 32..b * 32 + 32].iter().enumerate() {
                    s += five_bits(&q[i * 16..][..16], qh[i], j) as f32 * xv;
                }
                let off = m.get(i).copied().unwrap_or(-16.0 * d[i]);
                acc += d[i] * s + off * a.fsum[t * nb + b];
            }
            acc
        }
        Storage::Q5 { d, m, qh, q } => {
            let acts = Acts::of(w, a, t);
            let mut acc = 0f32;
            for b in 0..nb {
                let i = row * nb + b;
                let s: i32 = (0..32)
                    .map(|j| five_bits(&q[i * 16..][..16], qh[i], j) as i32 * acts.at(b * 32 + j))
                    .sum();
                // Q5_0: (q - 16) * d_w summed = d_w * (d_a * sum(q * q_a) - 16 * sum(x_a)).
                let off = m.get(i).copied().unwrap_or(-16.0 * d[i]);
                acc += d[i] * acts.d(b) * s as f32 + off * acts.sum(b);
            }
            acc
        }
        Storage::Q8_0 { d, q } => {
            let acts = Acts::of(w, a, t);
            let mut acc = 0f32;
            for b in 0..nb {
                let wq = &q[(row * nb + b) * 32..][..32];
                let s: i32 = (0..32).map(|l| wq[l] as i32 * acts.at(b * 32 + l)).sum();
                acc += d[row * nb + b] * acts.d(b) * s as f32;
            }
            acc
        }
        Storage::Q4_0 { d, q } => {
            let acts = Acts::of(w, a, t);
            let mut acc = 0f32;
            for b in 0..nb {
                let s = nibble_dot(&q[(row * nb + b) * 16..][..16], &acts, b);
                let wd = d[row * nb + b];
                // (q - 8) * d_w * d_a * q_a summed = d_w * (d_a * sum(q * q_a) - 8 * d_a * sum(q_a))
                acc += wd * (acts.d(b) * s as f32 - 8.0 * acts.sum(b));
            }
            acc
        }
        Storage::Q4_1 { d, m, q } => {
            let acts = Acts::of(w, a, t);
            let mut acc = 0f32;
            for b in 0..nb {
                let s = nibble_dot(&q[(row * nb + b) * 16..][..16], &acts, b);
                acc += d[row * nb + b] * acts.d(b) * s as f32 + m[row * nb + b] * acts.sum(b);
            }
            acc
        }
        Storage::Q4K(bytes) | Storage::Q5K(bytes) | Storage::Q6K(bytes)
            if crate::takes_q8(w, a) =>
        {
            let acts = Acts::of(w, a, t);
            let bb = k_block_bytes(w);
            let per_row = cols / 256 * bb;
            let row_bytes = &bytes[row * per_row..(row + 1) * per_row];
            let mut acc = 0f32;
            for (s, blk) in row_bytes.chunks_exact(bb).enumerate() {
                acc += match w.format {
                    WeightFormat::Q6K => q6k_q8(blk, &acts, s * 8),
                    f => q4k_q8(blk, f == WeightFormat::Q5K, &acts, s * 8),
                };
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

/// One activation row quantized, as the integer kernels see it: with one plane the bytes
/// `q` and scales `d`; with two planes (`fine`) the integers `254 * q + lo` and scales `d / 254`.
struct Acts<'a> {
    a: &'a QuantizedActs,
    /// Index of the row's first value, and of its first block.
    base: usize,
    first: usize,
    fine: bool,
}

impl<'a> Acts<'a> {
    fn of(w: &QuantMatrix, a: &'a QuantizedActs, t: usize) -> Self {
        Acts {
            a,
            base: t * w.cols,
            first: t * w.cols / 32,
            fine: w.fine,
        }
    }

    /// The integer of value `i` of the row.
    fn at(&self, i: usize) -> i32 {
        let h = self.a.q[self.base + i] as i32;
        if self.fine {
            254 * h + self.a.lo[self.base + i] as i32
        } else {
            h
        }
    }

    /// The scale of block `b`'s integers.
    fn d(&self, b: usize) -> f32 {
        let d = self.a.d[self.first + b];
        if self.fine { d * (1.0 / 254.0) } else { d }
    }

    /// The sum of block `b`'s values, as quantized.
    fn sum(&self, b: usize) -> f32 {
        if self.fine {
            self.a.sum_fine[self.first + b]
        } else {
            self.a.sum[self.first + b]
        }
    }

    /// The integer sum of the `g`-th 16 values.
    fn sum16(&self, g: usize) -> i32 {
        let h = self.a.s16[self.first * 2 + g] as i32;
        if self.fine {
            254 * h + self.a.s16lo[self.first * 2 + g] as i32
        } else {
            h
        }
    }
}

/// Element `j` (0..32) of a Q5 block: its nibble (`qs[j]` low, `qs[j - 16]` high) and its
/// fifth bit from `qh`.
fn five_bits(qs: &[u8], qh: u32, j: usize) -> u32 {
    let nibble = if j < 16 {
        qs[j] & 0x0f
    } else {
        qs[j - 16] >> 4
    };
    nibble as u32 | (((qh >> j) & 1) << 4)
}

/// Sum of unsigned nibbles times the integers of activation block `b` for one 32-element block.
fn nibble_dot(w: &[u8], a: &Acts<'_>, b: usize) -> i32 {
    let mut s = 0i32;
    for (j, &v) in w.iter().enumerate().take(16) {
        s += (v & 0x0f) as i32 * a.at(b * 32 + j) + (v >> 4) as i32 * a.at(b * 32 + j + 16);
    }
    s
}

/// One repacked Q4_K (or Q5_K, `high`) super-block against quantized activations (blocks
/// `first..first + 8` of the row): per sub-block
/// `d * scale * d_act * sum(q * q_act) - dmin * min * sum(x_act)`, as the SIMD kernels compute
/// it (integer sums, then float).
fn q4k_q8(b: &[u8], high: bool, a: &Acts<'_>, first: usize) -> f32 {
    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
    let (sc, m) = (&b[4..12], &b[12..20]);
    let (qh, qs) = if high {
        (&b[20..52], &b[52..180])
    } else {
        (&b[0..0], &b[20..148])
    };
    let mut acc = 0f32;
    for j in 0..8 {
        let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
        let mut isum = 0i64;
        for l in 0..32 {
            let mut v = if j % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
            if high {
                v |= ((qh[l] >> j) & 1) << 4;
            }
            isum += v as i64 * a.at((first + j) * 32 + l) as i64;
        }
        acc +=
            d * sc[j] as f32 * a.d(first + j) * isum as f32 - dmin * m[j] as f32 * a.sum(first + j);
    }
    acc
}

/// One Q6_K super-block (ggml's layout) against quantized activations (blocks
/// `first..first + 8` of the row): per block of 32,
/// `d * d_act * sum over its two 16s of scale * sum((q - 32) * q_act)`, with the offset of 32
/// taken through the activations' sums of 16 as the SIMD kernels do.
fn q6k_q8(b: &[u8], a: &Acts<'_>, first: usize) -> f32 {
    let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
    let sc = &b[192..208];
    let mut acc = 0f32;
    for blk in 0..8 {
        let (h, g) = (blk / 4, blk % 4);
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
        let mut isum = 0i64;
        for l in 0..32 {
            let low = if g < 2 {
                ql[l + 32 * (g & 1)] & 0x0f
            } else {
                ql[l + 32 * (g & 1)] >> 4
            };
            let q = (low | (((qh[l] >> (2 * g)) & 3) << 4)) as i64;
            let scale = sc[2 * blk + l / 16] as i8 as i64;
            isum += scale * q * a.at((first + blk) * 32 + l) as i64;
        }
        for k in 0..2 {
            isum -= 32 * (sc[2 * blk + k] as i8 as i64) * a.sum16((first + blk) * 2 + k) as i64;
        }
        acc += d * a.d(first + blk) * isum as f32;
    }
    acc
}
