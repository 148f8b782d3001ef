//! Test helpers for the crates above the leaves (a dev-dependency only):
//!
//! - [`cluster`]: a [`TestCluster`] of N real nodes in one test process on a tiny random
//!   model: membership over libp2p's memory transport, the shard service on loopback, plans
//!   chosen by memory shares, and a single-process reference to compare answers with;
//! - [`fake`]: a scripted [`fake::FakeEngine`] that records what the HTTP API asked of it;
//! - [`http`]: a small HTTP/1.1 client with server-sent-event parsing, for API tests over a
//!   real socket;
//! - [`fuzz`]: a bounded, deterministic mutation fuzzer that runs inside `cargo test`;
//! - a raw-frame peer: [`send_raw_frame`] and [`open_link`], which play a misbehaving node.
//!
//! Helpers panic with a message naming what did not happen: they are for tests only.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod cluster;
pub mod fake;
pub mod fuzz;
pub mod http;

pub use cluster::{Options, TestCluster, TestModel, collect, collect_embedding, raw_request};
pub use exo_transport::testing::{RawFrame, open_link, send_raw_frame};
