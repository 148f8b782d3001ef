//! The HTTP API against a scripted fake engine: in-process through `router` + `oneshot`, and
//! over a real socket through `serve` where disconnects and shutdown matter.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod access;
mod anthropic;
mod chat;
mod completions;
mod embeddings;
mod errors;
mod events;
mod limits;
use exo_testkit::fake;
mod logging;
mod metrics;
mod models;
mod ollama;
mod openapi;
mod queue;
mod responses;
mod serve;
mod support;
mod tools;
mod web;
