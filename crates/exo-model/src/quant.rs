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
    Q5K,
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
            13 => DType::Q5K,
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
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// Elements per block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => 256,
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
            DType::Q5K => 176,
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
            DType::Q5K => "Q5_K",
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
        DType::Q5K => {
            let mut buf = [0f32; 256];
            for b in blocks {
                exo_kernels::ggml::decode_q5_k(b, &mut buf);
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

/// A NaN or infinity found in stored tensor data: which element (float types) or which block's
/// scale (quantized types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NonFinite {
    /// Index of the element or block.
    pub(crate) index: usize,
    /// `value of element`, `scale of block` (`d`) or `minimum of block` (`dmin`, `m`).
    pub(crate) field: &'static str,
}

/// The first NaN or infinity in `bytes` holding whole blocks of `dtype`, looking only at what
/// can hold one: every value of a float type, and the f16 scale and minimum of each quantized
/// block (their other fields are small integers). One pass over those fields costs far less
/// than decoding, and a corrupt scale would otherwise poison every activation downstream.
pub(crate) fn first_non_finite(dtype: DType, bytes: &[u8]) -> Option<NonFinite> {
    use Float::{BF16, F16, F32};
    // (byte offset in the block, what it is, its format)
    let fields: &[(usize, &'static str, Float)] = match dtype {
        DType::F32 => &[(0, "value of element", F32)],
        DType::F16 => &[(0, "value of element", F16)],
        DType::BF16 => &[(0, "value of element", BF16)],
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => &[(0, "scale of block", F16)],
        DType::Q4_1 | DType::Q5_1 | DType::Q4K | DType::Q5K => {
            &[(0, "scale of block", F16), (2, "minimum of block", F16)]
        }
        DType::Q6K => &[(208, "scale of block", F16)],
    };
    let block = dtype.block_bytes();
    // Each field is scanned on its own and the earliest block reported, so that the inner loop
    // stays a byte test with a stride (it runs over every block of every tensor at load).
    fields
        .iter()
        .filter_map(|&(at, field, float)| {
            first_bad(bytes, block, at, float).map(|index| NonFinite { index, field })
        })
        .min_by_key(|bad| bad.index)
}

/// The float formats scale fields come in.
#[derive(Clone, Copy)]
enum Float {
    F16,
    BF16,
    F32,
}

/// The first whole block of `bytes` whose float at byte `at` is NaN or infinite: its exponent
/// bits are all ones. Only the bytes holding the exponent are read (little-endian: the last
/// one or two bytes of the value).
fn first_bad(bytes: &[u8], block: usize, at: usize, float: Float) -> Option<usize> {
    let blocks = bytes.len() / block;
    let (hi, hi_mask, lo_mask) = match float {
        // Sign, 5 exponent bits, 10 mantissa bits: the exponent is 0x7c of the high byte.
        Float::F16 => (at + 1, 0x7c, 0x00),
        // Sign, 8 exponent bits, 7 (bf16) or 23 (f32) mantissa bits: 0x7f of the high byte
        // and 0x80 of the one below it.
        Float::BF16 => (at + 1, 0x7f, 0x80),
        Float::F32 => (at + 3, 0x7f, 0x80),
    };
    let mut pos = hi;
    for index in 0..blocks {
        if bytes[pos] & hi_mask == hi_mask && bytes[pos - 1] & lo_mask == lo_mask {
            return Some(index);
        }
        pos += block;
    }
    None
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

/// Encodes `values` as Q4_0 blocks (used by tests and tools), as ggml does: the value of
/// largest magnitude maps to -8. `values.len()` must be a multiple of 32.
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 18);
    for block in values.chunks_exact(32) {
        let max = block
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = f16::from_f32(max / -8.0);
        let inv = if d.to_f32() != 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        out.extend_from_slice(&d.to_le_bytes());
        let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
        for j in 0..16 {
            out.push(q(block[j]) | (q(block[j + 16]) << 4));
        }
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

/// Encodes `values` as Q4_K super-blocks (used by tests and tools that write small GGUF files):
/// a plain min/max fit per 32 values, not llama.cpp's search for the best scales. `values.len()`
/// must be a multiple of 256; a trailing partial super-block is dropped.
pub fn quantize_q4_k(values: &[f32]) -> Vec<u8> {
    quantize_k(values, false)
}

/// Encodes `values` as Q5_K super-blocks, as [`quantize_q4_k`] does with 32 levels.
pub fn quantize_q5_k(values: &[f32]) -> Vec<u8> {
    quantize_k(values, true)
}

/// Q4_K, or Q5_K with `five`: 6-bit scales and minimums per 32 values, 4 or 5-bit quants.
fn quantize_k(values: &[f32], five: bool) -> Vec<u8> {
    let levels = if five { 31.0 } else { 15.0 };
    let mut out = Vec::with_capacity(values.len() / 256 * if five { 176 } else { 144 });
    for sb in values.chunks_exact(256) {
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        for (j, sub) in sb.chunks_exact(32).enumerate() {
            // Values are `scale * q - min` with `min >= 0`, so the range must include 0.
            let lo = sub.iter().fold(0f32, |m, v| m.min(*v));
            let hi = sub.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            scales[j] = (hi - lo) / levels;
            mins[j] = -lo;
        }
        let top = |v: &[f32; 8]| v.iter().fold(0f32, |m, x| m.max(*x));
        let d = f16::from_f32(top(&scales) / 63.0);
        let dmin = f16::from_f32(top(&mins) / 63.0);
        let six = |v: f32, unit: f32| {
            if unit > 0.0 {
                (v / unit).round().clamp(0.0, 63.0) as u8
            } else {
                0
            }
        };
        let sc: Vec<u8> = scales.iter().map(|&v| six(v, d.to_f32())).collect();
        let m: Vec<u8> = mins.iter().map(|&v| six(v, dmin.to_f32())).collect();
        let mut packed = [0u8; 12];
        for j in 0..4 {
            packed[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            packed[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            packed[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
        }
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&packed);
        let q = |j: usize, v: f32| {
            let (step, min) = (d.to_f32() * sc[j] as f32, dmin.to_f32() * m[j] as f32);
            if step > 0.0 {
                ((v + min) / step).round().clamp(0.0, levels) as u8
            } else {
                0
            }
        };
        let quants: Vec<u8> = (0..256).map(|e| q(e / 32, sb[e])).collect();
        if five {
            // Bit `j` of byte `l`: the fifth bit of element `l` of sub-block `j`.
            for l in 0..32 {
                out.push((0..8).fold(0u8, |h, j| h | ((quants[j * 32 + l] >> 4) << j)));
            }
        }
        for c in 0..4 {
            for l in 0..32 {
                let (a, b) = (quants[2 * c * 32 + l], quants[(2 * c + 1) * 32 + l]);
                out.push((a & 0x0f) | ((b & 0x0f) << 4));
            }
        }
    }
    out
}

/// Encodes `values` as Q6_K super-blocks (used by tests and tools that write small GGUF files):
/// a plain absolute-maximum fit per 16 values. `values.len()` must be a multiple of 256; a
/// trailing partial super-block is dropped.
pub fn quantize_q6_k(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 256 * 210);
    for sb in values.chunks_exact(256) {
        let mut scales = [0f32; 16];
        for (i, sub) in sb.chunks_exact(16).enumerate() {
            scales[i] = sub.iter().fold(0f32, |m, v| m.max(v.abs())) / 31.0;
        }
        let d = f16::from_f32(scales.iter().fold(0f32, |m, v| m.max(*v)) / 127.0);
        let unit = d.to_f32();
        let sc: Vec<i8> = scales
            .iter()
            .map(|&v| {
                if unit > 0.0 {
                    (v / unit).round().clamp(-128.0, 127.0) as i8
                } else {
                    0
                }
            })
            .collect();
        let q: Vec<u8> = sb
            .iter()
            .enumerate()
            .map(|(e, &v)| {
                let step = unit * sc[e / 16] as f32;
                let q = if step != 0.0 { (v / step).round() } else { 0.0 };
                (q.clamp(-32.0, 31.0) as i32 + 32) as u8
            })
            .collect();
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for h in 0..2 {
            for l in 0..32 {
                let e = h * 128 + l;
                let (q1, q2, q3, q4) = (q[e], q[e + 32], q[e + 64], q[e + 96]);
                ql[h * 64 + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
                ql[h * 64 + l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
                qh[h * 32 + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&v| v as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_read_q5_blocks_as_this_decoder_does()
    -> std::result::Result<(), exo_kernels::Error> {
        // Random bytes with finite f16 scales (and minimums), in ggml's Q5_0 and Q5_1 layouts.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut byte = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        };
        for (dtype, format, block) in [
            (DType::Q5_0, exo_kernels::WeightFormat::Q5_0, 22),
            (DType::Q5_1, exo_kernels::WeightFormat::Q5_1, 24),
        ] {
            let (rows, cols) = (3, 96);
            let mut bytes = Vec::new();
            for _ in 0..rows * cols / 32 {
                let mut b: Vec<u8> = (0..block).map(|_| byte()).collect();
                // Scales of magnitude about 0.01 (and minimums about 0.1).
                b[..2].copy_from_slice(&half::f16::from_f32(0.0123).to_le_bytes());
                if dtype == DType::Q5_1 {
                    b[2..4].copy_from_slice(&half::f16::from_f32(-0.1).to_le_bytes());
                }
                bytes.extend(b);
            }
            let mut want = Vec::new();
            dequantize(dtype, &bytes, &mut want);
            let m = exo_kernels::QuantMatrix::from_ggml(format, rows, cols, &bytes)?;
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row)?;
                let want = &want[r * cols..(r + 1) * cols];
                if m.format() == format {
                    assert_eq!(row, want, "{dtype:?} row {r}");
                } else {
                    // Widened to Q8_0 (a path without Q5 kernels): within half its step.
                    for (a, b) in row.iter().zip(want) {
                        assert!((a - b).abs() <= 0.01, "{dtype:?} row {r}: {a} vs {b}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn every_scale_field_is_checked_and_each_one_checked_matters() {
        let f16_nan = 0x7e00u16.to_le_bytes();
        let f16_inf = 0x7c00u16.to_le_bytes();
        // (type, where each f16 scale or minimum sits in a block, ggml's layouts)
        let cases: [(DType, &[usize]); 11] = [
            (DType::Q4_0, &[0]),
            (DType::Q4_1, &[0, 2]),
            (DType::Q5_0, &[0]),
            (DType::Q5_1, &[0, 2]),
            (DType::Q8_0, &[0]),
            (DType::Q4K, &[0, 2]),
            (DType::Q5K, &[0, 2]),
            (DType::Q6K, &[208]),
            (DType::F16, &[0]),
            (DType::BF16, &[]),
            (DType::F32, &[]),
        ];
        for (dtype, fields) in cases {
            let bb = dtype.block_bytes();
            let clean = vec![0u8; 3 * bb];
            assert_eq!(first_non_finite(dtype, &clean), None, "{dtype}");
            let mut poisoned: Vec<Vec<u8>> = Vec::new();
            for &at in fields {
                for bits in [f16_nan, f16_inf] {
                    let mut bytes = clean.clone();
                    bytes[bb + at..bb + at + 2].copy_from_slice(&bits);
                    poisoned.push(bytes);
                }
            }
            if dtype == DType::BF16 {
                let mut bytes = clean.clone();
                bytes[bb..bb + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
                poisoned.push(bytes);
            }
            if dtype == DType::F32 {
                for v in [f32::NAN, f32::NEG_INFINITY] {
                    let mut bytes = clean.clone();
                    bytes[bb..bb + 4].copy_from_slice(&v.to_le_bytes());
                    poisoned.push(bytes);
                }
            }
            for bytes in poisoned {
                let found = first_non_finite(dtype, &bytes);
                assert_eq!(found.map(|f| f.index), Some(1), "{dtype}");
                // The field matters: decoding the block gives a non-finite value.
                let mut out = Vec::new();
                dequantize(dtype, &bytes, &mut out);
                assert!(out.iter().any(|v| !v.is_finite()), "{dtype}");
            }
        }
        // Large finite scales are not mistaken for infinities.
        let mut bytes = vec![0u8; DType::Q8_0.block_bytes()];
        bytes[0..2].copy_from_slice(&half::f16::MAX.to_le_bytes());
        assert_eq!(first_non_finite(DType::Q8_0, &bytes), None);
    }

    #[test]
    fn k_quants_round_trip_within_a_step() {
        let values: Vec<f32> = (0..512)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.45) * (1.0 + (i / 64) as f32))
            .collect();
        for (dtype, bytes) in [
            (DType::Q4K, quantize_q4_k(&values)),
            (DType::Q5K, quantize_q5_k(&values)),
            (DType::Q6K, quantize_q6_k(&values)),
        ] {
            assert_eq!(Some(bytes.len()), dtype.bytes_for(values.len()));
            let mut out = Vec::new();
            dequantize(dtype, &bytes, &mut out);
            let levels = match dtype {
                DType::Q4K => 15.0,
                DType::Q5K => 31.0,
                _ => 62.0,
            };
            for (sub, (a, b)) in values.chunks(32).zip(out.chunks(32)).enumerate() {
                let range = a.iter().fold(0f32, |m, v| m.max(v.abs())) * 2.0;
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= range / levels,
                        "{dtype} sub-block {sub}: {x} vs {y}"
                    );
                }
            }
        }
    }

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
