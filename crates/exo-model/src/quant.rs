//! Element types of checkpoint tensors and their decoding to `f32`.
//!
//! The block layouts follow ggml's definitions. Decoding is format work, not model math: it turns
//! stored bytes into the numbers they stand for, exactly as the reference implementation does.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// How a tensor's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q6K,
}

impl DType {
    /// The ggml type code of a GGUF tensor, or `None` for types we cannot decode.
    pub fn from_ggml(code: u32) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            6 => DType::Q5_0,
            7 => DType::Q5_1,
            8 => DType::Q8_0,
            12 => DType::Q4K,
            14 => DType::Q6K,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// The ggml type code.
    pub fn ggml_code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q5_0 => 6,
            DType::Q5_1 => 7,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::Q8_0 => 34,
            DType::Q4K => 144,
            DType::Q6K => 210,
        }
    }

    /// Bytes needed for `elems` elements, or `None` if `elems` is not a whole number of blocks.
    pub fn bytes_for(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// The name llama.cpp and safetensors use for the type.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::Q8_0 => "Q8_0",
            DType::Q4K => "Q4_K",
            DType::Q6K => "Q6_K",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Decodes `bytes` holding whole blocks of `dtype` into `out` (appending).
///
/// The caller checks that `bytes.len()` matches [`DType::bytes_for`]; a trailing partial block
/// is ignored rather than read out of bounds.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    let bb = dtype.block_bytes();
    let blocks = bytes.chunks_exact(bb);
    match dtype {
        DType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        DType::F16 => out.extend(blocks.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        DType::BF16 => out.extend(blocks.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        DType::Q4_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        DType::Q4_1 => {
            for b in blocks {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        DType::Q5_0 | DType::Q5_1 => {
            let has_min = dtype == DType::Q5_1;
            for b in blocks {
                let d = f16_at(b, 0);
                let (m, rest) = if has_min {
                    (f16_at(b, 2), &b[4..])
                } else {
                    (0.0, &b[2..])
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                let offset = if has_min { 0 } else { 16 };
                let lo = qs.iter().enumerate().map(|(j, &q)| {
                    let hi = ((qh >> j) & 1) << 4;
                    ((q & 0x0f) as i32 | hi as i32) - offset
                });
                out.extend(lo.map(|q| q as f32 * d + m));
                let hi = qs.iter().enumerate().map(|(j, &q)| {
                    let hi = ((qh >> (j + 16)) & 1) << 4;
                    ((q >> 4) as i32 | hi as i32) - offset
                });
                out.extend(hi.map(|q| q as f32 * d + m));
            }
        }
        DType::Q8_0 => {
            for b in blocks {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
        }
        DType::Q4K => {
            let mut buf = [0f32; 256];
            for b in blocks {
                exo_kernels::ggml::decode_q4_k(b, &mut buf);
                out.extend_from_slice(&buf);
            }
        }
        DType::Q6K => {
            let mut buf = [0f32; 256];
            for b in blocks {
                exo_kernels::ggml::decode_q6_k(b, &mut buf);
                out.extend_from_slice(&buf);
            }
        }
    }
}

/// Encodes `values` as Q8_0 blocks (used by tests and tools that write small GGUF files).
///
/// `values.len()` must be a multiple of 32; a trailing partial block is dropped.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks_exact(32) {
        let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
    }
    out
}

/// Encodes `values` as Q4_1 blocks (used by tests); `values.len()` must be a multiple of 32.
pub fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for block in values.chunks_exact(32) {
        let min = block.iter().fold(f32::INFINITY, |m, v| m.min(*v));
        let max = block.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let d = (max - min) / 15.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
        let q = |v: f32| (((v - min) * inv).round() as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut out = Vec::new();
        dequantize(DType::Q8_0, &quantize_q8_0(&values), &mut out);
        assert_eq!(out.len(), 64);
        let step = 11.0 / 7.0 / 127.0;
        for (a, b) in values.iter().zip(&out) {
            assert!((a - b).abs() <= step, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_1_round_trips_within_half_a_step() {
        let values: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut out = Vec::new();
        dequantize(DType::Q4_1, &quantize_q4_1(&values), &mut out);
        let step = (values[31] - values[0]) / 15.0;
        for (a, b) in values.iter().zip(&out) {
            assert!((a - b).abs() <= step * 0.51 + 1e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn q4_0_decodes_a_hand_made_block() {
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut out = Vec::new();
        dequantize(DType::Q4_0, &block, &mut out);
        assert_eq!(out[0], -4.0);
        assert_eq!(out[15], 3.5);
        assert_eq!(out[16], 3.5);
        assert_eq!(out[31], -4.0);
    }

    #[test]
    fn block_sizes_match_ggml() {
        assert_eq!(DType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(DType::Q6K.bytes_for(256), Some(210));
        assert_eq!(DType::Q8_0.bytes_for(33), None);
        assert_eq!(DType::from_ggml(3), Some(DType::Q4_1));
        assert_eq!(DType::from_ggml(99), None);
    }
}
