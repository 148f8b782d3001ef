//! Running one generation and delivering it in OpenAI's chat or legacy completion shape,
//! as one JSON response or as a server-sent event stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use exo_core::{FinishReason, Finished, GenerationError, GenerationEvent};

use crate::error::ApiError;
use crate::middleware::RequestLog;
use crate::queue::Slot;
use crate::request::Parsed;
use crate::state::AppState;
use crate::telemetry::Metrics;

/// Comment lines sent while a stream is idle (a long prefill, a slow stage) so that proxies do
/// not time the connection out and a client that went away is noticed on the next write.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Which OpenAI endpoint a generation answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Chat,
    Completion,
}

impl Api {
    /// The request field holding the prompt.
    fn prompt_param(self) -> &'static str {
        match self {
            Api::Chat => "messages",
            Api::Completion => "prompt",
        }
    }
}

/// Admits, starts and delivers one generation.
pub(crate) async fn respond(
    state: &AppState,
    api: Api,
    parsed: Parsed,
    log: RequestLog,
) -> Result<Response, ApiError> {
    let Parsed {
        request,
        stream,
        include_usage,
    } = parsed;
    let format = Format::new(api, request.model.clone(), include_usage);
    let metrics = &state.metrics;
    let slot = (state.admission.admit().await).inspect_err(|error| {
        if error.status() == axum::http::StatusCode::TOO_MANY_REQUESTS {
            metrics.queue_full();
        }
    })?;
    let rx = (state.engine.generate(request).await)
        .map_err(|error| engine_error(metrics, error, api, log.id()))?;
    let mut running = Running::new(rx, slot);

    if !stream {
        let mut text = String::new();
        loop {
            match running.recv().await {
                Some(Ok(GenerationEvent::Text(piece))) => text.push_str(&piece),
                Some(Ok(GenerationEvent::Finished(finished))) => {
                    running.done();
                    metrics.finished(&finished);
                    let (prompt_tokens, completion_tokens) = counts(&finished);
                    log.record_tokens(prompt_tokens, completion_tokens);
                    let usage = usage(prompt_tokens, completion_tokens);
                    return Ok(Json(format.whole(&text, finished.reason, usage)).into_response());
                }
                Some(Err(error)) => return Err(engine_error(metrics, error, api, log.id())),
                None => return Err(ended_early(metrics).for_request(log.id())),
            }
        }
    }

    // Until the first item the response can still be an ordinary error; after it, errors
    // can only travel inside the stream.
    let first = match running.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(error)) => return Err(engine_error(metrics, error, api, log.id())),
        None => return Err(ended_early(metrics).for_request(log.id())),
    };
    let mut events = EventStream {
        running,
        pending: VecDeque::new(),
        format,
        log,
        metrics: Arc::clone(metrics),
    };
    if api == Api::Chat {
        let role = json!({"role": "assistant", "content": ""});
        events.push(events.format.chunk(role, None));
    }
    events.handle(Some(Ok(first)));
    let stream = futures::stream::unfold(events, |mut events| async move {
        loop {
            if let Some(event) = events.pending.pop_front() {
                return Some((Ok::<_, Infallible>(event), events));
            }
            if events.running.is_done() {
                return None;
            }
            let item = events.running.recv().await;
            events.handle(item);
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// Counts an engine's error and turns it into the client's.
fn engine_error(metrics: &Metrics, error: GenerationError, api: Api, id: &str) -> ApiError {
    metrics.engine_error(&error);
    ApiError::from_engine(error, api.prompt_param()).for_request(id)
}

pub(crate) fn ended_early(metrics: &Metrics) -> ApiError {
    tracing::error!("engine closed a generation without finishing it");
    metrics.ended_early();
    ApiError::internal()
}

pub(crate) fn counts(finished: &Finished) -> (usize, usize) {
    (
        finished.prompt_tokens as usize,
        finished.completion_tokens() as usize,
    )
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens.saturating_add(completion_tokens),
    })
}

/// A generation the engine is running, and the slot it holds.
///
/// Once the generation has ended (its last event came) both go at once. Dropped before that
/// (the client went away), it closes the receiver, which tells the engine to stop, and keeps
/// the slot until the engine has let go of its sender, that is until the work has stopped, so
/// that [`ApiConfig::max_concurrent`](crate::ApiConfig::max_concurrent) bounds the work really
/// running and not only the clients still connected. An engine that holds on longer than
/// [`STOP_GRACE`] frees the slot anyway, with a warning. Every dialect (OpenAI's, Ollama's)
/// delivers its generations through one.
pub(crate) struct Running {
    rx: Option<mpsc::Receiver<Result<GenerationEvent, GenerationError>>>,
    slot: Option<Slot>,
}

/// How long a slot stays taken after its client left, waiting for the engine to stop.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often a client's departed generation is checked for having stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

impl Running {
    pub(crate) fn new(
        rx: mpsc::Receiver<Result<GenerationEvent, GenerationError>>,
        slot: Slot,
    ) -> Self {
        Self {
            rx: Some(rx),
            slot: Some(slot),
        }
    }

    pub(crate) async fn recv(&mut self) -> Option<Result<GenerationEvent, GenerationError>> {
        self.rx.as_mut()?.recv().await
    }

    /// The generation ended: nothing more is expected from the engine.
    pub(crate) fn done(&mut self) {
        self.rx = None;
        self.slot = None;
    }

    pub(crate) fn is_done(&self) -> bool {
        self.rx.is_none()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let (Some(mut rx), Some(slot)) = (self.rx.take(), self.slot.take()) else {
            return;
        };
        rx.close();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // A closed channel tells nothing when its last sender goes: ask, now and then.
            let stopped = async {
                while rx.sender_strong_count() > 0 {
                    tokio::time::sleep(STOP_POLL).await;
                }
            };
            if tokio::time::timeout(STOP_GRACE, stopped).await.is_err() {
                tracing::warn!(
                    grace_s = STOP_GRACE.as_secs(),
                    "the engine still runs a generation whose client left; freeing its slot"
                );
            }
            drop(slot);
        });
    }
}

/// The state of a streamed response. Dropping it (the stream ended, or the client went away
/// and the server dropped the body) stops the generation and, once it has stopped, frees its
/// slot.
struct EventStream {
    running: Running,
    pending: VecDeque<Event>,
    format: Format,
    log: RequestLog,
    metrics: Arc<Metrics>,
}

impl EventStream {
    fn push(&mut self, data: Value) {
        self.pending
            .push_back(Event::default().data(data.to_string()));
    }

    /// Turns one item from the engine into the events it produces.
    fn handle(&mut self, item: Option<Result<GenerationEvent, GenerationError>>) {
        match item {
            Some(Ok(GenerationEvent::Text(piece))) => {
                if !piece.is_empty() {
                    let delta = self.format.delta(piece);
                    self.push(delta);
                }
            }
            Some(Ok(GenerationEvent::Finished(finished))) => {
                self.finish();
                self.metrics.finished(&finished);
                let (prompt_tokens, completion_tokens) = counts(&finished);
                self.log.record_tokens(prompt_tokens, completion_tokens);
                let last = self.format.last(finished.reason);
                self.push(last);
                if self.format.include_usage {
                    let usage = self
                        .format
                        .usage_chunk(usage(prompt_tokens, completion_tokens));
                    self.push(usage);
                }
                self.pending.push_back(Event::default().data("[DONE]"));
            }
            Some(Err(error)) => {
                self.finish();
                let error = engine_error(&self.metrics, error, self.format.api, self.log.id());
                tracing::warn!(
                    status = error.status().as_u16(),
                    "generation failed mid-stream"
                );
                self.push(error.envelope());
            }
            None => {
                self.finish();
                let error = ended_early(&self.metrics).for_request(self.log.id());
                self.push(error.envelope());
            }
        }
    }

    /// Lets go of the engine and the slot as soon as nothing more is expected.
    fn finish(&mut self) {
        self.running.done();
    }
}

/// What every response or chunk of one generation shares.
#[derive(Debug)]
struct Format {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Format {
    fn new(api: Api, model: String, include_usage: bool) -> Self {
        let prefix = match api {
            Api::Chat => "chatcmpl",
            Api::Completion => "cmpl",
        };
        Self {
            api,
            id: format!("{prefix}-{:032x}", rand::random::<u128>()),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            model,
            include_usage,
        }
    }

    /// The non-streamed response.
    fn whole(&self, text: &str, finish_reason: FinishReason, usage: Value) -> Value {
        match self.api {
            Api::Chat => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_reason.as_str(),
                }],
                "usage": usage,
            }),
            Api::Completion => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "text": text,
                    "index": 0,
                    "logprobs": null,
                    "finish_reason": finish_reason.as_str(),
                }],
                "usage": usage,
            }),
        }
    }

    /// A chunk carrying a piece of text.
    fn delta(&self, piece: String) -> Value {
        match self.api {
            Api::Chat => self.chunk(json!({"content": piece}), None),
            Api::Completion => self.chunk(Value::String(piece), None),
        }
    }

    /// The chunk carrying the finish reason.
    fn last(&self, finish_reason: FinishReason) -> Value {
        let empty = match self.api {
            Api::Chat => json!({}),
            Api::Completion => Value::String(String::new()),
        };
        self.chunk(empty, Some(finish_reason))
    }

    /// One streamed chunk with a single choice: `content` is the chat delta object or the
    /// completion text.
    fn chunk(&self, content: Value, finish_reason: Option<FinishReason>) -> Value {
        let finish_reason = finish_reason.map(FinishReason::as_str);
        let choice = match self.api {
            Api::Chat => json!({
                "index": 0,
                "delta": content,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
            Api::Completion => json!({
                "text": content,
                "index": 0,
                "logprobs": null,
                "finish_reason": finish_reason,
            }),
        };
        self.envelope(vec![choice], Value::Null)
    }

    /// The chunk after the last choice when the client asked for usage.
    fn usage_chunk(&self, usage: Value) -> Value {
        self.envelope(Vec::new(), usage)
    }

    fn envelope(&self, choices: Vec<Value>, usage: Value) -> Value {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        // OpenAI sends `"usage": null` on every chunk but the last only when usage was asked
        // for; without it the field is absent.
        if self.include_usage
            && let Value::Object(fields) = &mut chunk
        {
            fields.insert("usage".to_owned(), usage);
        }
        chunk
    }
}
