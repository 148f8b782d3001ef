//! The boundary between the HTTP API and whatever runs the model: the [`Engine`] trait and the
//! plain data that crosses it.

use exo_core::{GenerationError, GenerationEvent, GenerationRequest, ToolSyntax};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::cluster::ClusterView;

/// What a generation streams to the API: events as they are decided, then
/// [`GenerationEvent::Finished`], or an `Err` at any point (after which nothing follows).
pub type Generation = mpsc::Receiver<Result<GenerationEvent, GenerationError>>;

/// What the API needs from the inference cluster.
///
/// The node binary implements it over the local runtime, the gateway over a remote cluster,
/// and the tests over a scripted fake. The API calls it only after a request has been
/// validated and admitted by the queue, so an engine sees at most
/// [`ApiConfig::max_concurrent`](crate::ApiConfig::max_concurrent) generations at once.
pub trait Engine: Send + Sync + 'static {
    /// Models this engine can serve right now (may be empty).
    fn models(&self) -> Vec<ModelCard>;

    /// The cluster as the engine sees it, for `GET /v1/cluster`.
    fn cluster(&self) -> BoxFuture<'_, ClusterView>;

    /// The cluster view as it changes, for `GET /v1/cluster/events` (the web page's live
    /// view). The receiver holds the latest view and is marked changed whenever the view
    /// changes: membership, the plan, loading progress and, while someone watches, the stages'
    /// figures. The event stream ends when the sender is dropped.
    ///
    /// `None`, the default, means the engine keeps no live view: the route then sends
    /// [`Engine::cluster`] once and keeps the stream open.
    fn cluster_events(&self) -> Option<watch::Receiver<ClusterView>> {
        None
    }

    /// Whether the engine can serve a generation now, and if not, why (`GET /readyz`). The
    /// API itself is alive as long as it answers (`GET /healthz`).
    fn readiness(&self) -> Readiness {
        Readiness::Ready
    }

    /// Starts one generation.
    ///
    /// The returned receiver yields [`GenerationEvent::Text`] pieces as they are decided, then
    /// exactly one [`GenerationEvent::Finished`], or an `Err` at any point (after which nothing
    /// follows). A closed (or dropped) receiver means the client went away: the engine must
    /// stop and free the request's state. An engine notices that with `Sender::closed` or a
    /// failed `send`. The API keeps the generation's slot until the engine drops its sender
    /// (at most 30 s after the client left), so `max_concurrent` bounds the work that really
    /// runs: an engine drops the sender once the work has stopped. The request's `model` is exactly what the client sent; resolving it is the
    /// engine's job ([`GenerationError::UnknownModel`] when it cannot), as are chat templates,
    /// token counts, stop strings and the context limit.
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GenerationError>>;
}

/// Whether an engine can serve now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Requests will be served.
    Ready,
    /// Requests would be refused; the reason, for people (`loading layers 0..15`).
    NotReady(String),
}

/// A model an engine can serve, as listed by `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCard {
    /// The id clients put in the `model` field.
    pub id: String,
    /// When the model was made available, in unix seconds.
    pub created: u64,
    /// Who publishes the model (for example `meta-llama`), shown as `owned_by`.
    pub owned_by: String,
    /// The most tokens (prompt plus completion) one request may use.
    pub context_length: usize,
    /// How the model's chat template writes tool calls, when it takes tools: the API then hands
    /// it a chat's tools and tool turns as they are, and reads calls in that syntax. `None`:
    /// the API asks for calls through its own generic prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_syntax: Option<ToolSyntax>,
}
