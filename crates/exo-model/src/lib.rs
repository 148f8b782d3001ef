//! Model files for exo-rs: GGUF files and Hugging Face folders (config, safetensors, tokenizer,
//! chat template), read lazily so that a node reads only the tensors of its own shard.
//!
//! This crate turns bytes on disk into configuration, `f32` tensors in Hugging Face layout, token
//! ids and prompt text. It does no tensor math and knows nothing of burn, networking or the
//! cluster: the shard engine (`exo-shard`) builds the model from what this crate returns.
//!
//! Entry points: [`Checkpoint::open`] for any checkpoint, [`ensure_default_model`] for the
//! default model, [`export_hf`] to turn a GGUF file into a Hugging Face folder.

mod checkpoint;
mod config;
mod detokenize;
mod error;
mod export;
mod fetch;
pub mod gguf;
mod names;
mod quant;
mod safetensors_files;
mod template;
pub mod testing;
mod tokenizer;

pub use checkpoint::{
    Checkpoint, HeadWeights, HostTensor, LayerWeights, ReadStats, ShardSpec, ShardWeights,
    StoredTensor,
};
pub use config::{Activation, ModelConfig, Moe, RopeScaling, Variant};
pub use detokenize::{Decoded, Detokenizer};
pub use error::{Error, Result};
pub use export::{ExportDtype, ExportSummary, export_hf};
pub use fetch::{
    DEFAULT_MODEL, DefaultModel, GEMMA3_270M, PACKAGED_MODELS, PackagedModel, default_model_path,
    ensure_default_model, ensure_packaged_model, exo_home, packaged_model, sha256_file,
};
pub use names::{LayerPart, TensorId};
pub use quant::{
    DType, dequantize, quantize_q4_0, quantize_q4_1, quantize_q4_k, quantize_q5_k, quantize_q6_k,
    quantize_q8_0,
};
pub use template::{ChatMessage, ChatTemplate, ToolSpec, ToolSyntax, encode_chat, render_prompt};
pub use tokenizer::{TextStream, Tokenizer};
