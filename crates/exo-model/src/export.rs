//! Export of a checkpoint (typically a GGUF file) as a Hugging Face folder: `config.json`,
//! `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and `generation_config.json`.

use std::path::{Path, PathBuf};

use half::{bf16, f16};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gguf::Value;
use crate::names::TensorId;
use crate::safetensors_files::{F32Tensor, write_safetensors};

/// Element type of the exported weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExportDtype {
    /// Exact: the values the model computes with.
    #[default]
    F32,
    /// Half the size; rounds quantized values slightly.
    F16,
    /// Half the size, wider range, coarser rounding.
    BF16,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// The folder written.
    pub dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub weight_bytes: u64,
}

/// Writes `checkpoint` as a Hugging Face folder at `dir`, which must not exist yet.
///
/// The folder is assembled under a temporary name beside `dir` and renamed at the end, so a
/// failed export leaves nothing half-written behind.
pub fn export_hf(checkpoint: &Checkpoint, dir: &Path, dtype: ExportDtype) -> Result<ExportSummary> {
    if dir.exists() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output folder already exists",
            ),
        ));
    }
    let staging = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    let result = write_folder(checkpoint, &staging, dtype);
    match result {
        Ok(summary) => {
            std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
            Ok(ExportSummary {
                dir: dir.to_path_buf(),
                ..summary
            })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

fn write_folder(checkpoint: &Checkpoint, dir: &Path, dtype: ExportDtype) -> Result<ExportSummary> {
    let config = checkpoint.config();
    if config.variant.rope_freq_factors.is_some() {
        tracing::warn!(
            "{}: the per-frequency rope factors (`rope_freqs.weight`) have no config.json \
             equivalent and are not exported; the folder's rotary embedding is unscaled",
            checkpoint.path().display()
        );
    }
    let mut ids = vec![TensorId::Embedding];
    let parts = config.layer_parts();
    for layer in 0..config.num_layers {
        ids.extend(parts.iter().map(|&part| TensorId::Layer { layer, part }));
    }
    ids.push(TensorId::FinalNorm);
    if checkpoint.has_tensor(TensorId::Head) {
        ids.push(TensorId::Head);
    }
    let mut tensors: Vec<(String, F32Tensor)> = Vec::with_capacity(ids.len());
    for id in ids {
        let mut t = checkpoint.tensor(id)?;
        if config.variant.sandwich_norms && crate::checkpoint::is_norm(id) {
            // Gemma's folders store `weight` for a norm that scales by `1 + weight`; every
            // model here holds the sum.
            t.data.iter_mut().for_each(|v| *v -= 1.0);
        }
        let (bytes, st_dtype): (Vec<u8>, _) = match dtype {
            ExportDtype::F32 => (
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                safetensors::Dtype::F32,
            ),
            ExportDtype::F16 => (
                t.data
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
                safetensors::Dtype::F16,
            ),
            ExportDtype::BF16 => (
                t.data
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                safetensors::Dtype::BF16,
            ),
        };
        let fused = id
            .fused_source(
                config.num_heads * config.head_dim,
                config.num_kv_heads * config.head_dim,
                config.intermediate_size,
            )
            .filter(|_| config.variant.fused_projections);
        match fused {
            // Phi-3's folders fuse q/k/v and gate/up: later parts join the first one's rows.
            Some(f) if f.rows.start > 0 => {
                if let Some((_, whole)) = tensors.iter_mut().find(|(n, _)| *n == f.hf_name) {
                    whole.bytes.extend_from_slice(&bytes);
                    whole.shape[0] += t.shape[0];
                }
            }
            _ => tensors.push((
                fused.map_or_else(|| id.hf_name_in(config.hf_model_type()), |f| f.hf_name),
                F32Tensor {
                    shape: t.shape,
                    bytes,
                    dtype: st_dtype,
                },
            )),
        }
    }
    let weights = dir.join("model.safetensors");
    write_safetensors(&weights, &tensors)?;
    let weight_bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);

    let write_json = |name: &str, value: &serde_json::Value| {
        let path = dir.join(name);
        let text = serde_json::to_string_pretty(value).unwrap_or_default();
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    };
    write_json("config.json", &config.to_hf_json())?;

    let tokenizer = checkpoint.tokenizer()?;
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_json()?).map_err(|e| Error::io(&path, e))?;
    let token_text = |id: Option<u32>| id.and_then(|id| tokenizer.token(id));
    let add_bos = checkpoint
        .gguf()
        .and_then(|g| g.get("tokenizer.ggml.add_bos_token"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chat_template = checkpoint
        .gguf()
        .and_then(|g| g.get("tokenizer.chat_template"))
        .and_then(Value::as_str);
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "model_max_length": config.max_position_embeddings,
    });
    if let Some(map) = tc.as_object_mut() {
        if let Some(bos) = token_text(config.bos_token_id) {
            map.insert("bos_token".into(), bos.into());
        }
        if let Some(eos) = token_text(config.eos_token_ids.first().copied()) {
            map.insert("eos_token".into(), eos.into());
        }
        if let Some(t) = chat_template {
            map.insert("chat_template".into(), t.into());
        }
    }
    write_json("tokenizer_config.json", &tc)?;
    let mut generation = serde_json::json!({ "eos_token_id": config.eos_token_ids });
    if let (Some(map), Some(bos)) = (generation.as_object_mut(), config.bos_token_id) {
        map.insert("bos_token_id".into(), bos.into());
    }
    write_json("generation_config.json", &generation)?;
    Ok(ExportSummary {
        dir: dir.to_path_buf(),
        tensors: tensors.len(),
        weight_bytes,
    })
}
