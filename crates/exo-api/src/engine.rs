//! The boundary between the HTTP API and whatever runs the model: the [`Engine`] trait and the
//! plain data that crosses it.

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::cluster::ClusterView;
use crate::error::EngineError;

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

    /// Starts one generation.
    ///
    /// The returned receiver yields [`Chunk::Text`] pieces as they are decided, then exactly
    /// one [`Chunk::Finished`], or an `Err` at any point (after which nothing follows).
    /// Dropping the receiver means the client went away: the engine must stop and free the
    /// request's state. An engine notices that with `Sender::closed` or a failed `send`.
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<mpsc::Receiver<Result<Chunk, EngineError>>, EngineError>>;
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
}

/// What to continue: a chat to apply the model's chat template to, or raw text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// From `POST /v1/chat/completions`; at least one message.
    Chat(Vec<Message>),
    /// From `POST /v1/completions`, continued as is.
    Text(String),
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`; the API maps OpenAI's `developer` to `system` and
    /// rejects every other role before the engine sees it.
    pub role: String,
    /// The message text; text parts sent as an array are joined with newlines.
    pub content: String,
}

/// A validated request for one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// The model id exactly as the client sent it; resolving it is the engine's job
    /// ([`EngineError::UnknownModel`] when it cannot).
    pub model: String,
    /// What to continue.
    pub prompt: Prompt,
    /// The most tokens to generate: `max_completion_tokens`, else `max_tokens`, else
    /// [`ApiConfig::default_max_tokens`](crate::ApiConfig::default_max_tokens); `None`
    /// leaves it to the engine (typically up to the context length). Never 0.
    pub max_tokens: Option<usize>,
    /// Sampling temperature in `0.0..=2.0`; 0 means greedy. OpenAI's default is 1.0.
    pub temperature: f32,
    /// Nucleus sampling mass in `(0.0, 1.0]`; 1.0 disables it.
    pub top_p: f32,
    /// Seed for reproducible sampling, when the client gave one.
    pub seed: Option<u64>,
    /// Up to four non-empty strings; generation stops before the first one produced, which
    /// is not part of the output.
    pub stop: Vec<String>,
}

/// One item of a generation's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    /// The next piece of decoded text (may be several tokens, or part of a multi-byte
    /// character's worth held back until it is complete).
    Text(String),
    /// The generation is over; always the last item.
    Finished {
        /// Why it ended.
        finish_reason: FinishReason,
        /// Tokens in the prompt after templating.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
}

/// Why a generation ended, as OpenAI's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model emitted an end-of-sequence token or a stop string was produced.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The value of OpenAI's `finish_reason` field.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}
