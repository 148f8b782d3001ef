//! Running one generation and delivering it in OpenAI's chat or legacy completion shape,
//! as one JSON response or as a server-sent event stream.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use exo_core::{
    FinishReason, Finished, GenerationError, GenerationEvent, GenerationRequest, Logprob,
    PromptLogprobs, TokenText,
};

use crate::error::ApiError;
use crate::middleware::RequestLog;
use crate::queue::Slot;
use crate::request::{Echo, Parsed};
use crate::schema::{
    self, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice,
    Completion, CompletionChoice, Delta, Usage,
};
use crate::state::AppState;
use crate::telemetry::Metrics;
use crate::tools::{self, Held, ToolUse};

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

/// Admits, starts and delivers one generation, or `n` of them as the choices of one answer.
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
        tools,
        constraint_param,
        n,
        echo,
    } = parsed;
    let params = Params {
        prompt: api.prompt_param(),
        constraint: constraint_param,
    };
    if n > state.config.max_concurrent {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "'n' is {n}, but this server runs at most {} generations at once (--max-concurrent)",
                state.config.max_concurrent
            ),
        ));
    }
    let mut format = Format::new(api, request.model.clone(), include_usage, tools);
    format.logprobs = request.logprobs.is_some();
    // Each choice is a generation of its own, with its own seed (so that sampled choices
    // differ) and its own slot: `n` counts against `--max-concurrent` like `n` requests. They
    // share a key, so that the engine may compute their prompt once.
    let mut request = request;
    if n > 1 {
        request.share_prefill = Some(rand::random());
    }
    let mut runnings = Vec::with_capacity(n);
    for i in 0..n {
        let mut request = request.clone();
        request.sampling.seed = request.sampling.seed.wrapping_add(i as u64);
        runnings.push(Running::start(state, request, params, log.clone()).await?);
    }

    if !stream {
        let wholes =
            futures::future::join_all(runnings.iter_mut().map(Running::whole_with_logprobs)).await;
        let mut choices = Vec::with_capacity(n);
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        for (index, (whole, running)) in wholes.into_iter().zip(&mut runnings).enumerate() {
            let (mut text, finished, mut logprobs) = whole?;
            let (prompt, completion) = counts(&finished);
            prompt_tokens = prompt;
            completion_tokens += completion;
            if let Some(echo) = &echo {
                let mut entries = running.prompt_entries();
                text.insert_str(0, &echo_text(echo, &entries));
                entries.append(&mut logprobs);
                logprobs = entries;
            }
            let logprobs = format
                .logprobs
                .then(|| format.logprobs_json(&logprobs, &mut 0));
            choices.push((index, text, finished.reason, logprobs));
        }
        let usage = Usage::new(prompt_tokens, completion_tokens);
        return Ok(Json(format.whole(choices, usage)).into_response());
    }

    // Until the first item the response can still be an ordinary error; after it, errors
    // can only travel inside the stream.
    let mut firsts = Vec::with_capacity(n);
    for running in &mut runnings {
        firsts.push(running.first().await?);
    }
    let format = Arc::new(format);
    let totals = Arc::new(std::sync::Mutex::new((0usize, 0usize)));
    let mut streams = Vec::with_capacity(n);
    for (index, (mut running, first)) in runnings.into_iter().zip(firsts).enumerate() {
        let mut pending = VecDeque::new();
        if api == Api::Chat {
            let role = Delta {
                role: Some(schema::AssistantRole::Name),
                content: Some(String::new()),
                tool_calls: None,
            };
            pending.push_back(event(&format.chunk(index, Piece::Delta(role), None)));
        }
        let mut choice = Choice {
            index,
            held: Held::default(),
            // One choice ends the stream itself; several end it together, below.
            closes: n == 1,
            totals: Arc::clone(&totals),
            pending: Vec::new(),
            offset: 0,
        };
        // The echoed prompt first, with its tokens' log-probabilities when asked.
        if let Some(echo) = &echo {
            choice.pending = running.prompt_entries();
            let chunk = format.delta(index, echo_text(echo, &choice.pending));
            pending.push_back(event(&format.with_logprobs(chunk, &mut choice)));
        }
        let format = Arc::clone(&format);
        let mut render =
            move |step: Step, out: &mut VecDeque<Event>| format.render(step, out, &mut choice);
        render(first, &mut pending);
        streams.push(running.into_stream(pending, render).boxed());
    }
    let stream = if n == 1 {
        streams.remove(0)
    } else {
        let end = futures::stream::once(async move {
            let (prompt_tokens, completion_tokens) = totals.lock().map_or((0, 0), |t| *t);
            let mut out = Vec::new();
            if format.include_usage {
                out.push(Ok(event(
                    &format.usage_chunk(Usage::new(prompt_tokens, completion_tokens)),
                )));
            }
            out.push(Ok(Event::default().data("[DONE]")));
            futures::stream::iter(out)
        })
        .flatten();
        futures::stream::select_all(streams).chain(end).boxed()
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// The text an echoed answer begins with: the prompt, or its tokens' texts.
fn echo_text(echo: &Echo, entries: &[Logprob]) -> String {
    match echo {
        Echo::Text(text) => text.clone(),
        Echo::Tokens => entries.iter().map(|e| e.chosen.token.as_str()).collect(),
    }
}

/// The request fields an engine's error about the request is blamed on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params {
    /// The field holding the prompt, blamed when the prompt alone overflows.
    pub(crate) prompt: &'static str,
    /// The field that gave the output's grammar, blamed when it does not compile.
    pub(crate) constraint: &'static str,
}

/// Counts an engine's error and turns it into the client's.
fn engine_error(metrics: &Metrics, error: GenerationError, params: Params, id: &str) -> ApiError {
    metrics.engine_error(&error);
    let error = match error {
        GenerationError::Invalid {
            param: Some(param),
            message,
        } if param == "constraint" => GenerationError::invalid(params.constraint, message),
        other => other,
    };
    ApiError::from_engine(error, params.prompt).for_request(id)
}

fn ended_early(metrics: &Metrics) -> ApiError {
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
    metrics: Arc<Metrics>,
    log: RequestLog,
    params: Params,
    /// The prompt's embedding, once it came (requests that asked for one).
    embedding: Option<Vec<f32>>,
    /// The prompt's tokens' log-probabilities, once they came (requests that asked).
    prompt_logprobs: Option<PromptLogprobs>,
}

/// One item of a running generation, already counted (metrics, the request's log line) and,
/// when it is a failure, already the client's error.
pub(crate) enum Step {
    Text(String),
    /// A generated token's log-probability (only when the request asked), before its text.
    Logprob(Logprob),
    Finished(Finished),
    Failed(ApiError),
}

/// How long a slot stays taken after its client left, waiting for the engine to stop.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// How often a client's departed generation is checked for having stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

impl Running {
    /// Admits `request` (a slot, or 429) and starts it on the engine.
    pub(crate) async fn start(
        state: &AppState,
        request: GenerationRequest,
        params: Params,
        log: RequestLog,
    ) -> Result<Self, ApiError> {
        let metrics = Arc::clone(&state.metrics);
        let slot = (state.admission.admit().await).inspect_err(|error| {
            if error.status() == axum::http::StatusCode::TOO_MANY_REQUESTS {
                metrics.queue_full();
            }
        })?;
        let rx = (state.engine.generate(request).await)
            .map_err(|error| engine_error(&metrics, error, params, log.id()))?;
        Ok(Self {
            rx: Some(rx),
            slot: Some(slot),
            metrics,
            log,
            params,
            embedding: None,
            prompt_logprobs: None,
        })
    }

    /// The next item; `None` once the generation has ended (its last item was a
    /// [`Step::Finished`] or a [`Step::Failed`]).
    pub(crate) async fn next(&mut self) -> Option<Step> {
        // An embedding or the prompt's log-probabilities are kept (for [`Running::embedding`]
        // and [`Running::prompt_entries`]), not steps of a text's stream.
        let item = loop {
            match self.rx.as_mut()?.recv().await {
                Some(Ok(GenerationEvent::Embedding(values))) => self.embedding = Some(values),
                Some(Ok(GenerationEvent::PromptLogprobs(p))) => self.prompt_logprobs = Some(p),
                other => break other,
            }
        };
        Some(match item {
            Some(Ok(GenerationEvent::Embedding(_) | GenerationEvent::PromptLogprobs(_))) => {
                Step::Failed(ApiError::internal())
            }
            Some(Ok(GenerationEvent::Text(piece))) => Step::Text(piece),
            Some(Ok(GenerationEvent::Logprob(entry))) => Step::Logprob(entry),
            Some(Ok(GenerationEvent::Finished(finished))) => {
                self.done();
                self.metrics.finished(&finished);
                let (prompt_tokens, completion_tokens) = counts(&finished);
                self.log.record_tokens(prompt_tokens, completion_tokens);
                Step::Finished(finished)
            }
            Some(Err(error)) => {
                self.done();
                let id = self.log.id();
                Step::Failed(engine_error(&self.metrics, error, self.params, id))
            }
            None => {
                self.done();
                Step::Failed(ended_early(&self.metrics).for_request(self.log.id()))
            }
        })
    }

    /// The first item of a streamed answer; a failure there is still an ordinary error
    /// response.
    pub(crate) async fn first(&mut self) -> Result<Step, ApiError> {
        match self.next().await {
            Some(Step::Failed(error)) => Err(error),
            Some(step) => Ok(step),
            None => Err(ApiError::internal()),
        }
    }

    /// The whole answer and how it ended, or the error.
    pub(crate) async fn whole(&mut self) -> Result<(String, Finished), ApiError> {
        let (text, finished, _) = self.whole_with_logprobs().await?;
        Ok((text, finished))
    }

    /// The whole answer, how it ended and its tokens' log-probabilities (if asked for).
    pub(crate) async fn whole_with_logprobs(
        &mut self,
    ) -> Result<(String, Finished, Vec<Logprob>), ApiError> {
        let mut text = String::new();
        let mut logprobs = Vec::new();
        loop {
            match self.next().await {
                Some(Step::Text(piece)) => text.push_str(&piece),
                Some(Step::Logprob(entry)) => logprobs.push(entry),
                Some(Step::Finished(finished)) => return Ok((text, finished, logprobs)),
                Some(Step::Failed(error)) => return Err(error),
                None => return Err(ApiError::internal()),
            }
        }
    }

    /// The prompt's tokens as entries of completions' `logprobs` (for `echo`): the first has
    /// no log-probability (NaN here, `null` in the response). Empty when they did not come
    /// (the request did not ask).
    pub(crate) fn prompt_entries(&mut self) -> Vec<Logprob> {
        let Some(prompt) = self.prompt_logprobs.take() else {
            return Vec::new();
        };
        let mut first = prompt.first;
        first.logprob = f32::NAN;
        std::iter::once(Logprob {
            chosen: first,
            top: Vec::new(),
        })
        .chain(prompt.rest)
        .collect()
    }

    /// The embedding a request with [`GenerationRequest::embed`] asked for, and how it ended.
    pub(crate) async fn embedding(&mut self) -> Result<(Vec<f32>, Finished), ApiError> {
        let (_, finished) = self.whole().await?;
        match self.embedding.take() {
            Some(values) => Ok((values, finished)),
            None => Err(ended_early(&self.metrics).for_request(self.log.id())),
        }
    }

    /// A response body's stream: `pending`, then what `render` makes of each later item,
    /// until the generation ends. Dropping it (the client went away) stops the generation.
    pub(crate) fn into_stream<P, R>(
        self,
        pending: VecDeque<P>,
        render: R,
    ) -> impl futures::Stream<Item = Result<P, Infallible>> + Send + 'static
    where
        P: Send + 'static,
        R: FnMut(Step, &mut VecDeque<P>) + Send + 'static,
    {
        futures::stream::unfold(
            (self, pending, render),
            |(mut running, mut pending, mut render)| async move {
                loop {
                    if let Some(piece) = pending.pop_front() {
                        return Some((Ok(piece), (running, pending, render)));
                    }
                    let step = running.next().await?;
                    if let Step::Failed(error) = &step {
                        tracing::warn!(
                            status = error.status().as_u16(),
                            "generation failed mid-stream"
                        );
                    }
                    render(step, &mut pending);
                }
            },
        )
    }

    /// The generation ended: nothing more is expected from the engine.
    fn done(&mut self) {
        self.rx = None;
        self.slot = None;
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

/// An SSE event carrying `data`.
fn event(data: &Value) -> Event {
    Event::default().data(data.to_string())
}

/// What every response or chunk of one generation shares.
#[derive(Debug)]
struct Format {
    api: Api,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The tools offered, whose calls are read out of the text.
    tools: Option<ToolUse>,
    /// Whether the request asked for log-probabilities.
    logprobs: bool,
}

/// One choice of a streamed answer.
#[derive(Debug)]
struct Choice {
    index: usize,
    held: Held,
    /// Whether its end ends the stream (usage, `[DONE]`): the only choice does.
    closes: bool,
    /// Prompt and completion tokens of the choices ended so far.
    totals: Arc<std::sync::Mutex<(usize, usize)>>,
    /// Log-probabilities not sent yet: they go with the next chunk.
    pending: Vec<Logprob>,
    /// Characters of text their tokens covered so far (completions' `text_offset`).
    offset: usize,
}

impl Format {
    /// The events one item of a streamed choice produces.
    fn render(&self, step: Step, out: &mut VecDeque<Event>, choice: &mut Choice) {
        let index = choice.index;
        match step {
            Step::Text(piece) => {
                let piece = choice.held.pass(self.tools.as_ref(), piece);
                if !piece.is_empty() {
                    let chunk = self.delta(index, piece);
                    out.push_back(event(&self.with_logprobs(chunk, choice)));
                }
            }
            Step::Logprob(entry) => choice.pending.push(entry),
            Step::Finished(finished) => {
                let (prompt_tokens, completion_tokens) = counts(&finished);
                let mut reason = schema::FinishReason::from(finished.reason);
                let (content, calls) = choice.held.finish(self.tools.as_ref());
                if !content.is_empty() {
                    let chunk = self.delta(index, content);
                    out.push_back(event(&self.with_logprobs(chunk, choice)));
                }
                if !calls.is_empty() {
                    let delta = Delta {
                        role: None,
                        content: None,
                        tool_calls: Some(
                            calls
                                .iter()
                                .enumerate()
                                .map(|(i, c)| c.openai(Some(i)))
                                .collect(),
                        ),
                    };
                    out.push_back(event(&self.chunk(index, Piece::Delta(delta), None)));
                    reason = schema::FinishReason::ToolCalls;
                }
                let last = self.last(index, reason);
                out.push_back(event(&self.with_logprobs(last, choice)));
                if let Ok(mut totals) = choice.totals.lock() {
                    totals.0 = prompt_tokens;
                    totals.1 += completion_tokens;
                }
                if choice.closes {
                    if self.include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens);
                        out.push_back(event(&self.usage_chunk(usage)));
                    }
                    out.push_back(Event::default().data("[DONE]"));
                }
            }
            Step::Failed(error) => out.push_back(event(&error.envelope())),
        }
    }

    fn new(api: Api, model: String, include_usage: bool, tools: Option<ToolUse>) -> Self {
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
            tools,
            logprobs: false,
        }
    }

    /// `chunk` with the log-probabilities `choice` holds, if the request asked for them.
    fn with_logprobs(&self, mut chunk: Value, choice: &mut Choice) -> Value {
        if self.logprobs && !choice.pending.is_empty() {
            let entries = std::mem::take(&mut choice.pending);
            chunk["choices"][0]["logprobs"] = self.logprobs_json(&entries, &mut choice.offset);
        }
        chunk
    }

    /// Log-probabilities in the endpoint's shape: chat's `content` list, or the legacy
    /// completion's parallel lists (`offset` counts the characters before them).
    fn logprobs_json(&self, entries: &[Logprob], offset: &mut usize) -> Value {
        let token =
            |t: &TokenText| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes});
        match self.api {
            Api::Chat => {
                let content: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        let mut entry = token(&e.chosen);
                        entry["top_logprobs"] = e.top.iter().map(token).collect();
                        entry
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Api::Completion => {
                let mut offsets = Vec::with_capacity(entries.len());
                for e in entries {
                    offsets.push(*offset);
                    *offset += e.chosen.token.chars().count();
                }
                // An echoed prompt's first token has no log-probability: null in both lists.
                let tops: Vec<Value> = entries
                    .iter()
                    .map(|e| {
                        if e.chosen.logprob.is_nan() {
                            return Value::Null;
                        }
                        let mut top = Map::new();
                        for t in &e.top {
                            top.insert(t.token.clone(), json!(t.logprob));
                        }
                        Value::Object(top)
                    })
                    .collect();
                json!({
                    "tokens": entries.iter().map(|e| e.chosen.token.clone()).collect::<Vec<_>>(),
                    "token_logprobs": entries
                        .iter()
                        .map(|e| (!e.chosen.logprob.is_nan()).then_some(e.chosen.logprob))
                        .collect::<Vec<_>>(),
                    "top_logprobs": tops,
                    "text_offset": offsets,
                })
            }
        }
    }

    /// The non-streamed response: each choice's index, text, end and log-probabilities.
    fn whole(
        &self,
        choices: Vec<(usize, String, FinishReason, Option<Value>)>,
        usage: Usage,
    ) -> Value {
        let response = match self.api {
            Api::Chat => serde_json::to_value(ChatCompletion {
                id: self.id.clone(),
                object: schema::ChatCompletionObject::Name,
                created: self.created,
                model: self.model.clone(),
                choices: choices
                    .into_iter()
                    .map(|(index, text, reason, logprobs)| {
                        self.chat_choice(index, text, reason, logprobs)
                    })
                    .collect(),
                usage,
            }),
            Api::Completion => serde_json::to_value(
                self.completion(
                    choices
                        .into_iter()
                        .map(|(index, text, reason, logprobs)| CompletionChoice {
                            text,
                            index,
                            logprobs,
                            finish_reason: Some(reason.into()),
                        })
                        .collect(),
                    Some(Some(usage)),
                ),
            ),
        };
        response.unwrap_or_default()
    }

    /// One choice of a whole chat answer: its text, or the tool calls read out of it.
    fn chat_choice(
        &self,
        index: usize,
        text: String,
        reason: FinishReason,
        logprobs: Option<Value>,
    ) -> ChatChoice {
        let mut message = AssistantMessage {
            role: schema::AssistantRole::Name,
            content: Some(text),
            tool_calls: None,
        };
        let mut finish_reason = schema::FinishReason::from(reason);
        if let (Some(tools), Some(text)) = (&self.tools, &message.content) {
            let (content, calls) = tools::read_calls(text, tools);
            if !calls.is_empty() {
                message.tool_calls = Some(calls.iter().map(|c| c.openai(None)).collect());
                message.content = content;
                finish_reason = schema::FinishReason::ToolCalls;
            }
        }
        ChatChoice {
            index,
            message,
            logprobs,
            finish_reason,
        }
    }

    /// A chunk carrying a piece of choice `index`'s text.
    fn delta(&self, index: usize, piece: String) -> Value {
        match self.api {
            Api::Chat => self.chunk(
                index,
                Piece::Delta(Delta {
                    role: None,
                    content: Some(piece),
                    tool_calls: None,
                }),
                None,
            ),
            Api::Completion => self.chunk(index, Piece::Text(piece), None),
        }
    }

    /// The chunk carrying choice `index`'s finish reason.
    fn last(&self, index: usize, finish_reason: schema::FinishReason) -> Value {
        let empty = match self.api {
            Api::Chat => Piece::Delta(Delta {
                role: None,
                content: None,
                tool_calls: None,
            }),
            Api::Completion => Piece::Text(String::new()),
        };
        self.chunk(index, empty, Some(finish_reason))
    }

    /// One streamed chunk with a single choice.
    fn chunk(
        &self,
        index: usize,
        piece: Piece,
        finish_reason: Option<schema::FinishReason>,
    ) -> Value {
        self.envelope(Some((index, piece, finish_reason)), None)
    }

    /// The chunk after the last choice when the client asked for usage.
    fn usage_chunk(&self, usage: Usage) -> Value {
        self.envelope(None, Some(usage))
    }

    /// A streamed chunk: one choice's piece, or (with `usage`) none. OpenAI sends
    /// `"usage": null` on every chunk but the last only when usage was asked for; without it
    /// the field is absent.
    fn envelope(
        &self,
        choice: Option<(usize, Piece, Option<schema::FinishReason>)>,
        usage: Option<Usage>,
    ) -> Value {
        let usage = self.include_usage.then_some(usage);
        let chunk = match self.api {
            Api::Chat => serde_json::to_value(ChatCompletionChunk {
                id: self.id.clone(),
                object: schema::ChatCompletionChunkObject::Name,
                created: self.created,
                model: self.model.clone(),
                choices: choice
                    .into_iter()
                    .map(|(index, piece, finish_reason)| ChunkChoice {
                        index,
                        delta: match piece {
                            Piece::Delta(delta) => delta,
                            Piece::Text(text) => Delta {
                                role: None,
                                content: Some(text),
                                tool_calls: None,
                            },
                        },
                        logprobs: None,
                        finish_reason,
                    })
                    .collect(),
                usage,
            }),
            Api::Completion => serde_json::to_value(
                self.completion(
                    choice
                        .into_iter()
                        .map(|(index, piece, finish_reason)| CompletionChoice {
                            text: match piece {
                                Piece::Text(text) => text,
                                Piece::Delta(delta) => delta.content.unwrap_or_default(),
                            },
                            index,
                            logprobs: None,
                            finish_reason,
                        })
                        .collect(),
                    usage,
                ),
            ),
        };
        chunk.unwrap_or_default()
    }

    /// A text completion, whole or a chunk of one.
    fn completion(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Option<Usage>>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object: schema::TextCompletionObject::Name,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

/// What a streamed chunk carries of its choice: a chat delta, or a completion's text.
enum Piece {
    Delta(Delta),
    Text(String),
}
