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
    for layer in 0..config.num_layers {
        for part in LayerPart::ALL {
            if !part.is_bias() || config.attention_bias {
                ids.push(TensorId::Layer { layer, part });
            }
        }
    }
    ids.into_iter()
        .map(|id| {
            let shape = config.expected_shape(id);
            let n: usize = shape.iter().product();
            let is_norm = matches!(
                id,
                TensorId::FinalNorm
                    | TensorId::Layer {
                        part: LayerPart::AttnNorm | LayerPart::MlpNorm,
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
                id.hf_name(),
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
    let mut tensors = Vec::new();
    for (id, (shape, mut data)) in random_tensors(config, seed) {
        if let TensorId::Layer { part, .. } = id {
            match part {
                LayerPart::Q => permute_rows(&mut data, &shape, config.num_heads),
                LayerPart::K => permute_rows(&mut data, &shape, config.num_kv_heads),
                _ => {}
            }
        }
        tensors.push(TensorToWrite {
            name: id.gguf_name(),
            shape,
            dtype: DType::F32,
            data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }
    let arch = |k: &str| format!("llama.{k}");
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
    let metadata = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
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
    gguf::write(path, &metadata, &tensors)
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
