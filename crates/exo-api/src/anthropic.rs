//! Anthropic's Messages dialect: `POST /v1/messages`, whole or as its named stream events,
//! with tools (`tool_use` and `tool_result` blocks).
//!
//! A thin mapping over the same engine, admission queue and [`Running`] generation as the
//! OpenAI routes, and the same tools module: Anthropic's `tools` and `tool_choice` become
//! OpenAI's (`any` is `required`), its content blocks become chat turns, and calls read out
//! of the answer become `tool_use` blocks with `stop_reason: "tool_use"`. Errors are
//! Anthropic's `{"type": "error", "error": {"type": ..., "message": ...}}`.

use std::collections::VecDeque;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use exo_core::{ChatMessage, FinishReason, GenerationRequest, Penalties, Prompt, SamplingParams};

use crate::error::ApiError;
use crate::fields::{describe, missing};
use crate::generate::{Params, Running, Step, counts};
use crate::middleware::RequestLog;
use crate::request::JsonObject;
use crate::schema::anthropic::{
    AnthropicEvent, AnthropicMessage, AnthropicMessageIn, AnthropicRequest, AnthropicUsage,
    BlockDelta, ContentBlock, StopReason,
};
use crate::schema::{self};
use crate::state::AppState;
use crate::tools::{self, Held, ToolUse};

/// An error in Anthropic's shape.
#[derive(Debug)]
pub(crate) struct AnthropicError(ApiError);

impl From<ApiError> for AnthropicError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let mut response = (status, Json(body(&self.0))).into_response();
        if status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// Anthropic's error body for `error`, its type from the status.
fn body(error: &ApiError) -> Value {
    let kind = match error.status().as_u16() {
        400 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 | 413 => "request_too_large",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    let mut message = error.message().to_owned();
    if let Some(param) = error.param()
        && !message.contains(param)
    {
        message = format!("{param}: {message}");
    }
    let body = schema::anthropic::AnthropicError {
        kind: "error",
        error: schema::anthropic::AnthropicErrorBody { kind, message },
    };
    serde_json::to_value(body).unwrap_or_default()
}

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<AppState>,
    log: RequestLog,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, AnthropicError> {
    let JsonObject(body) = body?;
    let typed: AnthropicRequest = schema::read(&body)?;
    let model = typed.model;
    let max_tokens = match typed.max_tokens {
        None => return Err(missing("max_tokens").into()),
        Some(0) => {
            return Err(
                ApiError::invalid_param("max_tokens", "'max_tokens' must be at least 1").into(),
            );
        }
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
    };
    let mut tools = tool_use(typed.tools.as_ref(), typed.tool_choice.as_ref())?;
    let mut turns = Vec::new();
    if let Some(system) = system(typed.system.as_ref())? {
        turns.push(ChatMessage::new("system", system));
    }
    let items = match typed.messages {
        Some(items) if !items.is_empty() => items,
        _ => {
            return Err(ApiError::invalid_param(
                "messages",
                "'messages' must be a non-empty array",
            )
            .into());
        }
    };
    for (i, item) in items.iter().enumerate() {
        turns.extend(message(i, item)?);
    }
    let specs = tools::lower(state.tool_syntax(Some(&model)), &mut turns, tools.as_mut());
    let temperature = typed.temperature.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("'temperature' must be between 0 and 1, got {temperature}"),
        )
        .into());
    }
    let top_p = typed.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("'top_p' must be greater than 0 and at most 1, got {top_p}"),
        )
        .into());
    }
    let top_k = typed.top_k.unwrap_or(0);
    let stop = match &typed.stop_sequences {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| match s {
                Value::String(s) => Ok(s.clone()),
                other => Err(ApiError::invalid_param(
                    "stop_sequences",
                    format!(
                        "'stop_sequences' must hold strings, got {}",
                        describe(other)
                    ),
                )),
            })
            .filter(|s| s.as_ref().map_or(true, |s| !s.is_empty()))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "stop_sequences",
                format!(
                    "'stop_sequences' must be an array of strings, got {}",
                    describe(other)
                ),
            )
            .into());
        }
    };
    let stream = typed.stream.unwrap_or(false);
    let request = GenerationRequest {
        logprobs: None,
        embed: false,
        prompt_logprobs: None,
        model: model.clone(),
        prompt: Prompt::Chat(turns),
        tools: specs,
        share_prefill: None,
        max_tokens: Some(max_tokens),
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: u32::try_from(top_k).unwrap_or(u32::MAX),
            seed: rand::random(),
        },
        stop,
        ignore_eos: false,
        constraint: tools.as_ref().and_then(ToolUse::constraint),
        penalties: Penalties::default(),
    };
    let params = Params {
        prompt: "messages",
        constraint: "tool_choice",
    };
    let mut running = Running::start(&state, request, params, log).await?;
    let answer = Answer {
        id: format!("msg_{:024x}", rand::random::<u128>() >> 32),
        model,
        tools,
    };
    if !stream {
        let (text, finished) = running.whole().await?;
        let (input_tokens, output_tokens) = counts(&finished);
        let (content, stop_reason) = answer.content(&text, finished.reason);
        let message = answer.message(
            content,
            Some(stop_reason),
            AnthropicUsage {
                input_tokens,
                output_tokens,
            },
        );
        return Ok(Json(message).into_response());
    }

    let first = running.first().await?;
    let mut pending = VecDeque::new();
    let usage = AnthropicUsage {
        input_tokens: 0,
        output_tokens: 0,
    };
    pending.push_back(event(&AnthropicEvent::MessageStart {
        message: answer.message(Vec::new(), None, usage),
    }));
    let mut state = StreamState::default();
    let mut render =
        move |step: Step, out: &mut VecDeque<Event>| answer.render(step, out, &mut state);
    render(first, &mut pending);
    let stream = running.into_stream(pending, render);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// An event, named as Anthropic names them (by its `type`).
fn event(event: &AnthropicEvent) -> Event {
    named(
        event.name(),
        serde_json::to_value(event).unwrap_or_default(),
    )
}

/// An event named as Anthropic names them.
fn named(name: &str, data: Value) -> Event {
    Event::default().event(name).data(data.to_string())
}

/// `system`: a string or text blocks.
fn system(value: Option<&Value>) -> Result<Option<String>, ApiError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(blocks)) => {
            let texts = blocks
                .iter()
                .enumerate()
                .map(|(j, b)| text_block(&format!("system[{j}]"), b))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(texts.join("\n")))
        }
        Some(other) => Err(ApiError::invalid_param(
            "system",
            format!(
                "'system' must be a string or text blocks, got {}",
                describe(other)
            ),
        )),
    }
}

fn text_block(at: &str, block: &Value) -> Result<String, ApiError> {
    match (block.get("type").and_then(Value::as_str), block.get("text")) {
        (Some("text"), Some(Value::String(text))) => Ok(text.clone()),
        _ => Err(ApiError::invalid_param(
            at,
            format!("'{at}' must be a text block: {{\"type\": \"text\", \"text\": ...}}"),
        )),
    }
}

/// One message as chat turns: its text, its tool calls written as the model writes them,
/// and tool results as the turn that carries them back.
fn message(i: usize, item: &AnthropicMessageIn) -> Result<Vec<ChatMessage>, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let role = match item.role.as_str() {
        role @ ("user" | "assistant") => role,
        _ => {
            return Err(ApiError::invalid_param(
                at("role"),
                format!("'{}' must be \"user\" or \"assistant\"", at("role")),
            ));
        }
    };
    let blocks = match &item.content {
        Value::String(text) => return Ok(vec![ChatMessage::new(role, text.clone())]),
        Value::Array(blocks) => blocks,
        _ => {
            return Err(ApiError::invalid_param(
                at("content"),
                format!(
                    "'{}' must be a string or an array of content blocks",
                    at("content")
                ),
            ));
        }
    };
    let mut text = Vec::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let here = format!("messages[{i}].content[{j}]");
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push(text_block(&here, block)?),
            Some("tool_use") if role == "assistant" => {
                let name = block.get("name").cloned().unwrap_or(Value::Null);
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                let id = block.get("id").cloned().unwrap_or(Value::Null);
                calls.push(json!({"id": id, "function": {"name": name, "arguments": input}}));
            }
            Some("tool_result") if role == "user" => {
                let content = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .enumerate()
                        .map(|(k, p)| text_block(&format!("{here}.content[{k}]"), p))
                        .collect::<Result<Vec<_>, _>>()?
                        .join("\n"),
                    Some(other) => {
                        return Err(ApiError::invalid_param(
                            format!("{here}.content"),
                            format!(
                                "a tool result's content must be text, got {}",
                                describe(other)
                            ),
                        ));
                    }
                };
                results.push(ChatMessage {
                    tool_call_id: block
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    ..ChatMessage::new("tool", content)
                });
            }
            Some(other) => {
                return Err(ApiError::invalid_param(
                    format!("{here}.type"),
                    format!(
                        "content blocks of type '{other}' are not supported in a {role} message; \
                         text, tool_use (assistant) and tool_result (user) are"
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    format!("{here}.type"),
                    format!("'{here}' must have a \"type\""),
                ));
            }
        }
    }
    let mut turns = results;
    let content = text.join("\n");
    let tool_calls = match calls.is_empty() {
        true => Vec::new(),
        false => tools::history_calls(&format!("messages[{i}].content"), &Value::Array(calls))?,
    };
    if !content.is_empty() || !tool_calls.is_empty() || turns.is_empty() {
        turns.push(ChatMessage {
            tool_calls,
            ..ChatMessage::new(role, content)
        });
    }
    Ok(turns)
}

/// Anthropic's `tools` and `tool_choice`, read through the OpenAI shapes the tools module
/// knows.
fn tool_use(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<ToolUse>, ApiError> {
    let tools = match tools {
        None => None,
        Some(Value::Array(tools)) => {
            let mut functions = Vec::with_capacity(tools.len());
            for (i, tool) in tools.iter().enumerate() {
                if let Some(kind) = tool.get("type").and_then(Value::as_str)
                    && kind != "custom"
                {
                    return Err(ApiError::invalid_param(
                        format!("tools[{i}].type"),
                        format!(
                            "server tools ('{kind}') are not supported; define the tool with name and input_schema"
                        ),
                    ));
                }
                let mut function = Map::new();
                for (from, to) in [
                    ("name", "name"),
                    ("description", "description"),
                    ("input_schema", "parameters"),
                ] {
                    if let Some(v) = tool.get(from) {
                        function.insert(to.to_owned(), v.clone());
                    }
                }
                functions.push(json!({"type": "function", "function": function}));
            }
            Some(Value::Array(functions))
        }
        // The tools module says what is wrong with it.
        Some(other) => Some(other.clone()),
    };
    let choice = match choice.map(|c| c.get("type").and_then(Value::as_str)) {
        None => None,
        Some(Some("auto")) => Some(json!("auto")),
        Some(Some("any")) => Some(json!("required")),
        Some(Some("none")) => Some(json!("none")),
        Some(Some("tool")) => Some(
            json!({"type": "function", "function": {"name": choice.and_then(|c| c.get("name"))}}),
        ),
        Some(_) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "'tool_choice.type' must be auto, any, tool or none",
            ));
        }
    };
    tools::parse(tools.as_ref(), choice.as_ref())
}

/// What every part of one answer shares.
#[derive(Debug)]
struct Answer {
    id: String,
    model: String,
    tools: Option<ToolUse>,
}

/// Where a streamed answer is: the text block open or not, the blocks sent so far, what
/// the tools hold back.
#[derive(Debug, Default)]
struct StreamState {
    text_open: bool,
    blocks: usize,
    held: Held,
}

impl Answer {
    /// The content blocks of a whole answer and its stop reason.
    fn content(&self, text: &str, reason: FinishReason) -> (Vec<ContentBlock>, StopReason) {
        let (text, calls) = match &self.tools {
            Some(tools) => tools::read_calls(text, tools),
            None => (Some(text.to_owned()), Vec::new()),
        };
        let mut content = Vec::new();
        if let Some(text) = text.filter(|t| !t.is_empty() || calls.is_empty()) {
            content.push(ContentBlock::Text { text });
        }
        for call in &calls {
            content.push(tool_use_block(call, arguments(call)));
        }
        (content, stop_reason(reason, !calls.is_empty()))
    }

    /// The answer as a message.
    fn message(
        &self,
        content: Vec<ContentBlock>,
        stop_reason: Option<StopReason>,
        usage: AnthropicUsage,
    ) -> AnthropicMessage {
        AnthropicMessage {
            id: self.id.clone(),
            kind: schema::anthropic::MessageType::Name,
            role: schema::AssistantRole::Name,
            model: self.model.clone(),
            content,
            stop_reason,
            stop_sequence: None,
            usage,
        }
    }

    fn render(&self, step: Step, out: &mut VecDeque<Event>, state: &mut StreamState) {
        match step {
            Step::Text(piece) => {
                let piece = state.held.pass(self.tools.as_ref(), piece);
                self.text(piece, out, state);
            }
            Step::Logprob(_) => {}
            Step::Finished(finished) => {
                let (rest, calls) = state.held.finish(self.tools.as_ref());
                self.text(rest, out, state);
                if state.text_open {
                    out.push_back(self.stop_block(state));
                }
                for call in &calls {
                    let index = state.blocks;
                    // The block opens with an empty input; the input follows as JSON text.
                    out.push_back(event(&AnthropicEvent::ContentBlockStart {
                        index,
                        content_block: tool_use_block(call, json!({})),
                    }));
                    out.push_back(event(&AnthropicEvent::ContentBlockDelta {
                        index,
                        delta: BlockDelta::InputJsonDelta {
                            partial_json: call.arguments.clone(),
                        },
                    }));
                    out.push_back(self.stop_block(state));
                }
                let (input_tokens, output_tokens) = counts(&finished);
                out.push_back(event(&AnthropicEvent::MessageDelta {
                    delta: schema::anthropic::MessageDelta {
                        stop_reason: stop_reason(finished.reason, !calls.is_empty()),
                        stop_sequence: None,
                    },
                    usage: AnthropicUsage {
                        input_tokens,
                        output_tokens,
                    },
                }));
                out.push_back(event(&AnthropicEvent::MessageStop));
            }
            Step::Failed(error) => out.push_back(named("error", body(&error))),
        }
    }

    /// A piece of text, opening the text block first if needed.
    fn text(&self, piece: String, out: &mut VecDeque<Event>, state: &mut StreamState) {
        if piece.is_empty() {
            return;
        }
        if !state.text_open {
            state.text_open = true;
            out.push_back(event(&AnthropicEvent::ContentBlockStart {
                index: state.blocks,
                content_block: ContentBlock::Text {
                    text: String::new(),
                },
            }));
        }
        out.push_back(event(&AnthropicEvent::ContentBlockDelta {
            index: state.blocks,
            delta: BlockDelta::TextDelta { text: piece },
        }));
    }

    fn stop_block(&self, state: &mut StreamState) -> Event {
        let stop = event(&AnthropicEvent::ContentBlockStop {
            index: state.blocks,
        });
        state.text_open = false;
        state.blocks += 1;
        stop
    }
}

/// A call as a `tool_use` block with `input`.
fn tool_use_block(call: &tools::Call, input: Value) -> ContentBlock {
    ContentBlock::ToolUse {
        id: format!("toolu_{:024x}", rand::random::<u128>() >> 32),
        name: call.name.clone(),
        input,
    }
}

/// A call's arguments as the object they stand for.
fn arguments(call: &tools::Call) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}))
}

fn stop_reason(reason: FinishReason, called: bool) -> StopReason {
    match (called, reason) {
        (true, _) => StopReason::ToolUse,
        (false, FinishReason::Stop) => StopReason::EndTurn,
        (false, FinishReason::Length) => StopReason::MaxTokens,
    }
}
