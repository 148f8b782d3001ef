//! A model checkpoint on disk (a GGUF file or a Hugging Face folder), and reading the tensors of
//! one shard from it.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::{Activation, MAX_CONTEXT, ModelConfig, Variant};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};
use crate::names::{LayerPart, TensorId};
use crate::quant::{DType, dequantize, first_non_finite};
use crate::safetensors_files::SafetensorsSet;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;

/// A tensor decoded to `f32` in host memory, rows first, in Hugging Face layout.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape, rows first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// A tensor as the checkpoint stores it (quantized blocks kept), rows in Hugging Face order.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredTensor {
    /// Element type of `bytes`.
    pub dtype: DType,
    /// Shape, rows first.
    pub shape: Vec<usize>,
    /// Encoded data, row-major.
    pub bytes: Vec<u8>,
}

/// Which part of the model a node holds: layers `[start, end)`, plus the embedding (first stage)
/// and/or the final norm and head (last stage).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardSpec {
    /// The decoder layers.
    pub layers: Range<usize>,
    /// Whether the shard embeds tokens.
    pub embedding: bool,
    /// Whether the shard holds the final norm and head.
    pub head: bool,
}

impl ShardSpec {
    /// The whole model of `num_layers` layers as one shard.
    pub fn whole(num_layers: usize) -> Self {
        ShardSpec {
            layers: 0..num_layers,
            embedding: true,
            head: true,
        }
    }
}

/// The weights of one decoder layer.
#[derive(Clone, Debug)]
#[allow(missing_docs)]
pub struct LayerWeights {
    pub attn_norm: HostTensor,
    pub q: HostTensor,
    pub k: HostTensor,
    pub v: HostTensor,
    /// Present when the model has attention bias.
    pub qkv_bias: Option<[HostTensor; 3]>,
    pub o: HostTensor,
    pub mlp_norm: HostTensor,
    /// The MLP's gate, up and down: one set for a dense layer, one per expert for a mixture
    /// of experts.
    pub experts: Vec<[HostTensor; 3]>,
    /// The mixture of experts' router, `[experts, hidden]`; `None` in a dense layer.
    pub router: Option<HostTensor>,
    /// Per-head query and key norms, when the family has them (Qwen3, Gemma 3).
    pub qk_norm: Option<[HostTensor; 2]>,
    /// Norms of the attention and MLP outputs, when the family has them (Gemma).
    pub post_norms: Option<[HostTensor; 2]>,
}

/// How the last stage gets its output projection.
#[derive(Clone, Debug)]
pub enum HeadWeights {
    /// The head is the embedding table, which this shard also holds.
    SharedWithEmbedding,
    /// The head's own matrix (or a copy of the tied embedding on a shard without the embedding).
    Separate(HostTensor),
}

/// Everything one shard needs, read from the checkpoint.
#[derive(Clone, Debug)]
pub struct ShardWeights {
    /// What was loaded.
    pub spec: ShardSpec,
    /// `[vocab, hidden]`, when `spec.embedding`.
    pub embedding: Option<HostTensor>,
    /// Layers `spec.layers`, in order.
    pub layers: Vec<LayerWeights>,
    /// `[hidden]`, when `spec.head`.
    pub final_norm: Option<HostTensor>,
    /// The head, when `spec.head`.
    pub head: Option<HeadWeights>,
}

/// What has been read from a checkpoint so far: proof that a shard reads only its own tensors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    /// Names of the tensors read, in order.
    pub tensors: Vec<String>,
    /// Bytes of stored tensor data read.
    pub bytes: u64,
}

#[derive(Debug)]
enum Source {
    Gguf(GgufFile),
    Safetensors(SafetensorsSet),
}

/// An opened checkpoint: configuration parsed, tensors indexed, nothing read yet.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    config: ModelConfig,
    source: Source,
    reads: Mutex<ReadStats>,
}

impl Checkpoint {
    /// Opens a `.gguf` file or a Hugging Face folder (with `config.json` and safetensors).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let (config, source) = if meta.is_dir() {
            let config_path = path.join("config.json");
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            let mut config = ModelConfig::from_hf_json(&text, &config_path)?;
            merge_generation_config(path, &mut config)?;
            (config, Source::Safetensors(SafetensorsSet::open(path)?))
        } else {
            let file = GgufFile::open(path)?;
            (config_from_gguf(&file)?, Source::Gguf(file))
        };
        let mut checkpoint = Checkpoint {
            path: path.to_path_buf(),
            config,
            source,
            reads: Mutex::new(ReadStats::default()),
        };
        checkpoint.check_tensors_against_config()?;
        checkpoint.config.cap_context(path);
        Ok(checkpoint)
    }

    /// Checks what the configuration claims against the tensor index, before anything is
    /// sized by it: every layer it counts must be in the file, and (for GGUF, whose index is
    /// already in memory) every tensor present must have the shape the sizes imply. Reads no
    /// tensor data.
    fn check_tensors_against_config(&self) -> Result<()> {
        let layers = self.config.num_layers;
        let first_norm = |layer| TensorId::Layer {
            layer,
            part: LayerPart::AttnNorm,
        };
        // Bounded by the tensors in the file: the count stops at the first layer missing.
        let present = (0..layers)
            .take_while(|&layer| self.has_tensor(first_norm(layer)))
            .count();
        if present < layers {
            let (key, name) = match &self.source {
                Source::Gguf(_) => (
                    format!("{}.block_count", self.config.model_type),
                    first_norm(present).gguf_name(),
                ),
                Source::Safetensors(_) => (
                    "num_hidden_layers".to_string(),
                    first_norm(present).hf_name_in(&self.config.model_type),
                ),
            };
            return Err(Error::Config {
                path: self.path.clone(),
                message: format!(
                    "`{key}` is {layers} but the checkpoint holds tensors for {present} layers \
                     (`{name}` is missing)"
                ),
            });
        }
        let Source::Gguf(file) = &self.source else {
            return Ok(());
        };
        let parts = self.config.layer_parts();
        let ids = [TensorId::Embedding, TensorId::FinalNorm, TensorId::Head]
            .into_iter()
            .chain((0..layers).flat_map(|layer| {
                parts
                    .iter()
                    .map(move |&part| TensorId::Layer { layer, part })
            }));
        for id in ids {
            // A fused matrix is checked whole when a part of it is read; a stack of experts
            // once, through its first expert.
            if self.fused(id).is_some() || self.stacked_expert(id).is_some_and(|e| e > 0) {
                continue;
            }
            let name = id.gguf_name();
            let Some(info) = file.tensor(&name) else {
                continue;
            };
            self.check_shape(&name, &self.expected_stored_shape(id), &info.shape)?;
        }
        Ok(())
    }

    /// The checkpoint's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// A short name for the model: the file stem or folder name.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// The GGUF file, when the checkpoint is one.
    pub fn gguf(&self) -> Option<&GgufFile> {
        match &self.source {
            Source::Gguf(f) => Some(f),
            Source::Safetensors(_) => None,
        }
    }

    /// The tokenizer, checked against the model's vocabulary.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let tokenizer = match &self.source {
            Source::Gguf(file) => Tokenizer::from_gguf(file)?,
            Source::Safetensors(_) => {
                let mut t = Tokenizer::from_file(&self.path.join("tokenizer.json"))?;
                let tc = self.tokenizer_config()?;
                let add_bos = tc
                    .get("add_bos_token")
                    .and_then(|v| v.as_bool())
                    .unwrap_or(false);
                t.set_add_bos(self.config.bos_token_id, add_bos);
                t
            }
        };
        tokenizer.check_fits(self.config.vocab_size, &self.path)?;
        Ok(tokenizer)
    }

    /// The checkpoint's chat template, if it has one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        self.chat_template_with(&self.tokenizer()?)
    }

    /// [`Checkpoint::chat_template`] with the checkpoint's tokenizer already built (building a
    /// large vocabulary's tokenizer takes a second and over 100 MiB: once is enough).
    pub fn chat_template_with(&self, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
        let token_text =
            |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default();
        let bos = token_text(self.config.bos_token_id);
        let eos = token_text(self.config.eos_token_ids.first().copied());
        // The default template, and the one for chats with tools when the checkpoint names one.
        let (source, tool_use) = match &self.source {
            Source::Gguf(file) => {
                let named = |key: &str| file.get(key).and_then(Value::as_str).map(str::to_string);
                (
                    named("tokenizer.chat_template"),
                    named("tokenizer.chat_template.tool_use"),
                )
            }
            Source::Safetensors(_) => {
                let tc = self.tokenizer_config()?;
                match tc.get("chat_template") {
                    Some(serde_json::Value::String(s)) => (Some(s.clone()), None),
                    // A list of named templates: "default", and "tool_use" for chats with tools.
                    Some(serde_json::Value::Array(items)) => {
                        let named = |name: &str| {
                            items
                                .iter()
                                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                                .and_then(|t| t.get("template"))
                                .and_then(|t| t.as_str())
                                .map(str::to_string)
                        };
                        (named("default"), named("tool_use"))
                    }
                    _ => (None, None),
                }
            }
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let template = ChatTemplate::new(&source, &bos, &eos)?;
        match tool_use {
            Some(tool_use) => template.with_tool_use(&tool_use).map(Some),
            None => Ok(Some(template)),
        }
    }

    fn tokenizer_config(&self) -> Result<serde_json::Value> {
        let path = self.path.join("tokenizer_config.json");
        if !path.exists() {
            return Ok(serde_json::Value::Null);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
            path,
            message: e.to_string(),
        })
    }

    /// Whether the checkpoint stores a tensor.
    pub fn has_tensor(&self, id: TensorId) -> bool {
        let name = self.file_name(id);
        match &self.source {
            Source::Gguf(f) => f.tensor(&name).is_some(),
            Source::Safetensors(s) => s.contains(&name),
        }
    }

    /// The name of the tensor that holds `id` in this checkpoint's format and family (for a
    /// family that fuses its projections, the fused tensor's).
    fn file_name(&self, id: TensorId) -> String {
        match (&self.source, self.fused(id)) {
            (Source::Gguf(_), Some(f)) => f.gguf_name,
            (Source::Gguf(_), None) => id.gguf_name(),
            (Source::Safetensors(_), Some(f)) => f.hf_name,
            (Source::Safetensors(_), None) => id.hf_name_in(&self.config.model_type),
        }
    }

    /// A tensor `name` of shape `actual` where the configuration implies `expected` is an error
    /// naming both.
    fn check_shape(&self, name: &str, expected: &[usize], actual: &[usize]) -> Result<()> {
        if actual == expected {
            return Ok(());
        }
        Err(Error::ShapeMismatch {
            path: self.path.clone(),
            name: name.to_string(),
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        })
    }

    /// The one place every tensor's bytes pass on their way to a model (whole, or a piece
    /// starting `before` elements into tensor `name`): NaN or infinite values and scales are
    /// refused (a NaN scale or norm would otherwise load silently and turn every answer into
    /// garbage), and the read is counted; a tensor is named in the read list by its first piece.
    fn accept_read(&self, name: String, dtype: DType, bytes: &[u8], before: usize) -> Result<()> {
        if let Some(bad) = first_non_finite(dtype, bytes) {
            // Counted from the tensor's start, not the piece's.
            let skipped = if bad.field.starts_with("value") {
                before
            } else {
                before / dtype.block_elems().max(1)
            };
            return Err(Error::NonFinite {
                path: self.path.clone(),
                name,
                field: bad.field,
                index: skipped + bad.index,
            });
        }
        let mut reads = self.reads.lock().unwrap_or_else(|p| p.into_inner());
        if before == 0 {
            reads.tensors.push(name);
        }
        reads.bytes += bytes.len() as u64;
        Ok(())
    }

    /// The heads whose rows llama.cpp's converter interleaved for its RoPE layout in this
    /// checkpoint's tensor `id` (a Llama GGUF's q/k weights and biases), which the reader puts
    /// back in Hugging Face's order; `None` for tensors stored in that order.
    fn permuted_heads(&self, id: TensorId) -> Option<usize> {
        if !matches!(self.source, Source::Gguf(_)) || self.config.model_type != "llama" {
            return None;
        }
        match id {
            TensorId::Layer {
                part: LayerPart::Q | LayerPart::QBias,
                ..
            } => Some(self.config.num_heads),
            TensorId::Layer {
                part: LayerPart::K | LayerPart::KBias,
                ..
            } => Some(self.config.num_kv_heads),
            _ => None,
        }
    }

    /// The expert of `id` when the checkpoint stores it in a stack of every expert of its
    /// layer (GGUF's `ffn_*_exps`); Hugging Face folders store each expert on its own.
    fn stacked_expert(&self, id: TensorId) -> Option<usize> {
        match (&self.source, id) {
            (Source::Gguf(_), TensorId::Layer { part, .. }) => part.expert(),
            _ => None,
        }
    }

    /// The shape of the tensor holding `id` in the file: a stack of experts is
    /// `[experts, rows, cols]`.
    fn expected_stored_shape(&self, id: TensorId) -> Vec<usize> {
        let mut shape = self.config.expected_shape(id);
        if self.stacked_expert(id).is_some() {
            shape.insert(0, self.config.variant.moe.map_or(0, |m| m.experts));
        }
        shape
    }

    /// Where `id` lives in a family that fuses its projections (Phi-3).
    fn fused(&self, id: TensorId) -> Option<crate::names::FusedSource> {
        let c = &self.config;
        if !c.variant.fused_projections {
            return None;
        }
        id.fused_source(
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.intermediate_size,
        )
    }

    /// Reads one tensor as stored (quantized blocks stay quantized), in Hugging Face row order,
    /// and checks its shape. Its bytes are copied out of the file.
    pub fn stored_tensor(&self, id: TensorId) -> Result<StoredTensor> {
        let mut expected = self.expected_stored_shape(id);
        let stacked = self.stacked_expert(id);
        let fused = self.fused(id);
        if let Some(f) = &fused {
            // The whole fused matrix is read and checked; this part's rows are cut below.
            expected[0] = f.total_rows;
        }
        let name = self.file_name(id);
        let (name, shape, dtype, mut bytes) = match &self.source {
            Source::Gguf(file) => {
                let info = file.tensor(&name).ok_or_else(|| Error::MissingTensor {
                    path: self.path.clone(),
                    name: name.clone(),
                })?;
                self.check_shape(&name, &expected, &info.shape)?;
                match stacked {
                    // Only this expert's bytes: each is a whole number of rows (of blocks).
                    Some(e) => {
                        let experts = expected[0].max(1);
                        let each = info.len / experts;
                        expected.remove(0);
                        let bytes = file.read_tensor_part(info, e * each, each)?;
                        (name, expected.clone(), info.dtype, bytes)
                    }
                    None => (
                        name,
                        info.shape.clone(),
                        info.dtype,
                        file.read_tensor(info)?,
                    ),
                }
            }
            Source::Safetensors(set) => {
                let raw = set.get(&name)?.ok_or_else(|| Error::MissingTensor {
                    path: self.path.clone(),
                    name: name.clone(),
                })?;
                let elems: usize = raw.shape.iter().product();
                if raw.dtype.bytes_for(elems) != Some(raw.range_len()) {
                    return Err(Error::Safetensors {
                        path: raw.file.clone(),
                        message: format!(
                            "tensor `{name}` has a byte length that does not match its shape"
                        ),
                    });
                }
                (name, raw.shape.clone(), raw.dtype, raw.read()?)
            }
        };
        self.check_shape(&name, &expected, &shape)?;
        let mut shape = shape;
        if let Some(f) = &fused {
            // Rows are whole blocks in every format, so this cuts quantized data too.
            let row = bytes.len() / f.total_rows.max(1);
            bytes = bytes[f.rows.start * row..f.rows.end * row].to_vec();
            shape[0] = f.rows.len();
        }
        self.accept_read(name, dtype, &bytes, 0)?;
        let mut tensor = StoredTensor {
            dtype,
            shape,
            bytes,
        };
        if let Some(heads) = self.permuted_heads(id) {
            // Rows are whole blocks, so this works on quantized data too.
            unpermute_rows(&mut tensor, heads);
        }
        if matches!(self.source, Source::Safetensors(_))
            && self.config.variant.sandwich_norms
            && is_norm(id)
        {
            // Gemma's norms scale by `1 + weight`; GGUF files store the sum (llama.cpp's
            // converter adds the one), and so does every model here.
            let mut values = Vec::with_capacity(tensor.shape.iter().product());
            dequantize(tensor.dtype, &tensor.bytes, &mut values);
            tensor.bytes = values
                .iter()
                .flat_map(|v| (v + 1.0).to_le_bytes())
                .collect();
            tensor.dtype = DType::F32;
        }
        Ok(tensor)
    }

    /// Rows `rows` of a matrix as stored, when the checkpoint can read them alone: a GGUF tensor
    /// stored whole and in Hugging Face's row order (not a part of a fused matrix or of a stack
    /// of experts, not a Llama q/k matrix whose rows llama.cpp interleaved). `None` otherwise:
    /// read it whole with [`Checkpoint::stored_tensor`]. Checked as that checks a tensor.
    pub fn stored_rows(&self, id: TensorId, rows: Range<usize>) -> Result<Option<StoredTensor>> {
        let Source::Gguf(file) = &self.source else {
            return Ok(None);
        };
        let permuted = self.permuted_heads(id).is_some();
        if permuted || self.fused(id).is_some() || self.stacked_expert(id).is_some() {
            return Ok(None);
        }
        let name = self.file_name(id);
        let info = file.tensor(&name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.clone(),
        })?;
        let expected = self.expected_stored_shape(id);
        self.check_shape(&name, &expected, &info.shape)?;
        let total = expected.first().copied().unwrap_or(0);
        if rows.start > rows.end || rows.end > total || expected.len() != 2 {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name,
                expected: vec![total],
                actual: vec![rows.start, rows.end],
            });
        }
        let row_bytes = info.len / total.max(1);
        let bytes = file.read_tensor_part(info, rows.start * row_bytes, rows.len() * row_bytes)?;
        self.accept_read(name, info.dtype, &bytes, rows.start * expected[1])?;
        Ok(Some(StoredTensor {
            dtype: info.dtype,
            shape: vec![rows.len(), expected[1]],
            bytes,
        }))
    }

    /// Reads one tensor, decoded to `f32` and in Hugging Face layout, and checks its shape.
    pub fn tensor(&self, id: TensorId) -> Result<HostTensor> {
        let stored = self.stored_tensor(id)?;
        let mut data = Vec::with_capacity(stored.shape.iter().product());
        dequantize(stored.dtype, &stored.bytes, &mut data);
        Ok(HostTensor {
            shape: stored.shape,
            data,
        })
    }

    /// Reads the tensors of one shard, and nothing else.
    pub fn load_shard(&self, spec: &ShardSpec) -> Result<ShardWeights> {
        let n = self.config.num_layers;
        if spec.layers.start > spec.layers.end || spec.layers.end > n {
            return Err(Error::LayerRange {
                start: spec.layers.start,
                end: spec.layers.end,
                layers: n,
            });
        }
        let embedding = spec
            .embedding
            .then(|| self.tensor(TensorId::Embedding))
            .transpose()?;
        let layers = spec
            .layers
            .clone()
            .map(|layer| self.layer(layer))
            .collect::<Result<Vec<_>>>()?;
        let (final_norm, head) = if spec.head {
            let norm = self.tensor(TensorId::FinalNorm)?;
            let head = if self.has_tensor(TensorId::Head) {
                HeadWeights::Separate(self.tensor(TensorId::Head)?)
            } else if spec.embedding {
                HeadWeights::SharedWithEmbedding
            } else {
                HeadWeights::Separate(self.tensor(TensorId::Embedding)?)
            };
            (Some(norm), Some(head))
        } else {
            (None, None)
        };
        Ok(ShardWeights {
            spec: spec.clone(),
            embedding,
            layers,
            final_norm,
            head,
        })
    }

    fn layer(&self, layer: usize) -> Result<LayerWeights> {
        let t = |part| self.tensor(TensorId::Layer { layer, part });
        let qkv_bias = if self.config.attention_bias {
            Some([
                t(LayerPart::QBias)?,
                t(LayerPart::KBias)?,
                t(LayerPart::VBias)?,
            ])
        } else {
            None
        };
        Ok(LayerWeights {
            attn_norm: t(LayerPart::AttnNorm)?,
            q: t(LayerPart::Q)?,
            k: t(LayerPart::K)?,
            v: t(LayerPart::V)?,
            qkv_bias,
            o: t(LayerPart::O)?,
            mlp_norm: t(LayerPart::MlpNorm)?,
            experts: match self.config.variant.moe {
                Some(m) => (0..m.experts as u32)
                    .map(|e| {
                        Ok([
                            t(LayerPart::ExpertGate(e))?,
                            t(LayerPart::ExpertUp(e))?,
                            t(LayerPart::ExpertDown(e))?,
                        ])
                    })
                    .collect::<Result<_>>()?,
                None => vec![[t(LayerPart::Gate)?, t(LayerPart::Up)?, t(LayerPart::Down)?]],
            },
            router: self
                .config
                .variant
                .moe
                .map(|_| t(LayerPart::Router))
                .transpose()?,
            qk_norm: if self.config.variant.qk_norm {
                Some([t(LayerPart::QNorm)?, t(LayerPart::KNorm)?])
            } else {
                None
            },
            post_norms: if self.config.variant.sandwich_norms {
                Some([t(LayerPart::PostAttnNorm)?, t(LayerPart::PostMlpNorm)?])
            } else {
                None
            },
        })
    }

    /// What has been read so far.
    pub fn read_stats(&self) -> ReadStats {
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Bytes of stored weights of the tensors a shard would read (for memory planning).
    pub fn stored_bytes(&self, id: TensorId) -> Option<u64> {
        let name = self.file_name(id);
        let whole = match &self.source {
            Source::Gguf(f) => f.tensor(&name).map(|i| i.len as u64),
            Source::Safetensors(s) => s.get(&name).ok().flatten().map(|r| r.bytes().len() as u64),
        }?;
        // A part of a fused matrix is its share of the rows; an expert its share of the stack.
        Some(match (self.fused(id), self.stacked_expert(id)) {
            (Some(f), _) => whole * f.rows.len() as u64 / f.total_rows.max(1) as u64,
            (None, Some(_)) => {
                whole / self.config.variant.moe.map_or(1, |m| m.experts.max(1)) as u64
            }
            (None, None) => whole,
        })
    }

    /// The element type a tensor is stored in.
    pub fn stored_dtype(&self, id: TensorId) -> Option<DType> {
        let name = self.file_name(id);
        match &self.source {
            Source::Gguf(f) => f.tensor(&name).map(|i| i.dtype),
            Source::Safetensors(s) => s.get(&name).ok().flatten().map(|r| r.dtype),
        }
    }
}

/// Undoes llama.cpp's q/k row interleaving: within each head, GGUF row `2i + j` is Hugging Face
/// row `j * head_dim/2 + i`.
fn unpermute_rows(tensor: &mut StoredTensor, heads: usize) {
    let rows = tensor.shape[0];
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return;
    }
    let row_bytes = tensor.bytes.len() / rows;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0u8; tensor.bytes.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&tensor.bytes[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    tensor.bytes = out;
}

/// Whether `id` is an RMSNorm weight.
pub(crate) fn is_norm(id: TensorId) -> bool {
    match id {
        TensorId::FinalNorm => true,
        TensorId::Layer { part, .. } => matches!(
            part,
            LayerPart::AttnNorm
                | LayerPart::MlpNorm
                | LayerPart::QNorm
                | LayerPart::KNorm
                | LayerPart::PostAttnNorm
                | LayerPart::PostMlpNorm
        ),
        _ => false,
    }
}

/// The GGUF architectures this reader understands.
const GGUF_ARCHITECTURES: &str = "llama (and Mixtral), qwen2, qwen3, qwen3moe, phi3, gemma3";

/// Fills the configuration from a GGUF file's `{arch}.*` metadata.
fn config_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let path = file.path();
    let missing = |key: &str| Error::Config {
        path: path.to_path_buf(),
        message: format!("missing metadata `{key}`"),
    };
    let arch = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| missing("general.architecture"))?
        .to_string();
    if !matches!(
        arch.as_str(),
        "llama" | "qwen2" | "qwen3" | "qwen3moe" | "phi3" | "gemma3"
    ) {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "architecture `{arch}` is not supported (supported: {GGUF_ARCHITECTURES})"
            ),
        });
    }
    let uint = |key: &str| {
        let full = format!("{arch}.{key}");
        file.get(&full)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| missing(&full))
    };
    let float = |key: &str| file.get(&format!("{arch}.{key}")).and_then(Value::as_f64);
    let hidden_size = uint("embedding_length")?;
    let num_heads = uint("attention.head_count")?;
    let num_kv_heads = uint("attention.head_count_kv").unwrap_or(num_heads);
    let vocab_size = match uint("vocab_size") {
        Ok(v) => v,
        Err(_) => file
            .tensor(&TensorId::Embedding.gguf_name())
            .map(|t| t.shape[0])
            .ok_or_else(|| missing(&format!("{arch}.vocab_size")))?,
    };
    let head_dim = match uint("attention.key_length") {
        Ok(d) => d,
        Err(_) if num_heads > 0 => hidden_size / num_heads,
        Err(e) => return Err(e),
    };
    let context_length = uint("context_length").unwrap_or(2048);
    if context_length > MAX_CONTEXT {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: format!(
                "`{arch}.context_length` is {context_length}, beyond {MAX_CONTEXT} positions, \
                 longer than any model is trained for"
            ),
        });
    }
    if arch == "phi3" && file.tensor("rope_factors_long.weight").is_some() {
        return Err(Error::Config {
            path: path.to_path_buf(),
            message: "Phi-3's LongRoPE scaling (`rope_factors_long.weight`, the 128k-context \
                      models) is not supported yet; the 4k-context models are"
                .into(),
        });
    }
    // Llama 3.x stores its rope scaling as one divisor per rotary frequency.
    let rope_freq_factors = match file.tensor("rope_freqs.weight") {
        Some(info) => {
            let bytes = file.read_tensor(info)?;
            let mut values = Vec::with_capacity(info.elems());
            dequantize(info.dtype, &bytes, &mut values);
            Some(values.into_iter().map(f64::from).collect())
        }
        None => None,
    };
    let mut eos_token_ids = Vec::new();
    for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
        if let Some(id) = file.get(key).and_then(Value::as_u64)
            && !eos_token_ids.contains(&(id as u32))
        {
            eos_token_ids.push(id as u32);
        }
    }
    let config = ModelConfig {
        model_type: arch.clone(),
        vocab_size,
        hidden_size,
        intermediate_size: match uint("feed_forward_length") {
            Ok(width) => width,
            // Qwen3-MoE files may give only the experts' width.
            Err(e) => uint("expert_feed_forward_length").map_err(|_| e)?,
        },
        num_layers: uint("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: context_length,
        tie_word_embeddings: file.tensor(&TensorId::Head.gguf_name()).is_none(),
        attention_bias: file
            .tensor(
                &TensorId::Layer {
                    layer: 0,
                    part: LayerPart::QBias,
                }
                .gguf_name(),
            )
            .is_some(),
        bos_token_id: file
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        eos_token_ids,
        variant: Variant {
            rope_freq_factors,
            moe: gguf_moe(file, &arch)?,
            ..gguf_variant(file, &arch, hidden_size, head_dim, num_heads)
        },
    };
    config.validate(path)?;
    Ok(config)
}

/// The mixture of experts a GGUF file describes (`{arch}.expert_count` above zero): Qwen3-MoE,
/// or Mixtral under the `llama` architecture. Both route by a softmax over every expert,
/// then rescale the chosen experts' weights to sum to one (as llama.cpp does for them).
fn gguf_moe(file: &GgufFile, arch: &str) -> Result<Option<crate::config::Moe>> {
    let uint = |key: &str| {
        file.get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let experts = uint("expert_count").unwrap_or(0);
    if experts == 0 {
        if arch == "qwen3moe" {
            return Err(Error::Config {
                path: file.path().to_path_buf(),
                message: "missing metadata `qwen3moe.expert_count`".into(),
            });
        }
        return Ok(None);
    }
    let per_token = uint("expert_used_count").ok_or_else(|| Error::Config {
        path: file.path().to_path_buf(),
        message: format!("missing metadata `{arch}.expert_used_count`"),
    })?;
    // llama.cpp: Mixtral's experts are `feed_forward_length` wide; Qwen3-MoE's are
    // `expert_feed_forward_length` wide, or the dense width shared among the chosen experts.
    let width = match arch {
        "llama" => uint("feed_forward_length"),
        _ => uint("expert_feed_forward_length")
            .or_else(|| uint("feed_forward_length").map(|w| w / per_token.max(1))),
    }
    .ok_or_else(|| Error::Config {
        path: file.path().to_path_buf(),
        message: format!("missing metadata `{arch}.expert_feed_forward_length`"),
    })?;
    if file.tensor("blk.0.ffn_gate.0.weight").is_some() {
        return Err(Error::Config {
            path: file.path().to_path_buf(),
            message: "this file stores each expert as its own tensor (`blk.0.ffn_gate.0.weight`), \
                      the layout of GGUF files converted before mid-2024; convert the model again \
                      with a current llama.cpp (its experts are stacked as `ffn_gate_exps`)"
                .into(),
        });
    }
    Ok(Some(crate::config::Moe {
        experts,
        experts_per_token: per_token,
        intermediate_size: width,
        normalize: true,
    }))
}

/// What a GGUF architecture changes in the Llama layer, with the constants llama.cpp fixes
/// for it where the metadata is silent.
fn gguf_variant(
    file: &GgufFile,
    arch: &str,
    hidden: usize,
    head_dim: usize,
    heads: usize,
) -> Variant {
    let float = |key: &str| file.get(&format!("{arch}.{key}")).and_then(Value::as_f64);
    let uint = |key: &str| {
        file.get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    };
    let linear = match file
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(Value::as_str)
    {
        Some("linear") => float("rope.scaling.factor").filter(|f| *f != 1.0),
        _ => None,
    };
    match arch {
        "qwen3" | "qwen3moe" => Variant {
            qk_norm: true,
            rope_linear_factor: linear,
            ..Variant::default()
        },
        // llama.cpp ignores the sliding window of Phi-3 GGUF files (its converter does not
        // write the window reliably), and so do we, so that a file answers as it does there.
        "phi3" => Variant {
            rope_linear_factor: linear,
            fused_projections: true,
            ..Variant::default()
        },
        "gemma3" => {
            let layers = uint("block_count").unwrap_or(0);
            // llama.cpp: queries are scaled by 1/sqrt(head_dim), except in the 27B model
            // (62 layers), whose `query_pre_attn_scalar` is hidden / heads.
            let scalar = if layers == 62 && heads > 0 {
                (hidden / heads) as f64
            } else {
                head_dim as f64
            };
            Variant {
                qk_norm: true,
                sandwich_norms: true,
                activation: Activation::GeluTanh,
                embedding_scale: Some((hidden as f64).sqrt()),
                attention_scale: Some(1.0 / scalar.sqrt()),
                sliding_window: uint("attention.sliding_window"),
                global_every: Some(6),
                rope_local_theta: Some(10_000.0),
                rope_linear_factor: linear,
                final_logit_softcap: float("final_logit_softcapping"),
                ..Variant::default()
            }
        }
        _ => Variant {
            rope_linear_factor: linear,
            ..Variant::default()
        },
    }
}

/// Takes EOS ids from `generation_config.json` when the folder has one (it is what
/// `transformers` stops on).
fn merge_generation_config(folder: &Path, config: &mut ModelConfig) -> Result<()> {
    let path = folder.join("generation_config.json");
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if let Some(eos) = value.get("eos_token_id") {
        let ids: crate::config::OneOrMany =
            serde_json::from_value(eos.clone()).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!("eos_token_id: {e}"),
            })?;
        config.eos_token_ids = ids.into_vec();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2)
        let (heads, head_dim, cols) = (2, 4, 3);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    let gguf_row = h * head_dim + 2 * i + j;
                    let hf_row = h * head_dim + j * (head_dim / 2) + i;
                    permuted[gguf_row * cols..(gguf_row + 1) * cols]
                        .copy_from_slice(&hf[hf_row * cols..(hf_row + 1) * cols]);
                }
            }
        }
        let mut t = StoredTensor {
            dtype: DType::F32,
            shape: vec![rows, cols],
            bytes: permuted.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        unpermute_rows(&mut t, heads);
        let back: Vec<f32> = t
            .bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(back, hf);
    }
}
