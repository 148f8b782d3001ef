//! Model execution for exo-rs: a Llama-family transformer built as a **shard** (a contiguous
//! range of decoder layers, plus the embedding on the first stage and the final norm and head on
//! the last), its per-request KV cache, sampling, and single-process generation.
//!
//! The model code is written against burn's backend-agnostic `Tensor`: the `Device` it is given
//! picks the backend (burn-flex on CPU by default, burn-ndarray and wgpu behind features). This
//! crate knows burn and model math; it knows nothing of networking, cluster membership or
//! placement: the node runtime moves activations between shards.
//!
//! Entry points: [`LlamaShard::load`], then [`LlamaShard::embed`] (first stage),
//! [`LlamaShard::forward`] (any stage) and [`LlamaShard::logits`] (last stage), or
//! [`LlamaShard::final_norm_rows`] and [`MeanPool`] for embeddings; or [`generate`] to run every
//! stage in one process.

mod backend;
mod burn_shard;
mod cache;
mod engine;
mod error;
mod generate;
mod layers;
mod moe;
mod native;
mod pooling;
mod sampling;
mod shard;

pub use backend::BackendKind;
pub use burn::tensor::{Device, Tensor, TensorData};
pub use cache::KvCache;
pub use engine::{Engine, TextOptions};
pub use error::{Error, Result};
pub use exo_core::FinishReason;
pub use exo_kernels::{WeightFormat, set_threads as set_kernel_threads};
pub use generate::{GenerateRequest, Generation, GenerationStats, forward_tokens, generate};
pub use native::Weights;
pub use pooling::MeanPool;
pub use sampling::{Penalties, Sampler, SamplingParams, argmax, log_probabilities};
pub use shard::LlamaShard;
