//! The OpenAI-compatible HTTP API, as a library.
//!
//! [`router`] builds an axum router serving `POST /v1/chat/completions` and
//! `POST /v1/completions` (as one JSON response or as server-sent events), `GET /v1/models`,
//! `GET /v1/models/{model}`, `GET /v1/cluster` (and `GET /v1/cluster/events`, the same view as
//! server-sent events each time it changes), `GET /healthz` (alive; also `GET /health`),
//! `GET /readyz` (can serve now; 503 with the reason until then), `GET /metrics` (Prometheus's
//! text format; every metric is listed in `telemetry.rs`), `GET /openapi.json`, a web page
//! at `/` (a chat and the cluster, live; its files are embedded and served at `/ui/{file}`),
//! and Ollama's dialect of the same generations (`POST /api/chat`, `POST /api/generate`,
//! `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version`, answered as NDJSON
//! lines with Ollama's `{"error": ...}` errors; a configured API key protects `/api/*` as it
//! does `/v1/*`), Anthropic's `POST /v1/messages`, OpenAI's `POST /v1/responses`, and
//! embeddings (`POST /v1/embeddings`, Ollama's `POST /api/embed` and `POST /api/embeddings`);
//! [`serve`] runs it on an already-bound listener until a shutdown future resolves. Requests
//! are validated here, in OpenAI's terms and with OpenAI's error envelope, then admitted by a
//! bounded queue ([`ApiConfig::max_concurrent`] running, [`ApiConfig::max_queued`] waiting,
//! 429 beyond), and only then handed to the [`Engine`].
//!
//! This crate knows HTTP and the OpenAI (and Ollama) wire formats and must NOT know about models,
//! tokenizers, tensors, libp2p, gRPC or how the cluster is laid out: it reaches the cluster
//! only through the [`Engine`] trait, which the node and gateway binaries implement and
//! which the tests implement with a scripted fake. Resolving model ids, applying chat
//! templates, counting tokens and enforcing stop strings and context limits are the engine's
//! job. When a client goes away the API drops the engine's receiver, and the engine stops.
//! What crosses the trait is `exo-core`'s plain types (request, events, typed errors).
//!
//! ```no_run
//! # async fn run(engine: std::sync::Arc<dyn exo_api::Engine>) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:52415").await?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! exo_api::serve(listener, engine, exo_api::ApiConfig::default(), shutdown).await
//! # }
//! ```

mod anthropic;
mod cluster;
mod config;
mod embeddings;
mod engine;
mod error;
mod fields;
mod generate;
mod middleware;
mod ollama;
mod openapi;
mod queue;
mod request;
mod responses;
mod routes;
mod schema;
mod server;
mod state;
mod telemetry;
mod tools;
mod web;

use std::future::Future;
use std::sync::Arc;

pub use crate::cluster::{
    ClusterView, FetchView, LinkView, NodeState, NodeView, PeerProblemView, PlanView, StageView,
};
pub use crate::config::ApiConfig;
pub use crate::engine::{Engine, Generation, ModelCard, Readiness};
pub use crate::openapi::openapi;
pub use crate::routes::router;
pub use exo_core::{
    ChatMessage, FinishReason, Finished, GenerationError, GenerationEvent, GenerationRequest,
    Logprob, OutputConstraint, Penalties, Prompt, PromptLogprobs, SamplingParams, TokenText,
    ToolCall, ToolSpec, ToolSyntax,
};

/// Serves the API on an already-bound `listener` until `shutdown` resolves, then stops
/// accepting connections and waits for the requests in flight, streams included, to finish.
///
/// It binds nothing itself, so the caller chooses the address (tests bind `127.0.0.1:0`).
/// Generations in flight run to their end; a caller that cannot wait that long should race
/// this future against a timeout.
///
/// Connections are HTTP/1.1, held to [`ApiConfig::max_connections`] (at the cap the
/// longest-idle one makes room; with none idle the newcomer gets 503), and closed when idle
/// for [`ApiConfig::idle_timeout`] or slower than [`ApiConfig::header_timeout`] to send a
/// request's head. Errors accepting a connection, such as running out of file descriptors,
/// are logged and retried: only `shutdown` ends the loop.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<dyn Engine>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    match listener.local_addr() {
        Ok(address) => tracing::info!(%address, "serving the OpenAI-compatible API"),
        Err(error) => tracing::warn!(%error, "serving on a listener without a local address"),
    }
    let limits = server::Limits::new(&config);
    server::serve(listener, router(engine, config), limits, shutdown).await;
    tracing::info!("API server stopped");
    Ok(())
}
