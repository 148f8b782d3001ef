//! Reading and validating request bodies in OpenAI's shapes.
//!
//! Bodies are deserialized into the typed requests of [`crate::schema`] (whose errors name the
//! field at fault as `param` and describe the problem in JSON terms: "must be a number, got a
//! string"; unknown fields pass, as OpenAI's do), then checked here: ranges, the fields that
//! take several shapes, and what the engine needs made of them.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::fields::{describe, missing};
use crate::schema::{self, ChatCompletionRequest, CompletionRequest, MessageIn, Sampling};
use crate::state::AppState;
use crate::tools::{self, ToolUse};
use exo_core::{
    ChatMessage as Message, GenerationRequest, Penalties, Prompt, SamplingParams, ToolSyntax,
};

/// The most choices (`n`) one request may ask for; each is a generation of its own.
const MAX_CHOICES: u64 = 16;

/// OpenAI accepts at most this many stop strings.
const MAX_STOP: usize = 4;

/// A request body that is a JSON object, sent with a JSON media type, with none, or with one
/// that clients use for JSON by accident (see [`json_or_lenient`]).
#[derive(Debug)]
pub(crate) struct JsonObject(pub(crate) Map<String, Value>);

impl FromRequest<AppState> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        if let Some(content_type) = req.headers().get(header::CONTENT_TYPE) {
            let essence = content_type
                .to_str()
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if !json_or_lenient(&essence) {
                return Err(ApiError::invalid(format!(
                    "Content-Type must be application/json, got {}",
                    if essence.is_empty() {
                        "an unreadable value"
                    } else {
                        &essence
                    }
                )));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large(state.config.max_body_bytes)
            } else {
                ApiError::invalid(format!(
                    "could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|error| {
            ApiError::invalid(format!("could not parse the request body as JSON: {error}"))
        })?;
        match value {
            Value::Object(map) => Ok(Self(map)),
            other => Err(ApiError::invalid(format!(
                "request body must be a JSON object, got {}",
                describe(&other)
            ))),
        }
    }
}

/// Whether a body of this media type is read as JSON: JSON's own types, and the two that
/// clients send JSON under without meaning to (`curl -d` sends form-urlencoded, a browser's
/// `fetch` with a string body text/plain). The body must still parse as JSON.
fn json_or_lenient(essence: &str) -> bool {
    essence == "application/json"
        || essence.ends_with("+json")
        || essence == "text/plain"
        || essence == "application/x-www-form-urlencoded"
}

/// A validated generation request and how to deliver its result.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) request: GenerationRequest,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// The tools offered, whose calls are read back out of the answer.
    pub(crate) tools: Option<ToolUse>,
    /// The field a constraint the engine cannot compile is blamed on.
    pub(crate) constraint_param: &'static str,
    /// Choices asked for: that many generations of the same prompt.
    pub(crate) n: usize,
    /// Completions' `echo`: the prompt, which the answer's text (and log-probabilities)
    /// begin with.
    pub(crate) echo: Option<Echo>,
}

/// What an echoed answer begins with.
#[derive(Clone, Debug)]
pub(crate) enum Echo {
    /// The prompt's text.
    Text(String),
    /// The texts of the prompt's tokens (a prompt of token ids), from the engine's scores.
    Tokens,
}

/// Validates a `POST /v1/chat/completions` body.
///
/// `native`: the tool-call syntax of the model's chat template, when it takes tools
/// ([`tools::lower`]).
pub(crate) fn chat(
    body: &Map<String, Value>,
    default_max_tokens: Option<usize>,
    native: Option<ToolSyntax>,
) -> Result<Parsed, ApiError> {
    let ChatCompletionRequest { sampling, chat } = ChatCompletionRequest::read(body)?;
    let mut messages = messages(&chat.messages)?;
    let logprobs = match (chat.logprobs.unwrap_or(false), chat.top_logprobs) {
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "'top_logprobs' needs 'logprobs': true",
            ));
        }
        (false, _) => None,
        (true, top) => Some(top_logprobs("top_logprobs", top.unwrap_or(0), 20)?),
    };
    // Tools and formats take several shapes: the tools module reads them.
    let mut tools = tools::parse(chat.tools.as_ref(), chat.tool_choice.as_ref())?;
    let format = tools::response_format(chat.response_format.as_ref())?;
    let specs = tools::lower(native, &mut messages, tools.as_mut());
    // OpenAI's newer name wins when both are given.
    let max_tokens = match chat.max_completion_tokens {
        Some(n) => Some(("max_completion_tokens", n)),
        None => sampling.max_tokens.map(|n| ("max_tokens", n)),
    };
    let mut parsed = common(
        sampling,
        max_tokens,
        Prompt::Chat(messages),
        default_max_tokens,
    )?;
    parsed.request.tools = specs;
    // A call the request demands is the output's grammar; otherwise the response format's.
    let (constraint, param) = match tools.as_ref().and_then(ToolUse::constraint) {
        Some(call) => (Some(call), "tool_choice"),
        None => (format, "response_format"),
    };
    parsed.request.constraint = constraint;
    parsed.request.logprobs = logprobs;
    parsed.constraint_param = param;
    parsed.tools = tools;
    Ok(parsed)
}

/// Validates a `POST /v1/completions` body.
pub(crate) fn completion(
    body: &Map<String, Value>,
    default_max_tokens: Option<usize>,
) -> Result<Parsed, ApiError> {
    let CompletionRequest {
        sampling,
        completion: fields,
    } = CompletionRequest::read(body)?;
    let batch = |count: usize| {
        ApiError::invalid_param(
            "prompt",
            format!(
                "'prompt' must be one prompt (a string, or an array of token ids); batches of \
                 {count} prompts are not supported"
            ),
        )
    };
    // The prompt's text, or (as the error side) its token ids.
    let prompt: Result<String, Vec<u32>> = match fields.prompt.ok_or_else(|| missing("prompt"))? {
        Value::String(text) => Ok(text),
        Value::Array(items) => match items.as_slice() {
            [Value::String(text)] => Ok(text.clone()),
            [Value::Array(ids)] => token_ids(ids).map(Err)?,
            [Value::Number(_), ..] => token_ids(&items).map(Err)?,
            [] => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "'prompt' is an empty array",
                ));
            }
            [_] => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "'prompt' must be a string or an array of token ids",
                ));
            }
            _ => return Err(batch(items.len())),
        },
        other => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!("'prompt' must be a string, got {}", describe(&other)),
            ));
        }
    };
    if fields.best_of.is_some_and(|n| n > 1) {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of > 1 is not supported",
        ));
    }
    if fields.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let logprobs = match fields.logprobs {
        None => None,
        Some(n) => Some(top_logprobs("logprobs", n, 5)?),
    };
    // Special tokens written in the prompt stay text unless the caller asks for them.
    let parse_special = fields.parse_special_tokens == Some(true);
    let prompt = match prompt {
        Ok(text) if parse_special => Prompt::Raw(text),
        Ok(text) => Prompt::Text(text),
        Err(ids) => Prompt::Tokens(ids),
    };
    let echo = (fields.echo == Some(true)).then(|| match &prompt {
        Prompt::Text(text) | Prompt::Raw(text) => Echo::Text(text.clone()),
        Prompt::Tokens(_) | Prompt::Chat(_) => Echo::Tokens,
    });
    let max_tokens = sampling.max_tokens.map(|n| ("max_tokens", n));
    let mut parsed = common(sampling, max_tokens, prompt, default_max_tokens)?;
    parsed.request.logprobs = logprobs;
    // With log-probabilities, the echoed prompt's tokens come with theirs; a prompt of token
    // ids is echoed as its tokens' texts, which come with them.
    parsed.request.prompt_logprobs = match &echo {
        Some(Echo::Text(_)) => logprobs,
        Some(Echo::Tokens) => Some(logprobs.unwrap_or(0)),
        None => None,
    };
    parsed.echo = echo;
    Ok(parsed)
}

/// A prompt of token ids: integers from 0 to 2^32 - 1 (the engine checks them against the
/// model's vocabulary).
fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "'prompt' holds no token ids",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "prompt",
                        format!(
                            "'prompt[{i}]' must be a token id (an integer from 0), got {}",
                            describe(item)
                        ),
                    )
                })
        })
        .collect()
}

/// How many alternatives per token a request asks for, at most `max` (OpenAI's bound for the
/// endpoint).
fn top_logprobs(param: &str, n: u64, max: u64) -> Result<u32, ApiError> {
    if n > max {
        return Err(ApiError::invalid_param(
            param,
            format!("'{param}' must be from 0 to {max}, got {n}"),
        ));
    }
    Ok(n as u32)
}

/// The fields both endpoints (and the Responses dialect) share: sampling, limits, streaming
/// and the unsupported extras; `max_tokens` is the limit asked for and the field that asked.
pub(crate) fn common(
    sampling: Sampling,
    max_tokens: Option<(&'static str, u64)>,
    prompt: Prompt,
    default_max_tokens: Option<usize>,
) -> Result<Parsed, ApiError> {
    let n = match sampling.n {
        None => 1,
        Some(n @ 1..=MAX_CHOICES) => n as usize,
        Some(n) => {
            return Err(ApiError::invalid_param(
                "n",
                format!("'n' must be from 1 to {MAX_CHOICES}, got {n}"),
            ));
        }
    };
    let penalties = penalties(&sampling)?;
    let max_tokens = match max_tokens {
        Some((param, 0)) => {
            return Err(ApiError::invalid_param(
                param,
                format!("'{param}' must be at least 1, got 0"),
            ));
        }
        Some((_, n)) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        None => default_max_tokens.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
    };

    let temperature = sampling.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("'temperature' must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = sampling.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("'top_p' must be greater than 0 and at most 1, got {top_p}"),
        ));
    }
    // OpenAI takes any 64-bit signed integer; a seed is only bits, so negative ones are
    // reinterpreted rather than refused.
    let seed = sampling.seed.map(|seed| seed as u64);
    let stop = stop(sampling.stop.as_ref())?;
    let stream = sampling.stream.unwrap_or(false);
    let include_usage = sampling
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);

    Ok(Parsed {
        request: GenerationRequest {
            logprobs: None,
            embed: false,
            prompt_logprobs: None,
            constraint: None,
            tools: Vec::new(),
            share_prefill: None,
            model: sampling.model,
            prompt,
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_p: top_p as f32,
                top_k: 0,
                // Without a seed every request samples differently, as OpenAI's API does.
                seed: seed.unwrap_or_else(rand::random),
            },
            stop,
            ignore_eos: false,
            penalties,
        },
        stream,
        include_usage: stream && include_usage,
        tools: None,
        constraint_param: "response_format",
        n,
        echo: None,
    })
}

/// `presence_penalty`, `frequency_penalty` (-2 to 2) and `logit_bias` (token ids, as the
/// object's keys, to biases from -100 to 100).
fn penalties(sampling: &Sampling) -> Result<Penalties, ApiError> {
    let mut penalties = Penalties::default();
    for (name, slot, value) in [
        (
            "presence_penalty",
            &mut penalties.presence,
            sampling.presence_penalty,
        ),
        (
            "frequency_penalty",
            &mut penalties.frequency,
            sampling.frequency_penalty,
        ),
    ] {
        if let Some(value) = value {
            if !(-2.0..=2.0).contains(&value) {
                return Err(ApiError::invalid_param(
                    name,
                    format!("'{name}' must be between -2 and 2, got {value}"),
                ));
            }
            *slot = value as f32;
        }
    }
    match &sampling.logit_bias {
        None => {}
        Some(Value::Object(biases)) => {
            if biases.len() > Penalties::MAX_BIASES {
                return Err(ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "'logit_bias' may hold at most {} tokens, got {}",
                        Penalties::MAX_BIASES,
                        biases.len()
                    ),
                ));
            }
            for (token, bias) in biases {
                let id: u32 = token.parse().map_err(|_| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("'logit_bias' keys must be token ids, got '{token}'"),
                    )
                })?;
                let bias = bias.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!(
                            "'logit_bias' values must be numbers from -100 to 100, got {} for token {id}",
                            describe(bias)
                        ),
                    )
                })?;
                penalties.logit_bias.push((id, bias as f32));
            }
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!(
                    "'logit_bias' must be an object of token ids to biases, got {}",
                    describe(other)
                ),
            ));
        }
    }
    Ok(penalties)
}

/// The `messages` of a body in another dialect (Ollama's), read as chat completions reads them.
pub(crate) fn body_messages(body: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
    #[derive(serde::Deserialize)]
    struct Messages {
        messages: Vec<MessageIn>,
    }
    messages(&schema::read::<Messages>(body)?.messages)
}

fn messages(items: &[MessageIn]) -> Result<Vec<Message>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(i, item))
        .collect()
}

fn message(i: usize, item: &MessageIn) -> Result<Message, ApiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let role = match item.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        // A tool's result (see `tools::lower`).
        "tool" => "tool",
        other => {
            return Err(ApiError::invalid_param(
                at("role"),
                format!(
                    "'{}' is '{other}', which is not supported; use system, developer, user, \
                     assistant or tool",
                    at("role")
                ),
            ));
        }
    };
    let content = match &item.content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| text_part(i, j, part))
            .collect::<Result<Vec<_>, _>>()?
            .join("\n"),
        // An assistant turn that only called tools has no content; it adds nothing here.
        None if role == "assistant" => String::new(),
        None => return Err(missing(&at("content"))),
        Some(other) => {
            return Err(ApiError::invalid_param(
                at("content"),
                format!(
                    "'{}' must be a string or an array of text parts, got {}",
                    at("content"),
                    describe(other)
                ),
            ));
        }
    };
    let tool_calls = match &item.tool_calls {
        Some(calls) if role == "assistant" => tools::history_calls(&at("tool_calls"), calls)?,
        _ => Vec::new(),
    };
    let tool_call_id = item.tool_call_id.clone().filter(|_| role == "tool");
    Ok(Message {
        role: role.to_owned(),
        content,
        tool_calls,
        tool_call_id,
    })
}

fn text_part(i: usize, j: usize, part: &Value) -> Result<&str, ApiError> {
    let at = format!("messages[{i}].content[{j}]");
    let kind = part.get("type").and_then(Value::as_str);
    match (kind, part.get("text")) {
        (Some("text"), Some(Value::String(text))) => Ok(text),
        (Some("text"), _) => Err(ApiError::invalid_param(
            format!("{at}.text"),
            format!("'{at}.text' must be a string"),
        )),
        (Some(other), _) => Err(ApiError::invalid_param(
            format!("{at}.type"),
            format!("content parts of type '{other}' are not supported; only 'text' parts are"),
        )),
        (None, _) => Err(ApiError::invalid_param(
            format!("{at}.type"),
            format!("'{at}' must be an object with \"type\": \"text\" and a \"text\" string"),
        )),
    }
}

fn stop(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let strings = match value {
        None => return Ok(Vec::new()),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_STOP {
                return Err(ApiError::invalid_param(
                    "stop",
                    format!(
                        "'stop' may hold at most {MAX_STOP} strings, got {}",
                        items.len()
                    ),
                ));
            }
            items
                .iter()
                .map(|item| match item {
                    Value::String(stop) => Ok(stop.clone()),
                    other => Err(ApiError::invalid_param(
                        "stop",
                        format!("'stop' must hold strings, got {}", describe(other)),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "'stop' must be a string or an array of strings, got {}",
                    describe(other)
                ),
            ));
        }
    };
    // An empty stop string would end every generation at once; clients that send one mean
    // "no stop string".
    Ok(strings
        .into_iter()
        .filter(|stop| !stop.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;
    use serde_json::json;

    fn parse_chat(body: Value) -> Result<Parsed, ApiError> {
        match body {
            Value::Object(map) => chat(&map, None, None),
            _ => Err(ApiError::invalid("not an object")),
        }
    }

    fn error_of(body: Value) -> Value {
        match parse_chat(body) {
            Ok(parsed) => panic!("expected an error, got {parsed:?}"),
            Err(error) => error.envelope()["error"].clone(),
        }
    }

    #[test]
    fn defaults_follow_openai() {
        let parsed = parse_chat(json!({
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "user": "ignored",
        }))
        .unwrap();
        assert_eq!(parsed.request.sampling.temperature, 1.0);
        assert_eq!(parsed.request.sampling.top_p, 1.0);
        assert_eq!(parsed.request.max_tokens, None);
        assert!(!parsed.stream);
        assert_eq!(
            parsed.request.prompt,
            Prompt::Chat(vec![Message::new("system", "a\nb")])
        );
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let parsed = parse_chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5, "max_completion_tokens": 7,
        }))
        .unwrap();
        assert_eq!(parsed.request.max_tokens, Some(7));
    }

    #[test]
    fn wrong_types_are_described_in_json_terms() {
        let error = error_of(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot",
        }));
        assert_eq!(error["param"], "temperature");
        assert_eq!(
            error["message"],
            "'temperature' must be a number, got a string"
        );
    }

    #[test]
    fn negative_seeds_are_accepted_and_fractional_ones_are_not() {
        let parsed = parse_chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": -1,
        }))
        .unwrap();
        assert_eq!(parsed.request.sampling.seed, u64::MAX);
        let error = error_of(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 1.5,
        }));
        assert_eq!(error["param"], "seed");
    }

    #[test]
    fn include_usage_only_applies_to_streams() {
        let parsed = parse_chat(json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": true},
        }))
        .unwrap();
        assert!(!parsed.include_usage);
    }
}
