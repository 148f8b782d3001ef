//! The shard service between nodes, over gRPC (tonic + prost). A request travels a ring: its
//! origin opens a link to the first stage ([`ShardClient::link`] → [`LinkSender`], served by a
//! [`ShardHandler`]'s [`FrameSink`]), each stage links to the next, and every stage delivers
//! tokens and failures straight back to the origin on a stream the origin subscribed to
//! ([`ShardClient::deliveries`]). A node also asks another to hold a shard ([`Assignment`]),
//! to generate end to end ([`ShardClient::generate`]), for its status, and for a model's
//! manifest and chunks from its model store ([`ShardClient::manifest`], [`ShardClient::chunks`]:
//! opaque bytes here, checked against their hashes by the caller).
//!
//! Activations travel as f16 by default ([`WireDtype`]). Every incoming message is checked
//! before a handler sees it: shape × dtype = byte length, within [`Limits`], finite values,
//! entries that account for the rows, valid sampling; a bad message ends its stream with
//! `InvalidArgument` and the server keeps serving. Every connection is TLS 1.3 in which both
//! ends present a certificate signed by the cluster's authority, a key every node derives
//! from its [`Credential`] (itself derived from the cluster key); a connection without one is
//! closed in its handshake, and a client finds out that a node is not of its cluster
//! (`Unauthenticated`). No secret crosses the wire.
//! Generation failures cross the wire as data (`exo-core`'s typed `GenerationError`), not as
//! status codes.
//!
//! This crate knows protobuf, gRPC and tensor bytes. It must NOT know libp2p, burn, models or
//! plans: the node runtime implements [`ShardHandler`] and decides what a frame computes.
//! Protobuf types never leave it; everything a request carries is `exo-core`'s.

mod auth;
mod client;
mod convert;
mod error;
mod incoming;
mod server;
mod tls;
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
pub use client::{
    ChunkStream, DeliveryStream, GenerateStream, LinkEnded, LinkSender, SentCounters, ShardClient,
};
pub use error::{Code, Error, Result};
pub use server::{
    ChunkItems, FrameSink, GenerationItems, MAX_CHUNKS_PER_CALL, ShardHandler, serve,
};
pub use types::{AssignReport, Assignment, FetchStatus, Limits, LinkOpen, NodeStatus, WireDtype};
