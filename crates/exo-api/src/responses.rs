//! OpenAI's Responses dialect: `POST /v1/responses`, whole or as its stream of typed events,
//! with function tools and structured output (`text.format`).
//!
//! A thin mapping over the same engine, admission queue and [`Running`] generation as chat
//! completions, and the same tools module: `input` items become chat turns (`function_call`
//! items are written back as the model writes calls, `function_call_output` items as tool
//! results), `instructions` the system turn, and calls read out of the answer become
//! `function_call` output items. Nothing is stored: `previous_response_id` is refused.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use exo_core::{ChatMessage, FinishReason, Finished, GenerationRequest, Prompt};

use crate::error::ApiError;
use crate::fields::{describe, missing};
use crate::generate::{Params, Running, Step, counts};
use crate::middleware::RequestLog;
use crate::request::{self, JsonObject};
use crate::schema::responses::{
    Echo, IncompleteDetails, OutputItem, OutputText, ResponseEvent, ResponseObject, ResponseStatus,
    ResponseUsage, ResponsesRequest,
};
use crate::schema::{self, Sampling};
use crate::state::AppState;
use crate::tools::{self, Call, Held, ToolUse, new_call_id};

/// `POST /v1/responses`.
pub(crate) async fn create(
    State(state): State<AppState>,
    log: RequestLog,
    JsonObject(body): JsonObject,
) -> Result<Response, ApiError> {
    let typed: ResponsesRequest = schema::read(&body)?;
    if typed.previous_response_id.is_some() {
        return Err(ApiError::invalid_param(
            "previous_response_id",
            "responses are not stored: send the whole conversation in 'input'",
        ));
    }
    let model = typed.model;
    let mut turns = Vec::new();
    if let Some(instructions) = typed.instructions.filter(|s| !s.is_empty()) {
        turns.push(ChatMessage::new("system", instructions));
    }
    match &typed.input {
        None => return Err(missing("input")),
        Some(Value::String(text)) => turns.push(ChatMessage::new("user", text.clone())),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let turn = input_item(i, item)?;
                // Calls made one after another are one assistant turn, as chat completions
                // gives them.
                match turns.last_mut() {
                    Some(last)
                        if !turn.tool_calls.is_empty()
                            && last.role == "assistant"
                            && !last.tool_calls.is_empty() =>
                    {
                        last.tool_calls.extend(turn.tool_calls);
                    }
                    _ => turns.push(turn),
                }
            }
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "input",
                format!(
                    "'input' must be a string or an array of items, got {}",
                    describe(other)
                ),
            ));
        }
    }
    if turns.iter().all(|t| t.role == "system") {
        return Err(ApiError::invalid_param("input", "'input' holds no message"));
    }
    let mut tools = tool_use(typed.tools.as_ref(), typed.tool_choice.as_ref())?;
    let native = state.tool_syntax(Some(&model));
    let specs = tools::lower(native, &mut turns, tools.as_mut());
    let echo = echoed(&body);
    // Sampling, limits and streaming, checked as chat completions checks them.
    let sampling = Sampling {
        model: model.clone(),
        stream: typed.stream,
        temperature: typed.temperature,
        top_p: typed.top_p,
        seed: typed.seed,
        ..Sampling::default()
    };
    let max_tokens = typed.max_output_tokens.map(|n| ("max_output_tokens", n));
    let mut parsed = request::common(
        sampling,
        max_tokens,
        Prompt::Chat(turns),
        state.config.default_max_tokens,
    )?;
    parsed.request.tools = specs;
    let format = text_format(typed.text.as_ref())?;
    let (constraint, param) = match tools.as_ref().and_then(ToolUse::constraint) {
        Some(call) => (Some(call), "tool_choice"),
        None => (format, "text.format"),
    };
    parsed.request.constraint = constraint;
    let request: GenerationRequest = parsed.request;
    let params = Params {
        prompt: "input",
        constraint: param,
    };
    let mut running = Running::start(&state, request, params, log).await?;
    let answer = Answer {
        id: format!("resp_{:032x}", rand::random::<u128>()),
        created_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model,
        tools,
        echo,
    };
    if !parsed.stream {
        let (text, finished) = running.whole().await?;
        let (text, calls) = answer.split(&text);
        return Ok(Json(answer.response(&text, &calls, Some(&finished))).into_response());
    }

    let first = running.first().await?;
    let mut stream = StreamState::default();
    let mut pending = VecDeque::new();
    let created = answer.response("", &[], None);
    let in_progress = created.clone();
    stream.emit(&mut pending, |n| ResponseEvent::Created {
        response: created,
        sequence_number: n,
    });
    stream.emit(&mut pending, |n| ResponseEvent::InProgress {
        response: in_progress,
        sequence_number: n,
    });
    let mut render =
        move |step: Step, out: &mut VecDeque<Event>| answer.render(step, out, &mut stream);
    render(first, &mut pending);
    let stream = running.into_stream(pending, render);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// One item of `input` as a chat turn.
fn input_item(i: usize, item: &Value) -> Result<ChatMessage, ApiError> {
    let at = format!("input[{i}]");
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("system" | "developer") => "system",
                Some(role @ ("user" | "assistant")) => role,
                _ => {
                    return Err(ApiError::invalid_param(
                        format!("{at}.role"),
                        format!("'{at}.role' must be user, assistant, system or developer"),
                    ));
                }
            };
            let content = match item.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        let kind = part.get("type").and_then(Value::as_str);
                        match (kind, part.get("text")) {
                            (
                                Some("input_text" | "output_text" | "text"),
                                Some(Value::String(t)),
                            ) => {
                                texts.push(t.clone());
                            }
                            _ => {
                                return Err(ApiError::invalid_param(
                                    format!("{at}.content[{j}]"),
                                    format!(
                                        "content parts of type '{}' are not supported; input_text \
                                         and output_text are",
                                        kind.unwrap_or("?")
                                    ),
                                ));
                            }
                        }
                    }
                    texts.join("\n")
                }
                _ => {
                    return Err(ApiError::invalid_param(
                        format!("{at}.content"),
                        format!("'{at}.content' must be a string or an array of text parts"),
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        }
        "function_call" => {
            let mut call = json!({"function": {
                "name": item.get("name").cloned().unwrap_or(Value::Null),
                "arguments": item.get("arguments").cloned().unwrap_or_else(|| json!("{}")),
            }});
            if let (Some(id), Value::Object(fields)) = (item.get("call_id"), &mut call) {
                fields.insert("id".into(), id.clone());
            }
            Ok(ChatMessage {
                tool_calls: tools::history_calls(&at, &Value::Array(vec![call]))?,
                ..ChatMessage::new("assistant", "")
            })
        }
        "function_call_output" => {
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            Ok(ChatMessage {
                tool_call_id: item
                    .get("call_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                ..ChatMessage::new("tool", output)
            })
        }
        other => Err(ApiError::invalid_param(
            format!("{at}.type"),
            format!("input items of type '{other}' are not supported"),
        )),
    }
}

/// The Responses API's flat function tools, read through chat's shapes.
fn tool_use(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<ToolUse>, ApiError> {
    let tools = match tools {
        None => None,
        Some(Value::Array(tools)) => {
            let mut functions = Vec::with_capacity(tools.len());
            for (i, tool) in tools.iter().enumerate() {
                match tool.get("type").and_then(Value::as_str) {
                    Some("function") => {}
                    other => {
                        return Err(ApiError::invalid_param(
                            format!("tools[{i}].type"),
                            format!(
                                "tools of type '{}' are not supported; function tools are",
                                other.unwrap_or("?")
                            ),
                        ));
                    }
                }
                let mut function = Map::new();
                for name in ["name", "description", "parameters"] {
                    if let Some(v) = tool.get(name).filter(|v| !v.is_null()) {
                        function.insert(name.to_owned(), v.clone());
                    }
                }
                functions.push(json!({"type": "function", "function": function}));
            }
            Some(Value::Array(functions))
        }
        // The tools module says what is wrong with it.
        Some(other) => Some(other.clone()),
    };
    let choice = choice.map(|choice| match choice {
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            json!({"type": "function", "function": {"name": o.get("name")}})
        }
        other => other.clone(),
    });
    tools::parse(tools.as_ref(), choice.as_ref())
}

/// `text.format`: the Responses API's `response_format`, with the schema beside its name.
fn text_format(text: Option<&Value>) -> Result<Option<exo_core::OutputConstraint>, ApiError> {
    let Some(format) = text.and_then(|t| t.get("format")) else {
        return Ok(None);
    };
    let converted = match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json!({"type": "json_schema", "json_schema": {
            "name": format.get("name"),
            "schema": format.get("schema"),
            "strict": format.get("strict"),
        }}),
        _ => format.clone(),
    };
    tools::response_format(Some(&converted))
        .map_err(|e| e.renamed("response_format", "text.format"))
}

/// The request's settings a response echoes.
fn echoed(body: &Map<String, Value>) -> Echo {
    let get = |name: &str, default: Value| {
        body.get(name)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    Echo {
        instructions: get("instructions", Value::Null),
        max_output_tokens: get("max_output_tokens", Value::Null),
        temperature: get("temperature", json!(1.0)),
        top_p: get("top_p", json!(1.0)),
        tools: get("tools", json!([])),
        tool_choice: get("tool_choice", json!("auto")),
        text: get("text", json!({"format": {"type": "text"}})),
        parallel_tool_calls: get("parallel_tool_calls", json!(true)),
        metadata: get("metadata", json!({})),
    }
}

/// What every part of one response shares.
#[derive(Debug)]
struct Answer {
    id: String,
    created_at: u64,
    model: String,
    tools: Option<ToolUse>,
    echo: Echo,
}

/// Where a streamed response is.
#[derive(Debug, Default)]
struct StreamState {
    sequence: u64,
    /// The text message item is open, and its text so far.
    message_open: bool,
    text: String,
    /// Output items sent so far.
    items: usize,
    held: Held,
}

impl StreamState {
    /// Sends the next event (`make` gets its sequence number), named by its `type`.
    fn emit(&mut self, out: &mut VecDeque<Event>, make: impl FnOnce(u64) -> ResponseEvent) {
        let data = serde_json::to_value(make(self.sequence)).unwrap_or_default();
        self.sequence += 1;
        let name = data["type"].as_str().unwrap_or("error").to_owned();
        out.push_back(Event::default().event(name).data(data.to_string()));
    }
}

impl Answer {
    fn message_id(&self) -> String {
        format!("msg_{}", &self.id[5..])
    }

    /// The text and the calls of an answer.
    fn split(&self, text: &str) -> (String, Vec<Call>) {
        match &self.tools {
            Some(tools) => {
                let (content, calls) = tools::read_calls(text, tools);
                (content.unwrap_or_default(), calls)
            }
            None => (text.to_owned(), Vec::new()),
        }
    }

    fn message_item(&self, text: &str, status: ResponseStatus) -> OutputItem {
        OutputItem::Message {
            id: self.message_id(),
            status,
            role: schema::AssistantRole::Name,
            content: vec![output_text(text)],
        }
    }

    fn call_item_id(&self, index: usize) -> String {
        format!("fc_{}_{index}", &self.id[5..])
    }

    /// Call `index` as an output item: done (with its arguments), or just added (without).
    fn call_item(&self, call: &Call, index: usize, call_id: &str, done: bool) -> OutputItem {
        OutputItem::FunctionCall {
            id: self.call_item_id(index),
            call_id: call_id.to_owned(),
            name: call.name.clone(),
            arguments: if done {
                call.arguments.clone()
            } else {
                String::new()
            },
            status: if done {
                ResponseStatus::Completed
            } else {
                ResponseStatus::InProgress
            },
        }
    }

    /// The response object: in progress (no `finished`), or done with its output.
    fn response(&self, text: &str, calls: &[Call], finished: Option<&Finished>) -> ResponseObject {
        let mut output = Vec::new();
        if finished.is_some() && (!text.is_empty() || calls.is_empty()) {
            output.push(self.message_item(text, ResponseStatus::Completed));
        }
        output.extend(
            calls
                .iter()
                .enumerate()
                .map(|(i, c)| self.call_item(c, i, &new_call_id(), true)),
        );
        self.envelope(output, finished)
    }

    fn envelope(&self, output: Vec<OutputItem>, finished: Option<&Finished>) -> ResponseObject {
        let (status, incomplete_details, usage) = match finished {
            None => (ResponseStatus::InProgress, None, None),
            Some(f) => {
                let (input_tokens, output_tokens) = counts(f);
                let usage = ResponseUsage {
                    input_tokens,
                    input_tokens_details: json!({"cached_tokens": 0}),
                    output_tokens,
                    output_tokens_details: json!({"reasoning_tokens": 0}),
                    total_tokens: input_tokens + output_tokens,
                };
                match f.reason {
                    FinishReason::Length => (
                        ResponseStatus::Incomplete,
                        Some(IncompleteDetails {
                            reason: "max_output_tokens",
                        }),
                        Some(usage),
                    ),
                    FinishReason::Stop => (ResponseStatus::Completed, None, Some(usage)),
                }
            }
        };
        ResponseObject {
            id: self.id.clone(),
            object: schema::responses::ResponseObjectName::Name,
            created_at: self.created_at,
            status,
            error: None,
            incomplete_details,
            model: self.model.clone(),
            output,
            usage,
            echo: self.echo.clone(),
        }
    }

    fn render(&self, step: Step, out: &mut VecDeque<Event>, stream: &mut StreamState) {
        match step {
            Step::Text(piece) => {
                let piece = stream.held.pass(self.tools.as_ref(), piece);
                self.text(piece, out, stream);
            }
            Step::Logprob(_) => {}
            Step::Finished(finished) => {
                let (rest, calls) = stream.held.finish(self.tools.as_ref());
                self.text(rest, out, stream);
                if !stream.message_open && calls.is_empty() {
                    // An empty answer is still one message.
                    self.open_message(out, stream);
                }
                if stream.message_open {
                    let item = self.message_item(&stream.text, ResponseStatus::Completed);
                    let (item_id, output_index) = (self.message_id(), stream.items);
                    let text = stream.text.clone();
                    stream.emit(out, |n| ResponseEvent::OutputTextDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        text: text.clone(),
                        sequence_number: n,
                    });
                    stream.emit(out, |n| ResponseEvent::ContentPartDone {
                        item_id,
                        output_index,
                        content_index: 0,
                        part: output_text(&text),
                        sequence_number: n,
                    });
                    stream.emit(out, |n| ResponseEvent::OutputItemDone {
                        output_index,
                        item,
                        sequence_number: n,
                    });
                    stream.items += 1;
                }
                let mut output = Vec::new();
                if !stream.text.is_empty() || calls.is_empty() {
                    output.push(self.message_item(&stream.text, ResponseStatus::Completed));
                }
                for (i, call) in calls.iter().enumerate() {
                    let call_id = new_call_id();
                    let item = self.call_item(call, i, &call_id, true);
                    let added = self.call_item(call, i, &call_id, false);
                    let (item_id, output_index) = (self.call_item_id(i), stream.items);
                    stream.emit(out, |n| ResponseEvent::OutputItemAdded {
                        output_index,
                        item: added,
                        sequence_number: n,
                    });
                    stream.emit(out, |n| ResponseEvent::FunctionCallArgumentsDelta {
                        item_id: item_id.clone(),
                        output_index,
                        delta: call.arguments.clone(),
                        sequence_number: n,
                    });
                    stream.emit(out, |n| ResponseEvent::FunctionCallArgumentsDone {
                        item_id,
                        output_index,
                        arguments: call.arguments.clone(),
                        sequence_number: n,
                    });
                    let done = item.clone();
                    stream.emit(out, |n| ResponseEvent::OutputItemDone {
                        output_index,
                        item: done,
                        sequence_number: n,
                    });
                    stream.items += 1;
                    output.push(item);
                }
                let response = self.envelope(output, Some(&finished));
                stream.emit(out, |n| match finished.reason {
                    FinishReason::Length => ResponseEvent::Incomplete {
                        response,
                        sequence_number: n,
                    },
                    FinishReason::Stop => ResponseEvent::Completed {
                        response,
                        sequence_number: n,
                    },
                });
            }
            Step::Failed(error) => {
                let envelope = error.envelope();
                let field = |name: &str| envelope["error"][name].as_str().map(str::to_owned);
                stream.emit(out, |n| ResponseEvent::Error {
                    code: field("code"),
                    message: field("message").unwrap_or_default(),
                    param: field("param"),
                    sequence_number: n,
                });
            }
        }
    }

    fn open_message(&self, out: &mut VecDeque<Event>, stream: &mut StreamState) {
        stream.message_open = true;
        let output_index = stream.items;
        let item = self.message_item("", ResponseStatus::InProgress);
        stream.emit(out, |n| ResponseEvent::OutputItemAdded {
            output_index,
            item,
            sequence_number: n,
        });
        let item_id = self.message_id();
        stream.emit(out, |n| ResponseEvent::ContentPartAdded {
            item_id,
            output_index,
            content_index: 0,
            part: output_text(""),
            sequence_number: n,
        });
    }

    fn text(&self, piece: String, out: &mut VecDeque<Event>, stream: &mut StreamState) {
        if piece.is_empty() {
            return;
        }
        if !stream.message_open {
            self.open_message(out, stream);
        }
        stream.text.push_str(&piece);
        let (item_id, output_index) = (self.message_id(), stream.items);
        stream.emit(out, |n| ResponseEvent::OutputTextDelta {
            item_id,
            output_index,
            content_index: 0,
            delta: piece,
            sequence_number: n,
        });
    }
}

fn output_text(text: &str) -> OutputText {
    OutputText {
        kind: schema::responses::OutputTextType::Name,
        text: text.to_owned(),
        annotations: Vec::new(),
    }
}
