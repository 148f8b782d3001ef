//! Small random models written to disk, for tests here and in the crates above: a Hugging Face
//! folder (single or sharded safetensors) or a GGUF file, from the same seed and the same values.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::gguf::{self, TensorToWrite, Value};
use crate::names::{LayerPart, TensorId};
use crate::quant::DType;
use crate::safetensors_files::{F32Tensor, write_safetensors};

/// A tiny Llama with grouped-query attention and tied embeddings.
pub fn tiny_config(num_layers: usize) -> ModelConfig {
    ModelConfig {
        model_type: "llama".into(),
        vocab_size: 96,
        hidden_size: 32,
        intermediate_size: 64,
        num_layers,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: true,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        variant: Default::default(),
    }
}

/// Every tensor `config` implies, with deterministic pseudo-random values from `seed`.
pub fn random_tensors(
    config: &ModelConfig,
    seed: u64,
) -> BTreeMap<TensorId, (Vec<usize>, Vec<f32>)> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) as f32 - 0.5
    };
    let mut ids = vec![TensorId::Embedding, TensorId::FinalNorm];
    if !config.tie_word_embeddings {
        ids.push(TensorId::Head);
    }
    let parts = config.layer_parts();
    for layer in 0..config.num_layers {
        ids.extend(parts.iter().map(|&part| TensorId::Layer { layer, part }));
    }
    ids.into_iter()
        .map(|id| {
            let shape = config.expected_shape(id);
            let n: usize = shape.iter().product();
            let is_norm = matches!(
                id,
                TensorId::FinalNorm
                    | TensorId::Layer {
                        part: LayerPart::AttnNorm
                            | LayerPart::MlpNorm
                            | LayerPart::QNorm
                            | LayerPart::KNorm
                            | LayerPart::PostAttnNorm
                            | LayerPart::PostMlpNorm,
                        ..
                    }
            );
            let scale = if shape.len() == 2 {
                2.0 / (shape[1] as f32).sqrt()
            } else {
                0.2
            };
            let data = (0..n)
                .map(|_| {
                    if is_norm {
                        1.0 + next() * 0.2
                    } else {
                        next() * scale
                    }
                })
                .collect();
            (id, (shape, data))
        })
        .collect()
}

/// Writes a Hugging Face folder (`config.json` and safetensors split into `shards` files).
pub fn write_hf_folder(dir: &Path, config: &ModelConfig, seed: u64, shards: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json()).unwrap_or_default();
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    let tensors: Vec<(String, F32Tensor)> = random_tensors(config, seed)
        .into_iter()
        .map(|(id, (shape, data))| {
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (
                id.hf_name_in(config.hf_model_type()),
                F32Tensor {
                    shape,
                    bytes,
                    dtype: safetensors::Dtype::F32,
                },
            )
        })
        .collect();
    let shards = shards.max(1);
    if shards == 1 {
        return write_safetensors(&dir.join("model.safetensors"), &tensors);
    }
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        for (tensor, _) in chunk {
            weight_map.insert(tensor.clone(), name.clone().into());
        }
        write_safetensors(&dir.join(&name), chunk)?;
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, index.to_string()).map_err(|e| Error::io(&path, e))
}

/// Writes the same model as a GGUF file, with q/k rows permuted as llama.cpp's converter does
/// and with a tiny byte-level tokenizer in the metadata.
pub fn write_gguf(path: &Path, config: &ModelConfig, seed: u64) -> Result<()> {
    write_gguf_typed(path, config, seed, &|_| DType::F32)
}

/// As [`write_gguf`], each tensor stored as `dtype(id)` says (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
/// Q4_K, Q5_K or Q6_K; other types, vectors and matrices whose rows are not whole blocks stay F32): a Q4_K_M file,
/// for example, mixes Q4_K and Q6_K within one layer.
pub fn write_gguf_typed(
    path: &Path,
    config: &ModelConfig,
    seed: u64,
    dtype: &dyn Fn(TensorId) -> DType,
) -> Result<()> {
    // Only llama's converter permutes the q/k rows for its rotary layout.
    let family = config.gguf_architecture();
    let mut tensors = Vec::new();
    for (id, (shape, mut data)) in random_tensors(config, seed) {
        if let TensorId::Layer { part, .. } = id
            && family == "llama"
        {
            match part {
                LayerPart::Q => permute_rows(&mut data, &shape, config.num_heads),
                LayerPart::K => permute_rows(&mut data, &shape, config.num_kv_heads),
                _ => {}
            }
        }
        let want = dtype(id);
        let whole_blocks = shape.len() == 2 && shape[1].is_multiple_of(want.block_elems());
        let (dtype, data) = encode(if whole_blocks { want } else { DType::F32 }, &data);
        push_gguf_tensor(&mut tensors, config, id, shape, dtype, data);
    }
    let arch = |k: &str| format!("{family}.{k}");
    let u = |v: usize| Value::U32(v as u32);
    // A vocabulary of printable bytes after three control tokens.
    let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
    tokens
        .extend((0..config.vocab_size - 3).map(|i| char::from(b'!' + (i % 90) as u8).to_string()));
    let mut seen = std::collections::HashSet::new();
    for t in tokens.iter_mut() {
        while !seen.insert(t.clone()) {
            t.push('!');
        }
    }
    let types = (0..tokens.len())
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(family.into()),
        ),
        (arch("attention.key_length"), u(config.head_dim)),
        (arch("attention.value_length"), u(config.head_dim)),
        (arch("block_count"), u(config.num_layers)),
        (arch("embedding_length"), u(config.hidden_size)),
        (arch("feed_forward_length"), u(config.intermediate_size)),
        (arch("attention.head_count"), u(config.num_heads)),
        (arch("attention.head_count_kv"), u(config.num_kv_heads)),
        (arch("context_length"), u(config.max_position_embeddings)),
        (
            arch("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (arch("rope.freq_base"), Value::F32(config.rope_theta as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(vec![])),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
    ];
    let tensors_extra = family_metadata(config, family, &mut metadata);
    tensors.extend(tensors_extra);
    gguf::write(path, &metadata, &tensors)
}

/// The metadata a family adds to a GGUF file (sliding window, experts), and the tensors it
/// adds outside the layers (Llama 3's `rope_freqs.weight`).
fn family_metadata(
    config: &ModelConfig,
    family: &str,
    metadata: &mut Vec<(String, Value)>,
) -> Vec<TensorToWrite> {
    let arch = |k: &str| format!("{family}.{k}");
    let u = |v: usize| Value::U32(v as u32);
    if let Some(window) = config.variant.sliding_window {
        metadata.push((arch("attention.sliding_window"), u(window)));
    }
    if let Some(moe) = config.variant.moe {
        metadata.push((arch("expert_count"), u(moe.experts)));
        metadata.push((arch("expert_used_count"), u(moe.experts_per_token)));
        metadata.push((arch("expert_feed_forward_length"), u(moe.intermediate_size)));
    }
    let mut extra = Vec::new();
    if let Some(factors) = &config.variant.rope_freq_factors {
        extra.push(TensorToWrite {
            name: "rope_freqs.weight".into(),
            shape: vec![factors.len()],
            dtype: DType::F32,
            data: factors
                .iter()
                .flat_map(|&f| (f as f32).to_le_bytes())
                .collect(),
        });
    }
    extra
}

/// Adds the tensor `id` to a GGUF file's list as llama.cpp lays it out: experts stacked into
/// one `[experts, rows, cols]` tensor per projection, fused projections (Phi-3) into one
/// matrix, everything else on its own.
fn push_gguf_tensor(
    tensors: &mut Vec<TensorToWrite>,
    config: &ModelConfig,
    id: TensorId,
    shape: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
) {
    let q = config.num_heads * config.head_dim;
    let kv = config.num_kv_heads * config.head_dim;
    let fused = id
        .fused_source(q, kv, config.intermediate_size)
        .filter(|_| config.variant.fused_projections);
    let expert = match id {
        TensorId::Layer { part, .. } => part.expert(),
        _ => None,
    };
    match fused {
        _ if expert.is_some() => {
            let name = id.gguf_name();
            match tensors.iter_mut().find(|t| t.name == name) {
                Some(t) => {
                    t.data.extend_from_slice(&data);
                    t.shape[0] += 1;
                }
                None => tensors.push(TensorToWrite {
                    name,
                    shape: [vec![1], shape].concat(),
                    dtype,
                    data,
                }),
            }
        }
        // The parts of a fused matrix come in row order: append to the first part.
        Some(f) if f.rows.start > 0 => {
            if let Some(t) = tensors.iter_mut().find(|t| t.name == f.gguf_name) {
                t.data.extend_from_slice(&data);
                t.shape[0] += shape[0];
            }
        }
        Some(f) => tensors.push(TensorToWrite {
            name: f.gguf_name,
            shape,
            dtype,
            data,
        }),
        None => tensors.push(TensorToWrite {
            name: id.gguf_name(),
            shape,
            dtype,
            data,
        }),
    }
}

/// llama.cpp's `permute`: within each head, Hugging Face row `j * head_dim/2 + i` becomes row
/// `2i + j`.
fn permute_rows(data: &mut Vec<f32>, shape: &[usize], heads: usize) {
    let (rows, cols) = (shape[0], shape[1]);
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * head_dim + 2 * i + j;
                let src = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    *data = out;
}

/// Writes a copy of the GGUF file `src` with every tensor decoded to F32 (same names, shapes and
/// metadata): the source for llama.cpp's `llama-quantize` when only a quantized file exists.
pub fn write_dequantized_gguf(src: &Path, dst: &Path) -> Result<()> {
    write_converted_gguf(src, dst, &|_| DType::F32)
}

/// Writes a copy of the GGUF file `src` with each tensor decoded and encoded again as
/// `dtype(name)` says (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K; vectors, other types and
/// matrices or stacks of experts whose rows are not whole blocks become F32). Same names, shapes
/// and metadata.
pub fn write_converted_gguf(src: &Path, dst: &Path, dtype: &dyn Fn(&str) -> DType) -> Result<()> {
    let file = gguf::GgufFile::open(src)?;
    let metadata: Vec<(String, Value)> = file
        .metadata()
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.file_type" | "general.quantization_version"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        let bytes = file.read_tensor(info)?;
        let mut values = Vec::with_capacity(info.elems());
        crate::quant::dequantize(info.dtype, &bytes, &mut values);
        let want = dtype(&info.name);
        // Matrices, and stacks of them (experts): rows of whole blocks.
        let whole_blocks = info.shape.len() >= 2
            && info.shape[info.shape.len() - 1].is_multiple_of(want.block_elems());
        let (dtype, data) = encode(if whole_blocks { want } else { DType::F32 }, &values);
        tensors.push(TensorToWrite {
            name: info.name.clone(),
            shape: info.shape.clone(),
            dtype,
            data,
        });
    }
    gguf::write(dst, &metadata, &tensors)
}

/// `values` encoded as `dtype` where this crate has an encoder, else as F32; returns the type
/// used.
fn encode(dtype: DType, values: &[f32]) -> (DType, Vec<u8>) {
    use crate::quant::{
        quantize_q4_0, quantize_q4_1, quantize_q4_k, quantize_q5_k, quantize_q6_k, quantize_q8_0,
    };
    match dtype {
        DType::F16 => (
            dtype,
            values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            dtype,
            values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        ),
        DType::Q8_0 => (dtype, quantize_q8_0(values)),
        DType::Q4_0 => (dtype, quantize_q4_0(values)),
        DType::Q4_1 => (dtype, quantize_q4_1(values)),
        DType::Q4K => (dtype, quantize_q4_k(values)),
        DType::Q5K => (dtype, quantize_q5_k(values)),
        DType::Q6K => (dtype, quantize_q6_k(values)),
        _ => (
            DType::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
    }
}

/// Writes a Llama-family GGUF of `config`'s shape with random weights stored as F16 (F32 for
/// norms) and the tokenizer and chat template of the GGUF file
/// `tokenizer_from` (whose vocabulary must have `config.vocab_size` tokens): a realistic-size
/// model for benchmarks, quantized from there with llama.cpp's `llama-quantize`. Weights are
/// uniform with a standard deviation of about `1 / sqrt(cols)`, so activations stay in range.
pub fn write_synthetic_gguf(
    path: &Path,
    config: &ModelConfig,
    seed: u64,
    tokenizer_from: &Path,
) -> Result<()> {
    write_synthetic(path, config, seed, tokenizer_from, DType::F16)
}

/// The families whose small random models (`family_fixture`) have llama.cpp's outputs recorded
/// in `exo-shard`'s test fixtures (by `cargo xtask family-fixtures`).
pub const FIXTURE_FAMILIES: [&str; 8] = [
    "qwen3", "qwen2", "gemma3", "phi3", "mistral", "llama3", "qwen3moe", "mixtral",
];

/// A small random model of family `name` (one of [`FIXTURE_FAMILIES`]) with the default model's
/// vocabulary, so that its tokenizer serves and llama.cpp loads the file: seven layers (Gemma
/// 3's sixth is global), a sliding window of four positions for Gemma 3 and Phi-3, attention
/// bias for Qwen2, query/key norms for Qwen3 and Gemma 3, fused projections for Phi-3, Llama 3's
/// per-frequency rope divisors, and experts for Qwen3-MoE and Mixtral.
pub fn family_fixture(name: &str) -> Option<ModelConfig> {
    let base = ModelConfig {
        model_type: name.into(),
        vocab_size: 49152,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 7,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 512,
        ..tiny_config(7)
    };
    Some(match name {
        "qwen3" => ModelConfig {
            variant: crate::Variant {
                qk_norm: true,
                ..Default::default()
            },
            ..base
        },
        "qwen2" => ModelConfig {
            attention_bias: true,
            ..base
        },
        // Fused q/k/v and gate/up, a separate head; its file says a window of four positions,
        // which llama.cpp (and so our GGUF reader) ignores for Phi-3.
        "phi3" => ModelConfig {
            num_kv_heads: 4,
            tie_word_embeddings: false,
            variant: crate::Variant {
                sliding_window: Some(4),
                fused_projections: true,
                ..Default::default()
            },
            ..base
        },
        "gemma3" => ModelConfig {
            variant: crate::Variant {
                qk_norm: true,
                sandwich_norms: true,
                activation: crate::Activation::GeluTanh,
                sliding_window: Some(4),
                ..Default::default()
            },
            ..base
        },
        // Mistral's GGUF files are Llama's architecture (llama.cpp ignores a window there):
        // grouped queries four to one and no bias.
        "mistral" => ModelConfig {
            num_heads: 8,
            rms_norm_eps: 1e-5,
            head_dim: 32,
            ..base
        },
        // Llama 3.x: the rope scaling stored as one divisor per rotary frequency, from 1 (fast
        // frequencies) to 8 (slow ones), as `rope_freqs.weight`.
        "llama3" => {
            let half = base.head_dim / 2;
            ModelConfig {
                model_type: "llama".into(),
                rope_theta: 500_000.0,
                variant: crate::Variant {
                    rope_freq_factors: Some(
                        (0..half)
                            .map(|i| 1.0 + 7.0 * (i as f64 / (half - 1) as f64).powi(2))
                            .collect(),
                    ),
                    ..Default::default()
                },
                ..base
            }
        }
        // Qwen3-MoE: eight experts of width 128, two per token, their weights renormalised.
        "qwen3moe" => ModelConfig {
            variant: crate::Variant {
                qk_norm: true,
                moe: Some(crate::Moe {
                    experts: 8,
                    experts_per_token: 2,
                    intermediate_size: 128,
                    normalize: true,
                }),
                ..Default::default()
            },
            ..base
        },
        // Mixtral (a Llama with experts in GGUF): four experts as wide as the dense width, two
        // per token.
        "mixtral" => ModelConfig {
            model_type: "llama".into(),
            intermediate_size: 256,
            variant: crate::Variant {
                moe: Some(crate::Moe {
                    experts: 4,
                    experts_per_token: 2,
                    intermediate_size: 256,
                    normalize: true,
                }),
                ..Default::default()
            },
            ..base
        },
        _ => return None,
    })
}

/// Writes `family_fixture(name)` as an F32 GGUF with the tokenizer of `tokenizer_from` (the
/// default model's file).
pub fn write_family_fixture(path: &Path, name: &str, tokenizer_from: &Path) -> Result<()> {
    let config = family_fixture(name).ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        message: format!("no fixture family `{name}`"),
    })?;
    write_synthetic(path, &config, 7, tokenizer_from, DType::F32)
}

fn write_synthetic(
    path: &Path,
    config: &ModelConfig,
    seed: u64,
    tokenizer_from: &Path,
    matrices: DType,
) -> Result<()> {
    let source = gguf::GgufFile::open(tokenizer_from)?;
    let family = config.gguf_architecture();
    let arch = |k: &str| format!("{family}.{k}");
    let u = |v: usize| Value::U32(v as u32);
    let mut metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String(family.into()),
        ),
        (arch("attention.key_length"), u(config.head_dim)),
        (arch("attention.value_length"), u(config.head_dim)),
        (
            "general.name".to_string(),
            Value::String(format!(
                "synthetic-{}x{}",
                config.num_layers, config.hidden_size
            )),
        ),
        (arch("block_count"), u(config.num_layers)),
        (arch("embedding_length"), u(config.hidden_size)),
        (arch("feed_forward_length"), u(config.intermediate_size)),
        (arch("attention.head_count"), u(config.num_heads)),
        (arch("attention.head_count_kv"), u(config.num_kv_heads)),
        (arch("context_length"), u(config.max_position_embeddings)),
        (arch("rope.dimension_count"), u(config.head_dim)),
        (arch("vocab_size"), u(config.vocab_size)),
        (
            arch("attention.layer_norm_rms_epsilon"),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (arch("rope.freq_base"), Value::F32(config.rope_theta as f32)),
    ];
    let tensors_extra = family_metadata(config, family, &mut metadata);
    metadata.extend(
        source
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer."))
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut ids = vec![TensorId::Embedding, TensorId::FinalNorm];
    if !config.tie_word_embeddings {
        ids.push(TensorId::Head);
    }
    let parts = config.layer_parts();
    for layer in 0..config.num_layers {
        ids.extend(parts.iter().map(|&part| TensorId::Layer { layer, part }));
    }
    let mut tensors: Vec<TensorToWrite> = Vec::with_capacity(ids.len());
    for id in ids {
        let shape = config.expected_shape(id);
        let n: usize = shape.iter().product();
        let bias = matches!(id, TensorId::Layer { part, .. } if part.is_bias());
        let data = if shape.len() == 2 || bias {
            // Uniform in +-sqrt(3 / cols): standard deviation 1 / sqrt(cols) (biases 0.1).
            let bound = match shape.get(1) {
                Some(&cols) => (3.0 / cols as f32).sqrt(),
                None => 0.17,
            };
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound;
                if shape.len() == 2 && matrices == DType::F16 {
                    bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
                } else {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            bytes
        } else {
            (0..n).flat_map(|_| 1f32.to_le_bytes()).collect()
        };
        let dtype = if shape.len() == 2 {
            matrices
        } else {
            DType::F32
        };
        push_gguf_tensor(&mut tensors, config, id, shape, dtype, data);
    }
    tensors.extend(tensors_extra);
    gguf::write(path, &metadata, &tensors)
}

/// Copies the GGUF file `src` to `dst` with its metadata and tensors edited by `edit`: how
/// tests make files that a writer would never produce (corrupt counts, odd types).
pub fn rewrite_gguf(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<TensorToWrite>),
) -> Result<()> {
    let file = gguf::GgufFile::open(src)?;
    let mut metadata: Vec<(String, Value)> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors = Vec::with_capacity(file.tensors().len());
    for info in file.tensors() {
        tensors.push(TensorToWrite {
            name: info.name.clone(),
            shape: info.shape.clone(),
            dtype: info.dtype,
            data: file.read_tensor(info)?,
        });
    }
    edit(&mut metadata, &mut tensors);
    gguf::write(dst, &metadata, &tensors)
}

/// Texts whose Unigram tokenization `exo-model`'s tests compare with llama.cpp's (spaces in
/// runs and at the ends, characters no entry covers, a user-defined token, tabs and newlines).
pub const UNIGRAM_SAMPLES: [&str; 7] = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading and   several   spaces  ",
    "What is the capital of France? Paris!",
    "unknown: zzz Qq \u{fc}ber \u{1f642} end",
    "hello<tool>world and <tool> again",
    "tabs\tand\nnewlines stay",
    "theinthe onthe atan",
];

/// Writes a GGUF holding only a small SentencePiece Unigram vocabulary (`tokenizer.ggml.model`
/// `t5`: control `<pad>` and `</s>`, unknown `<unk>`, a user-defined `<tool>`, single
/// characters with and without `▁`, and some English words and pieces, with fixed pseudo-random
/// scores), `remove_extra_whitespaces` as given, and the Llama hyper-parameters llama.cpp's
/// vocabulary-only loading asks for: what the Unigram tokenizer is checked with against
/// llama.cpp's `llama-tokenize`.
pub fn write_unigram_gguf(path: &Path, remove_extra_whitespaces: bool) -> Result<()> {
    const WORDS: &str = "the quick brown fox jump jumps over lazy dog what is capital of france \
        paris hello world and again leading several spaces tabs new lines stay unknown end an \
        in on at er ing ed th he re en es ti on al ber";
    const PIECES: &str = "th he in er an re on at en nd ti es or te of ed is it al ar st to nt ng \
        ing ion tion ll ow ck qu ui ic ro fo ox mp ps ov la az zy do og wh ha ca ap pi ta fr ra \
        nc ce pa ar ri is hel lo wor ld ag ai ain ad di se ve sp ac ab ne li ta ay un kn own nd";
    let mut tokens: Vec<(String, i32)> = vec![
        ("<pad>".into(), 3),
        ("</s>".into(), 3),
        ("<unk>".into(), 2),
        ("<tool>".into(), 4),
        ("\u{2581}".into(), 1),
    ];
    let mut seen: std::collections::HashSet<String> = tokens.iter().map(|t| t.0.clone()).collect();
    let mut push = |t: String| {
        if seen.insert(t.clone()) {
            tokens.push((t, 1));
        }
    };
    // Single characters, but no `z` nor `Q`: those fall to the unknown token.
    for c in ('a'..='y')
        .chain('A'..='P')
        .chain('R'..='Z')
        .chain('0'..='9')
    {
        push(c.to_string());
        push(format!("\u{2581}{c}"));
    }
    for c in ".,!?:;'-()\t\n".chars() {
        push(c.to_string());
    }
    for w in WORDS.split_whitespace() {
        push(format!("\u{2581}{w}"));
        push(w.to_string());
    }
    for p in PIECES.split_whitespace() {
        push(p.to_string());
    }
    push("\u{2581}France".into());
    push("\u{2581}Paris".into());
    push("\u{2581}The".into());
    push("\u{2581}What".into());
    // Scores: longer pieces likelier, with fixed pseudo-random jitter.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let scores: Vec<Value> = tokens
        .iter()
        .map(|(t, kind)| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let jitter = (state >> 40) as f32 / (1u64 << 24) as f32;
            let score = if *kind == 1 {
                -12.0 + 1.5 * t.chars().count() as f32 + 3.0 * jitter
            } else {
                0.0
            };
            Value::F32(score)
        })
        .collect();
    let u = |v: u32| Value::U32(v);
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("llama.block_count".into(), u(1)),
        ("llama.context_length".into(), u(64)),
        ("llama.embedding_length".into(), u(32)),
        ("llama.feed_forward_length".into(), u(64)),
        ("llama.attention.head_count".into(), u(4)),
        ("llama.attention.head_count_kv".into(), u(4)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("t5".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.0.clone())).collect()),
        ),
        ("tokenizer.ggml.scores".into(), Value::Array(scores)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|t| Value::I32(t.1)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), u(1)),
        ("tokenizer.ggml.unknown_token_id".into(), u(2)),
        ("tokenizer.ggml.padding_token_id".into(), u(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        (
            "tokenizer.ggml.remove_extra_whitespaces".into(),
            Value::Bool(remove_extra_whitespaces),
        ),
    ];
    gguf::write(path, &metadata, &[])
}
