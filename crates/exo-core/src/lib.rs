//! The plain domain types of exo-rs, declared once: who is in the cluster ([`NodeId`]), which
//! plan a request runs under ([`Epoch`], [`Stage`], [`LayerRange`]), what is asked
//! ([`GenerationRequest`]: a [`Prompt`] of [`ChatMessage`]s or text, [`SamplingParams`], stop
//! strings), what comes back ([`GenerationEvent`], [`Finished`], [`FinishReason`]), the steps a
//! request takes through the stages ([`StepEntry`], [`StepInput`], [`Activations`]) and why
//! a generation can fail ([`GenerationError`], with a [`StageFailure`] naming the node, the
//! stage and the epoch as data).
//!
//! The HTTP API converts these to and from JSON at its edge, the shard service to and from
//! protobuf at its edge; the model code, the node runtime and the gateway use them as they are.
//!
//! This crate must NOT know about IO, async, networking, files, tensors or any other crate of
//! ours: it is data and the rules that hold for that data, nothing else. `serde` derives are
//! behind the `serde` feature.

mod error;
mod ids;
mod request;
mod step;

pub use error::{FailureKind, GenerationError, StageFailure};
pub use ids::{Epoch, LayerRange, NodeId, RequestId, Stage};
pub use request::{
    ChatMessage, FinishReason, Finished, GenerationEvent, GenerationRequest, Logprob,
    OutputConstraint, Penalties, Prompt, PromptLogprobs, SamplingParams, TokenText, ToolCall,
    ToolSpec, ToolSyntax,
};
pub use step::{
    Activations, Fork, RequestStart, StepEntry, StepFrame, StepInput, TokenLogprob, TokenOut,
};
