//! Weight matrices kept in their compact formats, repacked for the kernels: scales as `f32`
//! beside the packed quants, so the inner loops never convert half floats.

use half::{bf16, f16};

use crate::error::{Error, Result};

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// 8-bit quants, one scale per 32.
    Q8_0,
    /// 4-bit quants around 8, one scale per 32.
    Q4_0,
    /// 4-bit quants with a scale and a minimum per 32.
    Q4_1,
    /// 5-bit quants around 16, one scale per 32 (llama.cpp's fallback where a K-quant's
    /// super-blocks do not fit a row).
    Q5_0,
    /// 5-bit quants with a scale and a minimum per 32.
    Q5_1,
    /// llama.cpp's Q4_K super-blocks of 256.
    Q4K,
    /// llama.cpp's Q5_K super-blocks of 256.
    Q5K,
    /// llama.cpp's Q6_K super-blocks of 256.
    Q6K,
}

impl WeightFormat {
    /// The format's name as llama.cpp writes it.
    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "F32",
            WeightFormat::F16 => "F16",
            WeightFormat::BF16 => "BF16",
            WeightFormat::Q8_0 => "Q8_0",
            WeightFormat::Q4_0 => "Q4_0",
            WeightFormat::Q4_1 => "Q4_1",
            WeightFormat::Q5_0 => "Q5_0",
            WeightFormat::Q5_1 => "Q5_1",
            WeightFormat::Q4K => "Q4_K",
            WeightFormat::Q5K => "Q5_K",
            WeightFormat::Q6K => "Q6_K",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            WeightFormat::F32 | WeightFormat::F16 | WeightFormat::BF16 => 1,
            WeightFormat::Q8_0
            | WeightFormat::Q4_0
            | WeightFormat::Q4_1
            | WeightFormat::Q5_0
            | WeightFormat::Q5_1 => 32,
            WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q6K => 256,
        }
    }

    /// Bytes per block in ggml's (GGUF's) layout.
    pub fn ggml_block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::BF16 => 2,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
            WeightFormat::Q5_0 => 22,
            WeightFormat::Q5_1 => 24,
            WeightFormat::Q4K => 144,
            WeightFormat::Q5K => 176,
            WeightFormat::Q6K => 210,
        }
    }

    /// Whether the kernels can quantize activations to 8 bits for this format.
    pub(crate) fn uses_q8_activations(self) -> bool {
        matches!(
            self,
            WeightFormat::Q8_0
                | WeightFormat::Q4_0
                | WeightFormat::Q4_1
                | WeightFormat::Q5_0
                | WeightFormat::Q5_1
                | WeightFormat::Q4K
                | WeightFormat::Q5K
                | WeightFormat::Q6K
        )
    }

    /// Whether the x86 and NEON paths have kernels for this format with f32 activations (Q5_0
    /// and Q5_1 have only 8-bit-activation kernels; with f32 they take the scalar code).
    pub(crate) fn has_f32_kernels(self) -> bool {
        !matches!(self, WeightFormat::Q5_0 | WeightFormat::Q5_1)
    }

    /// Whether a matrix of this format takes 8-bit activations unless told otherwise: on the
    /// AVX2 path (the CPU's best), for the formats whose integer kernels measured faster there
    /// (all but Q8_0, which reads as many bytes per weight as its f32 kernel can multiply);
    /// elsewhere f32 (see `docs/benchmarks.md`, "Kernel notes"). `EXO_KERNELS_ACTS=f32` turns
    /// the default off; `q8` (one plane) or `q16` (two planes) turns it on for every integer
    /// format on every path.
    pub(crate) fn q8_activations_by_default(self) -> bool {
        match acts_choice() {
            "f32" => false,
            "q8" | "q16" => self.uses_q8_activations(),
            _ => match crate::Isa::detected() {
                crate::Isa::Avx2 => self.uses_q8_activations() && self != WeightFormat::Q8_0,
                // Every integer format: the 32-blocks and Q6_K have VNNI kernels there; Q4_K
                // and Q5_K take the AVX2 integer kernels (decode on a 1B shape's matrices:
                // Q4_K 35 against 16 Gweights/s with f32 activations, Q6_K 33-39 against 8.4).
                crate::Isa::Avx512Vnni => self.uses_q8_activations(),
                _ => false,
            },
        }
    }

    /// With 8-bit activations by default, whether they take the second plane too (see
    /// [`QuantMatrix::with_q16_activations`]): for Q4_1, the default model's format, whose
    /// golden test holds its logits within 0.05 of the reference engines (one plane moves
    /// them by more than 0.5 there).
    pub(crate) fn fine_activations_by_default(self) -> bool {
        self.q8_activations_by_default()
            && match acts_choice() {
                "q8" => false,
                "q16" => true,
                // Q8_0 too where it takes 8-bit activations (AVX-512): the default model's
                // tied head is Q8_0, and one plane moves its logits by 0.03.
                _ => matches!(self, WeightFormat::Q4_1 | WeightFormat::Q8_0),
            }
    }
}

impl WeightFormat {
    /// Whether products of eight tokens or more (prefill, batches) take f32 activations even
    /// where the format takes 8-bit ones by default: on AVX2 for Q4_0, Q4_1 and Q8_0, whose
    /// one-row-by-eight-tokens f32 kernel measured faster there than the integer tiles (Q4_0
    /// prefill on the default model, one thread: 72 -> 97 tokens/s). Not when
    /// `EXO_KERNELS_ACTS` chooses.
    pub(crate) fn tiles_take_f32_by_default(self) -> bool {
        acts_choice().is_empty()
            && crate::Isa::detected() == crate::Isa::Avx2
            && matches!(
                self,
                WeightFormat::Q4_0 | WeightFormat::Q4_1 | WeightFormat::Q8_0
            )
    }
}

/// `EXO_KERNELS_ACTS`, read once.
fn acts_choice() -> &'static str {
    static CHOICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CHOICE.get_or_init(|| std::env::var("EXO_KERNELS_ACTS").unwrap_or_default())
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    /// Scales per block; quants row-major.
    Q8_0 {
        d: Vec<f32>,
        q: Vec<i8>,
    },
    /// Scales per block; 16 bytes per block, byte `j` holding element `j` (low nibble) and
    /// element `j + 16` (high nibble), as in ggml.
    Q4_0 {
        d: Vec<f32>,
        q: Vec<u8>,
    },
    /// As Q4_0 plus a minimum per block.
    Q4_1 {
        d: Vec<f32>,
        m: Vec<f32>,
        q: Vec<u8>,
    },
    /// Q5_0 (values `q - 16`; `m` empty) or Q5_1 (a minimum per block): the low four bits as
    /// Q4_0 keeps them, and each block's fifth bits as one `u32` (bit `j` for element `j`), as
    /// in ggml. 0.75 (Q5_0) or 0.875 bytes per weight, against ggml's 0.6875 and 0.75.
    Q5 {
        d: Vec<f32>,
        m: Vec<f32>,
        qh: Vec<u32>,
        q: Vec<u8>,
    },
    /// Q4_K super-blocks of 256 repacked to [`Q4K_PACKED`] bytes: `d` and `dmin` (f16), the eight
    /// 6-bit scales and eight 6-bit minimums unpacked to one byte each, then ggml's 128 quant
    /// bytes (chunk `c` holds sub-block `2c` in its low nibbles and `2c + 1` in its high ones).
    /// Unpacking the scales at load saves the kernels a dozen bit operations per super-block
    /// for 4 more bytes (0.578 bytes per weight instead of 0.5625).
    Q4K(Vec<u8>),
    /// Q5_K super-blocks repacked as Q4_K's, with ggml's 32 bytes of fifth bits between the
    /// minimums and the quants: [`Q5K_PACKED`] bytes (0.703 bytes per weight instead of 0.688).
    Q5K(Vec<u8>),
    /// Q6_K super-blocks as ggml stores them (210 bytes: low 4 bits, high 2 bits, sixteen
    /// signed 8-bit scales, f16 `d`): their layout already suits the kernels.
    Q6K(Vec<u8>),
    /// Matrices of different formats stacked (a Q4_K_M file mixes Q4_K and Q6_K within one
    /// layer's q/k/v): each part keeps its own format and kernels, rows one after another.
    Parts(Vec<QuantMatrix>),
}

/// Bytes of a repacked Q4_K super-block (see [`Storage::Q4K`]).
pub(crate) const Q4K_PACKED: usize = 148;

/// Bytes of a repacked Q5_K super-block (see [`Storage::Q5K`]).
pub(crate) const Q5K_PACKED: usize = 180;

/// Repacks one ggml Q4_K (144 bytes) or Q5_K (176 bytes) super-block into the kernels' layout:
/// `d`, `dmin`, the scales and minimums unpacked to a byte each, then the rest as stored.
fn repack_k(b: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&b[0..4]);
    let scales = &b[4..16];
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        (sc[j], m[j]) = crate::ggml::scale_min_k4(j, scales);
    }
    out.extend_from_slice(&sc);
    out.extend_from_slice(&m);
    out.extend_from_slice(&b[16..]);
}

/// One storage field of every part, concatenated in order.
fn cat<T: Clone>(parts: &[&QuantMatrix], field: impl Fn(&Storage) -> Option<&Vec<T>>) -> Vec<T> {
    parts
        .iter()
        .filter_map(|p| field(&p.storage))
        .flatten()
        .cloned()
        .collect()
}

/// A `[rows, cols]` weight matrix (rows are outputs) in a compact format.
#[derive(Clone, Debug)]
pub struct QuantMatrix {
    pub(crate) format: WeightFormat,
    /// Integer formats take activations quantized to 8-bit blocks instead of f32.
    pub(crate) q8_acts: bool,
    /// With `q8_acts`: activations as two 8-bit planes (`QuantizedActs::lo`), about 15 bits.
    pub(crate) fine: bool,
    /// Products of eight tokens or more take f32 activations all the same (the default on
    /// AVX2 for the formats of its eight-token f32 kernel; an explicit choice clears it).
    pub(crate) tiles_f32: bool,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) storage: Storage,
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl QuantMatrix {
    /// Takes a matrix stored in ggml's block layout (as in a GGUF file), rows first.
    pub fn from_ggml(format: WeightFormat, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let block = format.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(Error::BlockAlignment {
                format: format.name(),
                block,
                cols,
            });
        }
        let blocks = rows * cols / block;
        let expected = blocks * format.ggml_block_bytes();
        if bytes.len() != expected {
            return Err(Error::DataLength {
                format: format.name(),
                rows,
                cols,
                expected,
                actual: bytes.len(),
            });
        }
        let bb = format.ggml_block_bytes();
        let storage = match format {
            WeightFormat::F32 => Storage::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            WeightFormat::F16 => Storage::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            WeightFormat::BF16 => Storage::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            WeightFormat::Q8_0 => {
                let mut d = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(blocks * 32);
                for b in bytes.chunks_exact(bb) {
                    d.push(f16_at(b, 0));
                    q.extend(b[2..34].iter().map(|&x| x as i8));
                }
                Storage::Q8_0 { d, q }
            }
            WeightFormat::Q4_0 => {
                let mut d = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(blocks * 16);
                for b in bytes.chunks_exact(bb) {
                    d.push(f16_at(b, 0));
                    q.extend_from_slice(&b[2..18]);
                }
                Storage::Q4_0 { d, q }
            }
            WeightFormat::Q4_1 => {
                let mut d = Vec::with_capacity(blocks);
                let mut m = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(blocks * 16);
                for b in bytes.chunks_exact(bb) {
                    d.push(f16_at(b, 0));
                    m.push(f16_at(b, 2));
                    q.extend_from_slice(&b[4..20]);
                }
                Storage::Q4_1 { d, m, q }
            }
            WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
                // Q5_0: d, qh, 16 bytes of nibbles; Q5_1: d, m, qh, nibbles.
                let minimum = format == WeightFormat::Q5_1;
                let at = if minimum { 4 } else { 2 };
                let mut d = Vec::with_capacity(blocks);
                let mut m = Vec::with_capacity(if minimum { blocks } else { 0 });
                let mut qh = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(blocks * 16);
                for b in bytes.chunks_exact(bb) {
                    d.push(f16_at(b, 0));
                    if minimum {
                        m.push(f16_at(b, 2));
                    }
                    qh.push(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]));
                    q.extend_from_slice(&b[at + 4..at + 20]);
                }
                Storage::Q5 { d, m, qh, q }
            }
            WeightFormat::Q4K => {
                let mut out = Vec::with_capacity(blocks * Q4K_PACKED);
                for b in bytes.chunks_exact(bb) {
                    repack_k(b, &mut out);
                }
                Storage::Q4K(out)
            }
            WeightFormat::Q5K => {
                let mut out = Vec::with_capacity(blocks * Q5K_PACKED);
                for b in bytes.chunks_exact(bb) {
                    repack_k(b, &mut out);
                }
                Storage::Q5K(out)
            }
            WeightFormat::Q6K => Storage::Q6K(bytes.to_vec()),
        };
        let matrix = QuantMatrix {
            format,
            q8_acts: format.q8_activations_by_default(),
            fine: format.fine_activations_by_default(),
            tiles_f32: format.tiles_take_f32_by_default(),
            rows,
            cols,
            storage,
        };
        if matches!(format, WeightFormat::Q5_0 | WeightFormat::Q5_1)
            && !format.q8_activations_by_default()
        {
            // Q5 blocks have SIMD kernels only for 8-bit activations on x86: elsewhere (NEON,
            // or f32 activations asked for) they are widened to Q8_0, whose kernels exist on
            // every path, keeping their precision for 1.125 bytes per weight.
            let mut values = vec![0f32; rows * cols];
            for (r, out) in values.chunks_exact_mut(cols.max(1)).enumerate() {
                matrix.dequantize_row(r, out)?;
            }
            return QuantMatrix::from_f32(WeightFormat::Q8_0, rows, cols, &values);
        }
        Ok(matrix)
    }

    /// Builds a matrix from consecutive pieces of its rows in ggml's block layout (`(rows,
    /// bytes)` each), converting each piece as it arrives: a large tensor (a big vocabulary's
    /// head) never has its raw bytes and its repacked form in memory at once. The pieces stay
    /// parts of the matrix, as a mixed stack's do.
    pub fn from_ggml_pieces(
        format: WeightFormat,
        cols: usize,
        pieces: impl IntoIterator<Item = (usize, Vec<u8>)>,
    ) -> Result<Self> {
        let mut parts = Vec::new();
        for (rows, bytes) in pieces {
            parts.push(QuantMatrix::from_ggml(format, rows, cols, &bytes)?);
        }
        if parts.len() <= 1 {
            return parts.pop().ok_or(Error::Shape {
                what: "pieces of a matrix",
                expected: 1,
                actual: 0,
            });
        }
        Ok(QuantMatrix {
            format: parts[0].format,
            q8_acts: parts.iter().any(|p| p.q8_acts),
            fine: parts.iter().any(|p| p.fine),
            tiles_f32: parts.iter().any(|p| p.tiles_f32),
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            storage: Storage::Parts(parts),
        })
    }

    /// Quantizes (or converts) an `f32` matrix, `rows * cols` values row-major.
    ///
    /// K-quant formats are produced only by llama.cpp's converter; asking for one here gives
    /// Q8_0 (Q6_K, Q5_K) or Q4_1 (Q4_K) instead.
    pub fn from_f32(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::Shape {
                what: "matrix values",
                expected: rows * cols,
                actual: values.len(),
            });
        }
        let format = match format {
            WeightFormat::Q6K | WeightFormat::Q5K => WeightFormat::Q8_0,
            WeightFormat::Q4K => WeightFormat::Q4_1,
            f => f,
        };
        let block = format.block_elems();
        if !cols.is_multiple_of(block) {
            return Err(Error::BlockAlignment {
                format: format.name(),
                block,
                cols,
            });
        }
        let storage = match format {
            WeightFormat::F32 => Storage::F32(values.to_vec()),
            WeightFormat::F16 => Storage::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            WeightFormat::BF16 => {
                Storage::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
            WeightFormat::Q8_0 => {
                let mut d = Vec::new();
                let mut q = Vec::with_capacity(values.len());
                for chunk in values.chunks_exact(32) {
                    let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // Round the scale through f16 as GGUF stores it, so both paths agree.
                    let scale = f16::from_f32(amax / 127.0).to_f32();
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    d.push(scale);
                    q.extend(
                        chunk
                            .iter()
                            .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8),
                    );
                }
                Storage::Q8_0 { d, q }
            }
            WeightFormat::Q4_0 => {
                let mut d = Vec::new();
                let mut q = Vec::with_capacity(values.len() / 2);
                for chunk in values.chunks_exact(32) {
                    // ggml: the value of largest magnitude maps to -8.
                    let max = chunk
                        .iter()
                        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let scale = f16::from_f32(max / -8.0).to_f32();
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    d.push(scale);
                    let qv = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                    for j in 0..16 {
                        q.push(qv(chunk[j]) | (qv(chunk[j + 16]) << 4));
                    }
                }
                Storage::Q4_0 { d, q }
            }
            WeightFormat::Q4_1 => {
                let mut d = Vec::new();
                let mut m = Vec::new();
                let mut q = Vec::with_capacity(values.len() / 2);
                for chunk in values.chunks_exact(32) {
                    let min = chunk.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                    let max = chunk.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    let scale = f16::from_f32((max - min) / 15.0).to_f32();
                    let min = f16::from_f32(min).to_f32();
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    d.push(scale);
                    m.push(min);
                    let qv = |v: f32| (((v - min) * inv).round() as i32).clamp(0, 15) as u8;
                    for j in 0..16 {
                        q.push(qv(chunk[j]) | (qv(chunk[j + 16]) << 4));
                    }
                }
                Storage::Q4_1 { d, m, q }
            }
            // ggml's reference quantizers: Q5_0 maps the value of largest magnitude to -16,
            // Q5_1 spans the block's minimum to maximum in 31 steps.
            WeightFormat::Q5_0 | WeightFormat::Q5_1 => {
                let minimum = format == WeightFormat::Q5_1;
                let blocks = values.len() / 32;
                let mut d = Vec::with_capacity(blocks);
                let mut m = Vec::new();
                let mut qh = Vec::with_capacity(blocks);
                let mut q = Vec::with_capacity(blocks * 16);
                for chunk in values.chunks_exact(32) {
                    let (scale, min) = if minimum {
                        let lo = chunk.iter().fold(f32::INFINITY, |a, &v| a.min(v));
                        let hi = chunk.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                        (
                            f16::from_f32((hi - lo) / 31.0).to_f32(),
                            f16::from_f32(lo).to_f32(),
                        )
                    } else {
                        let max = chunk
                            .iter()
                            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                        (f16::from_f32(max / -16.0).to_f32(), 0.0)
                    };
                    let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                    let qv = |v: f32| -> u32 {
                        if minimum {
                            (((v - min) * inv + 0.5) as i32).clamp(0, 31) as u32
                        } else {
                            ((v * inv + 16.5) as i32).clamp(0, 31) as u32
                        }
                    };
                    d.push(scale);
                    if minimum {
                        m.push(min);
                    }
                    let mut high = 0u32;
                    for j in 0..16 {
                        let (a, b) = (qv(chunk[j]), qv(chunk[j + 16]));
                        q.push((a & 0x0f) as u8 | (((b & 0x0f) as u8) << 4));
                        high |= ((a >> 4) & 1) << j;
                        high |= ((b >> 4) & 1) << (j + 16);
                    }
                    qh.push(high);
                }
                Storage::Q5 { d, m, qh, q }
            }
            WeightFormat::Q4K | WeightFormat::Q5K | WeightFormat::Q6K => {
                Storage::F32(values.to_vec())
            }
        };
        Ok(QuantMatrix {
            format,
            q8_acts: format.q8_activations_by_default(),
            fine: format.fine_activations_by_default(),
            tiles_f32: format.tiles_take_f32_by_default(),
            rows,
            cols,
            storage,
        })
    }

    /// Stacks matrices with the same column count into one (their rows one after another), so
    /// that projections sharing an input (q, k, v; gate, up) run as one kernel call. Parts may
    /// have different formats: consecutive parts of one format are joined, and the groups keep
    /// their own formats and kernels inside the stack.
    pub fn stack(parts: &[QuantMatrix]) -> Result<Self> {
        let first = parts.first().ok_or(Error::Shape {
            what: "matrices to stack",
            expected: 1,
            actual: 0,
        })?;
        let cols = first.cols;
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(Error::Shape {
                what: "columns of stacked matrices",
                expected: cols,
                actual: p.cols,
            });
        }
        // Flatten stacks of stacks, then join runs of one format.
        let flat: Vec<&QuantMatrix> = parts
            .iter()
            .flat_map(|p| match &p.storage {
                Storage::Parts(inner) => inner.iter().collect::<Vec<_>>(),
                _ => vec![p],
            })
            .collect();
        let mut groups: Vec<QuantMatrix> = Vec::new();
        let mut run: Vec<&QuantMatrix> = Vec::new();
        for p in flat {
            if let Some(last) = run.last()
                && (last.format != p.format || last.q8_acts != p.q8_acts || last.fine != p.fine)
            {
                groups.push(stack_same(&run));
                run.clear();
            }
            run.push(p);
        }
        groups.push(stack_same(&run));
        if groups.len() == 1 {
            return Ok(groups.remove(0));
        }
        let rows = groups.iter().map(|g| g.rows).sum();
        Ok(QuantMatrix {
            format: groups[0].format,
            q8_acts: groups.iter().any(|g| g.q8_acts),
            fine: groups.iter().any(|g| g.fine),
            tiles_f32: groups.iter().any(|g| g.tiles_f32),
            rows,
            cols,
            storage: Storage::Parts(groups),
        })
    }

    /// Makes the integer kernels quantize activations to 8-bit blocks (llama.cpp's scheme)
    /// instead of taking them as f32.
    ///
    /// The default depends on the path and the format: on AVX2 the K-quants and Q4_0 take one
    /// 8-bit plane (byte products do four times the multiplies per instruction of the f32
    /// kernels), Q4_1 two planes ([`QuantMatrix::with_q16_activations`]) and Q8_0 f32, and
    /// products of eight tokens or more of Q4_0, Q4_1 and Q8_0 take f32 (the one-row-by-eight-
    /// tokens kernel); on the other paths f32. Choosing with this method (or its siblings)
    /// replaces the default for every product size. One plane flattens the outliers of a SwiGLU output feeding the down
    /// projection: on the default model (Q4_1 layers, Q8_0 head) it moves first-position
    /// logits by more than 0.5 and turns the greedy answer into a ramble, where two planes or
    /// f32 stay within 0.003 of the f32 path.
    pub fn with_q8_activations(self) -> Self {
        self.with_activations(true, false)
    }

    /// Makes the integer kernels quantize activations to two 8-bit planes, the second holding
    /// what the first leaves in steps of 1/254 of the first's (about 15 bits per value): the
    /// byte products of 8-bit activations at twice their integer work, with errors near f32's.
    /// Products of four tokens or more (prefill) take f32 activations instead: there the f32
    /// kernels widen each weight once for four tokens and measured faster.
    pub fn with_q16_activations(self) -> Self {
        self.with_activations(true, true)
    }

    /// Makes the kernels take activations as f32 (the opt-out from 8-bit activations).
    pub fn with_f32_activations(self) -> Self {
        self.with_activations(false, false)
    }

    fn with_activations(mut self, q8: bool, fine: bool) -> Self {
        self.q8_acts = q8;
        self.fine = fine;
        self.tiles_f32 = false;
        if let Storage::Parts(parts) = &mut self.storage {
            for p in parts.iter_mut() {
                p.q8_acts = q8;
                p.fine = fine;
                p.tiles_f32 = false;
            }
        }
        self
    }

    /// Whether a product quantizes the activations: some part takes 8-bit activations, and
    /// with `fine_as_f32` one that is not two-plane.
    pub(crate) fn quantizes_activations(&self, fine_as_f32: bool, tiles: bool) -> bool {
        match &self.storage {
            Storage::Parts(parts) => parts
                .iter()
                .any(|p| p.quantizes_activations(fine_as_f32, tiles)),
            _ => {
                self.uses_q8_activations()
                    && !(self.fine && fine_as_f32 && self.format.has_f32_kernels())
                    && !(self.tiles_f32 && tiles)
            }
        }
    }

    /// Whether a product quantizes the activations with their second plane: some part takes
    /// two planes, and with `fine_as_f32` one whose format keeps its integer kernels (Q5).
    pub(crate) fn quantizes_second_plane(&self, fine_as_f32: bool) -> bool {
        match &self.storage {
            Storage::Parts(parts) => parts.iter().any(|p| p.quantizes_second_plane(fine_as_f32)),
            _ => self.uses_q16_activations() && !(fine_as_f32 && self.format.has_f32_kernels()),
        }
    }

    /// Whether the kernels quantize this matrix's activations to two 8-bit planes.
    pub fn uses_q16_activations(&self) -> bool {
        match &self.storage {
            Storage::Parts(parts) => parts.iter().any(QuantMatrix::uses_q16_activations),
            _ => self.uses_q8_activations() && self.fine,
        }
    }

    /// Whether the kernels quantize this matrix's activations to 8-bit blocks.
    pub fn uses_q8_activations(&self) -> bool {
        match &self.storage {
            Storage::Parts(parts) => parts.iter().any(QuantMatrix::uses_q8_activations),
            _ => self.format.uses_q8_activations() && self.q8_acts,
        }
    }

    /// The formats of the matrix's parts, in row order: one for a plain matrix, several for a
    /// stack of mixed formats.
    pub fn formats(&self) -> Vec<WeightFormat> {
        match &self.storage {
            Storage::Parts(parts) => parts.iter().map(|p| p.format).collect(),
            _ => vec![self.format],
        }
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The storage format (of the first part, for a stack of mixed formats: see
    /// [`QuantMatrix::formats`]).
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes of memory the matrix occupies.
    pub fn bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::F16(v) => v.len() * 2,
            Storage::BF16(v) => v.len() * 2,
            Storage::Q8_0 { d, q } => d.len() * 4 + q.len(),
            Storage::Q4_0 { d, q } => d.len() * 4 + q.len(),
            Storage::Q4_1 { d, m, q } => (d.len() + m.len()) * 4 + q.len(),
            Storage::Q5 { d, m, qh, q } => (d.len() + m.len() + qh.len()) * 4 + q.len(),
            Storage::Q4K(v) | Storage::Q5K(v) | Storage::Q6K(v) => v.len(),
            Storage::Parts(parts) => parts.iter().map(QuantMatrix::bytes).sum(),
        }
    }

    /// The part holding `row` (`row < self.rows`), and the row's index within it.
    pub(crate) fn part_of(&self, row: usize) -> (&QuantMatrix, usize) {
        let Storage::Parts(parts) = &self.storage else {
            return (self, row);
        };
        let mut base = 0;
        for p in parts {
            if row < base + p.rows {
                return p.part_of(row - base);
            }
            base += p.rows;
        }
        (self, row)
    }
}

/// Stacks matrices of one format and activation kind (`parts` is not empty).
fn stack_same(parts: &[&QuantMatrix]) -> QuantMatrix {
    let first = parts[0];
    if parts.len() == 1 {
        return first.clone();
    }
    let rows = parts.iter().map(|p| p.rows).sum();
    let storage = match &first.storage {
        Storage::F32(_) => Storage::F32(cat(parts, |s| match s {
            Storage::F32(v) => Some(v),
            _ => None,
        })),
        Storage::F16(_) => Storage::F16(cat(parts, |s| match s {
            Storage::F16(v) => Some(v),
            _ => None,
        })),
        Storage::BF16(_) => Storage::BF16(cat(parts, |s| match s {
            Storage::BF16(v) => Some(v),
            _ => None,
        })),
        Storage::Q8_0 { .. } => Storage::Q8_0 {
            d: cat(parts, |s| match s {
                Storage::Q8_0 { d, .. } => Some(d),
                _ => None,
            }),
            q: cat(parts, |s| match s {
                Storage::Q8_0 { q, .. } => Some(q),
                _ => None,
            }),
        },
        Storage::Q4_0 { .. } => Storage::Q4_0 {
            d: cat(parts, |s| match s {
                Storage::Q4_0 { d, .. } => Some(d),
                _ => None,
            }),
            q: cat(parts, |s| match s {
                Storage::Q4_0 { q, .. } => Some(q),
                _ => None,
            }),
        },
        Storage::Q4_1 { .. } => Storage::Q4_1 {
            d: cat(parts, |s| match s {
                Storage::Q4_1 { d, .. } => Some(d),
                _ => None,
            }),
            m: cat(parts, |s| match s {
                Storage::Q4_1 { m, .. } => Some(m),
                _ => None,
            }),
            q: cat(parts, |s| match s {
                Storage::Q4_1 { q, .. } => Some(q),
                _ => None,
            }),
        },
        Storage::Q5 { .. } => Storage::Q5 {
            d: cat(parts, |s| match s {
                Storage::Q5 { d, .. } => Some(d),
                _ => None,
            }),
            m: cat(parts, |s| match s {
                Storage::Q5 { m, .. } => Some(m),
                _ => None,
            }),
            qh: cat(parts, |s| match s {
                Storage::Q5 { qh, .. } => Some(qh),
                _ => None,
            }),
            q: cat(parts, |s| match s {
                Storage::Q5 { q, .. } => Some(q),
                _ => None,
            }),
        },
        Storage::Q4K(_) => Storage::Q4K(cat(parts, |s| match s {
            Storage::Q4K(v) => Some(v),
            _ => None,
        })),
        Storage::Q5K(_) => Storage::Q5K(cat(parts, |s| match s {
            Storage::Q5K(v) => Some(v),
            _ => None,
        })),
        Storage::Q6K(_) => Storage::Q6K(cat(parts, |s| match s {
            Storage::Q6K(v) => Some(v),
            _ => None,
        })),
        // `stack` flattens stacks before grouping.
        Storage::Parts(_) => Storage::Parts(parts.iter().map(|&p| p.clone()).collect()),
    };
    QuantMatrix {
        format: first.format,
        q8_acts: first.q8_acts,
        fine: first.fine,
        tiles_f32: first.tiles_f32,
        rows,
        cols: first.cols,
        storage,
    }
}
