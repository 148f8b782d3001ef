//! The shard service between nodes, over gRPC (tonic + prost): a node asks another to hold a
//! shard ([`Assignment`]), streams a request's activations through the stages
//! ([`ShardClient::open`] → [`ForwardSession`], served by a [`ShardHandler`]'s
//! [`StageSession`]s), asks for end-to-end generation, and reads a node's status.
//!
//! Activations travel as f16 by default ([`WireDtype`]). Every incoming frame is checked
//! before a handler sees it: shape × dtype = byte length, within [`Limits`], finite values,
//! the request and epoch of its stream; a bad frame ends its stream with `InvalidArgument`
//! and the server keeps serving. Every call carries a [`Credential`] derived from the cluster
//! key; calls without it are refused with `Unauthenticated`.
//!
//! This crate knows protobuf, gRPC and tensor bytes. It must NOT know libp2p, burn, models or
//! plans: the node runtime implements [`ShardHandler`] and decides what a step computes.
//! Protobuf types never leave it.

mod auth;
mod client;
mod convert;
mod error;
mod server;
mod types;

#[doc(hidden)]
pub mod testing;

#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]
mod pb {
    tonic::include_proto!("exo.shard.v1");
}

pub use auth::Credential;
pub use client::{ForwardSession, GenerateStream, SentCounters, ShardClient};
pub use error::{Code, Error, Result};
pub use server::{ShardHandler, StageSession, serve};
pub use types::{
    Activations, AssignReport, Assignment, FinishReason, Finished, GenerateCall, GenerateEvent,
    Limits, NodeStatus, Prompt, PromptMessage, RequestOpen, SamplingSpec, StageRef, Step,
    StepInput, TokenReply, WireDtype,
};
