//! The typed shapes of the OpenAI routes' bodies, from which their part of the OpenAPI
//! document is derived (utoipa): the requests that parsing deserializes into, and the responses
//! the handlers write.
//!
//! Requests are read with serde ([`read`]), and serde's errors are rewritten in JSON's terms,
//! with the field's path as `param` ("'temperature' must be a number, got a string",
//! "'messages[2].role' must be a string, got 3"), as clients of OpenAI's API expect. Unknown
//! fields are ignored, as OpenAI ignores them, and `null` counts as absent. Fields whose JSON
//! takes several shapes (`stop`, `content`, `prompt`, `tools`, `tool_choice`,
//! `response_format`, `logit_bias`) stay JSON values, checked by the code that reads them (which
//! names the exact problem); their schemas are written out beside them.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::fields::{describe, missing};

/// The most inputs one embeddings request may hold (OpenAI's limit).
pub(crate) const MAX_INPUTS: usize = 2048;

/// Deserializes a request body (or a part of one) into `T`, with errors in JSON's terms.
pub(crate) fn read<T: DeserializeOwned>(body: &Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|error| rewrite(&error, body))
}

/// serde's error at a path, in the words the API uses: what the field must be and what it is.
fn rewrite(
    error: &serde_path_to_error::Error<serde_json::Error>,
    body: &Map<String, Value>,
) -> ApiError {
    let mut path = String::new();
    // The value at the path so far; `None` at the body itself (or past a missing field).
    let mut at: Option<&Value> = None;
    for segment in error.path().iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => {
                path.push_str(&format!("[{index}]"));
                at = at.and_then(|v| v.get(*index));
            }
            serde_path_to_error::Segment::Map { key } => {
                at = match path.is_empty() {
                    true => body.get(key),
                    false => at.and_then(|v| v.get(key)),
                };
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    let message = error.inner().to_string();
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next())
    {
        let field = match path.is_empty() {
            true => field.to_owned(),
            false => format!("{path}.{field}"),
        };
        return missing(&field);
    }
    let expected = message
        .rsplit_once(", expected ")
        .map(|(_, expected)| expected.split(" at line").next().unwrap_or(expected))
        .map(json_terms);
    match (expected, at) {
        (Some(expected), Some(value)) if !path.is_empty() => ApiError::invalid_param(
            path.clone(),
            format!("'{path}' must be {expected}, got {}", describe(value)),
        ),
        _ if path.is_empty() => ApiError::invalid(format!("the request body: {message}")),
        _ => ApiError::invalid_param(path.clone(), format!("'{path}': {message}")),
    }
}

/// A type as serde names it ("f64", "a sequence", "struct Message"), in JSON's words.
fn json_terms(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number",
        "u64" | "u32" | "u16" | "u8" | "usize" => "a non-negative integer",
        "i128" | "i64" | "i32" => "an integer",
        "a boolean" => "a boolean",
        "a string" => "a string",
        "a sequence" => "an array",
        "a map" => "an object",
        other if other.starts_with("struct ") => "an object",
        other => return other.to_owned(),
    }
    .to_owned()
}

fn stop_shape() -> Value {
    json!({
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            {"type": "null"},
        ],
        "description": "Generation stops before the first of these strings",
    })
}

fn logit_bias_shape() -> Value {
    json!({
        "type": ["object", "null"],
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        "maxProperties": 1024,
        "description": "Token ids (as keys) to biases added to their logits",
    })
}

/// The fields chat and text completions share: sampling, limits, streaming.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct Sampling {
    /// A model id from `GET /v1/models`.
    pub(crate) model: String,
    /// Answer as server-sent events.
    #[schema(default = false)]
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    /// The most tokens to generate (default: as many as fit the context, or the server's
    /// `--default-max-tokens`).
    #[schema(minimum = 1)]
    pub(crate) max_tokens: Option<u64>,
    #[schema(minimum = 0, maximum = 2, default = 1)]
    pub(crate) temperature: Option<f64>,
    #[schema(exclusive_minimum = 0, maximum = 1, default = 1)]
    pub(crate) top_p: Option<f64>,
    /// Any 64-bit integer; without one, every request samples differently.
    #[schema(value_type = Option<i64>)]
    pub(crate) seed: Option<i128>,
    #[schema(value_type = Option<Object>)]
    pub(crate) stop: Option<Value>,
    /// Choices: each is a generation of its own (seeds `seed`, `seed+1`, ...) and takes a
    /// slot of `--max-concurrent`; the prompt is computed once and shared.
    #[schema(minimum = 1, maximum = 16, default = 1)]
    pub(crate) n: Option<u64>,
    #[schema(minimum = -2, maximum = 2, default = 0)]
    pub(crate) presence_penalty: Option<f64>,
    #[schema(minimum = -2, maximum = 2, default = 0)]
    pub(crate) frequency_penalty: Option<f64>,
    #[schema(value_type = Option<Object>)]
    pub(crate) logit_bias: Option<Value>,
    /// Accepted and ignored.
    // Read only to check its type (and to document it); nothing uses it.
    #[allow(dead_code)]
    pub(crate) user: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct StreamOptions {
    /// A last chunk with empty choices carries the usage.
    pub(crate) include_usage: Option<bool>,
}

fn tools_shape() -> Value {
    json!({
        "type": ["array", "null"],
        "items": {
            "type": "object",
            "properties": {
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                        "description": {"type": "string"},
                        "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
                    },
                    "required": ["name"],
                },
            },
            "required": ["type", "function"],
        },
        "description": "Functions the model may call. A model whose chat template takes tools \
            (its tool_syntax in /v1/models) gets them through that template and its calls are \
            read in that syntax; any other model gets them in a generic prompt (Hermes format: \
            a <tools> block in the system message). Calls come back in message.tool_calls with \
            finish_reason tool_calls",
    })
}

fn tool_choice_shape() -> Value {
    json!({
        "oneOf": [
            {"enum": ["none", "auto", "required"]},
            {
                "type": "object",
                "properties": {
                    "type": {"enum": ["function"]},
                    "function": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}},
                        "required": ["name"],
                    },
                },
                "required": ["type", "function"],
            },
            {"type": "null"},
        ],
        "default": "auto",
        "description": "required and a named function constrain the output to exactly one call \
            whose arguments are valid against the tool's schema",
    })
}

fn response_format_shape() -> Value {
    json!({
        "oneOf": [
            {
                "type": "object",
                "properties": {"type": {"enum": ["text", "json_object"]}},
                "required": ["type"],
            },
            {
                "type": "object",
                "properties": {
                    "type": {"enum": ["json_schema"]},
                    "json_schema": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string"},
                            "schema": {"type": ["object", "boolean"]},
                            "strict": {"type": "boolean"},
                        },
                    },
                },
                "required": ["type", "json_schema"],
            },
            {"type": "null"},
        ],
        "description": "json_object and json_schema are enforced by constrained decoding: the \
            answer always parses, and validates against the schema when it ends with \
            finish_reason stop. A schema the engine cannot compile is a 400 naming the problem",
    })
}

fn content_shape() -> Value {
    json!({
        "oneOf": [
            {"type": "string"},
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                    "required": ["type", "text"],
                },
            },
            {"type": "null", "description": "Only for assistant messages"},
        ],
    })
}

fn prompt_shape() -> Value {
    json!({
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                "minItems": 1,
                "maxItems": 1,
            },
        ],
        "description": "One prompt: text, or token ids of the model's own vocabulary \
            (lm-evaluation-harness sends those); batches are refused",
    })
}

fn history_calls_shape() -> Value {
    json!({
        "type": ["array", "null"],
        "items": {
            "type": "object",
            "properties": {
                "id": {"type": "string"},
                "type": {"enum": ["function"]},
                "function": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "arguments": {"type": ["string", "object"], "description": "JSON text"},
                    },
                    "required": ["name"],
                },
            },
            "required": ["function"],
        },
        "description": "An assistant turn's earlier calls, handed to a chat template that \
            takes tools, or written back as <tool_call> blocks",
    })
}

/// The fields only chat completions read.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct ChatFields {
    #[schema(min_items = 1)]
    pub(crate) messages: Vec<MessageIn>,
    /// Wins over `max_tokens`.
    #[schema(minimum = 1)]
    pub(crate) max_completion_tokens: Option<u64>,
    /// Each generated token's log-probability (under the model as the penalties and biases
    /// adjust it, before temperature and any grammar) in `choices[].logprobs.content`.
    #[schema(default = false)]
    pub(crate) logprobs: Option<bool>,
    /// The likeliest alternatives per token; needs `logprobs`.
    #[schema(minimum = 0, maximum = 20)]
    pub(crate) top_logprobs: Option<u64>,
    #[schema(value_type = Option<Object>)]
    pub(crate) tools: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub(crate) tool_choice: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub(crate) response_format: Option<Value>,
}

/// One message of a chat.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[schema(as = ChatMessage)]
pub(crate) struct MessageIn {
    /// `system`, `developer` (taken as `system`), `user`, `assistant` or `tool`.
    #[schema(pattern = "^(system|developer|user|assistant|tool)$")]
    pub(crate) role: String,
    #[schema(value_type = Option<Object>)]
    pub(crate) content: Option<Value>,
    /// Accepted and ignored.
    // Read only to check its type (and to document it); nothing uses it.
    #[allow(dead_code)]
    pub(crate) name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub(crate) tool_calls: Option<Value>,
    /// A tool turn's call, for chat templates that pair results with calls.
    pub(crate) tool_call_id: Option<String>,
}

/// A `POST /v1/chat/completions` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct ChatCompletionRequest {
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    #[serde(flatten)]
    pub(crate) chat: ChatFields,
}

impl ChatCompletionRequest {
    /// Reads `body`, a part at a time, so that an error names its field's whole path (serde's
    /// `flatten` loses it).
    pub(crate) fn read(body: &Map<String, Value>) -> Result<Self, ApiError> {
        Ok(ChatCompletionRequest {
            sampling: read(body)?,
            chat: read(body)?,
        })
    }
}

/// The fields only text completions read.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct CompletionFields {
    #[schema(value_type = Option<Object>)]
    pub(crate) prompt: Option<Value>,
    /// Only 1 is supported.
    pub(crate) best_of: Option<u64>,
    /// Not supported.
    pub(crate) suffix: Option<String>,
    /// 0 to 5: each token's log-probability and that many alternatives (`tokens`,
    /// `token_logprobs`, `top_logprobs`, `text_offset`).
    #[schema(minimum = 0, maximum = 5)]
    pub(crate) logprobs: Option<u64>,
    /// The text begins with the prompt; with `logprobs`, the lists begin with the prompt's
    /// tokens, each scored under the tokens before it (the first: null).
    pub(crate) echo: Option<bool>,
    /// exo extension: parse special tokens written in the prompt (`<|im_start|>`) as the
    /// control tokens they name. By default they are plain text, so a prompt cannot forge the
    /// model's control sequences.
    #[schema(default = false)]
    pub(crate) parse_special_tokens: Option<bool>,
}

/// A `POST /v1/completions` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct CompletionRequest {
    #[serde(flatten)]
    pub(crate) sampling: Sampling,
    #[serde(flatten)]
    pub(crate) completion: CompletionFields,
}

impl CompletionRequest {
    /// Reads `body`, a part at a time (see [`ChatCompletionRequest::read`]).
    pub(crate) fn read(body: &Map<String, Value>) -> Result<Self, ApiError> {
        Ok(CompletionRequest {
            sampling: read(body)?,
            completion: read(body)?,
        })
    }
}

/// A fixed `object` name.
macro_rules! object_name {
    ($name:ident, $value:tt) => {
        #[doc = concat!("`\"", $value, "\"`.")]
        #[derive(Clone, Copy, Debug, Default, Serialize, ToSchema)]
        pub(crate) enum $name {
            #[default]
            #[serde(rename = $value)]
            Name,
        }
    };
}

object_name!(ListObject, "list");
object_name!(ModelObject, "model");
object_name!(EmbeddingObject, "embedding");
object_name!(ChatCompletionObject, "chat.completion");
object_name!(ChatCompletionChunkObject, "chat.completion.chunk");
object_name!(TextCompletionObject, "text_completion");
object_name!(AssistantRole, "assistant");
object_name!(FunctionType, "function");

/// Why a choice ended.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FinishReason {
    /// The model ended its answer, or a stop string came.
    Stop,
    /// `max_tokens`, or the context, was reached.
    Length,
    /// The answer called tools (chat).
    ToolCalls,
}

impl From<exo_core::FinishReason> for FinishReason {
    fn from(reason: exo_core::FinishReason) -> Self {
        match reason {
            exo_core::FinishReason::Stop => FinishReason::Stop,
            exo_core::FinishReason::Length => FinishReason::Length,
        }
    }
}

/// Tokens a request used.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) completion_tokens: usize,
    pub(crate) total_tokens: usize,
}

impl Usage {
    /// The prompt's tokens (once, however many choices) and every choice's.
    pub(crate) fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// A model an engine serves.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct Model {
    pub(crate) id: String,
    pub(crate) object: ModelObject,
    /// Unix seconds.
    pub(crate) created: u64,
    pub(crate) owned_by: String,
    /// Prompt plus completion tokens.
    pub(crate) context_length: usize,
    /// How the model's chat template writes tool calls (`hermes`, `llama3`, `mistral`), when it
    /// takes tools; null: tools reach it through a generic prompt.
    #[schema(required = true)]
    pub(crate) tool_syntax: Option<&'static str>,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ModelList {
    pub(crate) object: ListObject,
    pub(crate) data: Vec<Model>,
}

/// A call the answer made.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ToolCall {
    pub(crate) id: String,
    #[serde(rename = "type")]
    pub(crate) kind: FunctionType,
    pub(crate) function: FunctionCall,
    /// Its place among the answer's calls (streamed deltas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) index: Option<usize>,
}

/// The function a call names, and its arguments.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct FunctionCall {
    pub(crate) name: String,
    /// The arguments, as the text of a JSON object.
    pub(crate) arguments: String,
}

fn logprobs_shape() -> Value {
    json!({
        "type": ["object", "null"],
        "description": "With logprobs: chat's {\"content\": [{\"token\", \"logprob\", \"bytes\", \
            \"top_logprobs\"}]}, or completions' {\"tokens\", \"token_logprobs\", \
            \"top_logprobs\", \"text_offset\"}",
    })
}

/// The assistant's message in a whole answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct AssistantMessage {
    pub(crate) role: AssistantRole,
    /// The text; null when the answer is only tool calls.
    #[schema(required = true)]
    pub(crate) content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<ToolCall>>,
}

/// One choice of a whole chat answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ChatChoice {
    pub(crate) index: usize,
    pub(crate) message: AssistantMessage,
    #[schema(value_type = Option<Object>, required = true)]
    pub(crate) logprobs: Option<Value>,
    pub(crate) finish_reason: FinishReason,
}

/// A whole chat answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ChatCompletion {
    pub(crate) id: String,
    pub(crate) object: ChatCompletionObject,
    /// Unix seconds.
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) choices: Vec<ChatChoice>,
    pub(crate) usage: Usage,
}

/// What a streamed chat chunk adds to its choice.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct Delta {
    /// On a choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) role: Option<AssistantRole>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) content: Option<String>,
    /// Each call as one delta, at the end of the choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) tool_calls: Option<Vec<ToolCall>>,
}

/// One choice's part of a streamed chat chunk.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ChunkChoice {
    pub(crate) index: usize,
    pub(crate) delta: Delta,
    #[schema(value_type = Option<Object>, required = true)]
    pub(crate) logprobs: Option<Value>,
    /// On the choice's last chunk.
    #[schema(required = true)]
    pub(crate) finish_reason: Option<FinishReason>,
}

/// A streamed chat chunk (server-sent event `data`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ChatCompletionChunk {
    pub(crate) id: String,
    pub(crate) object: ChatCompletionChunkObject,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// Empty on the usage chunk.
    pub(crate) choices: Vec<ChunkChoice>,
    /// With `stream_options.include_usage` only: null on every chunk but the last, whose
    /// choices are empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub(crate) usage: Option<Option<Usage>>,
}

/// One choice of a text completion (whole or streamed).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct CompletionChoice {
    pub(crate) text: String,
    pub(crate) index: usize,
    #[schema(value_type = Option<Object>, required = true)]
    pub(crate) logprobs: Option<Value>,
    /// Null on streamed chunks but a choice's last.
    #[schema(required = true)]
    pub(crate) finish_reason: Option<FinishReason>,
}

/// A text completion, whole or one streamed chunk.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct Completion {
    pub(crate) id: String,
    pub(crate) object: TextCompletionObject,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) choices: Vec<CompletionChoice>,
    /// On a whole completion; on chunks only with `stream_options.include_usage` (null on
    /// every chunk but the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Usage>)]
    pub(crate) usage: Option<Option<Usage>>,
}

/// `POST /v1/embeddings` body.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(crate) struct EmbeddingRequest {
    /// A model id from `GET /v1/models`.
    pub(crate) model: String,
    /// Text to embed: a string or up to 2048 strings; token ids are refused (this server reads
    /// text with the model's own tokenizer).
    #[schema(value_type = Option<Object>)]
    pub(crate) input: Option<Value>,
    /// `float` (default) or `base64` (little-endian f32).
    #[schema(pattern = "^(float|base64)$")]
    pub(crate) encoding_format: Option<String>,
    /// Only the model's own width: embeddings are not shortened.
    pub(crate) dimensions: Option<u64>,
    /// Accepted and ignored.
    // Read only to check its type (and to document it); nothing uses it.
    #[allow(dead_code)]
    pub(crate) user: Option<String>,
}

fn embedding_input_shape() -> Value {
    json!({
        "oneOf": [
            {"type": "string", "minLength": 1},
            {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "maxItems": MAX_INPUTS,
            },
        ],
    })
}

fn embedding_shape() -> Value {
    json!({
        "oneOf": [
            {"type": "array", "items": {"type": "number"}},
            {"type": "string", "description": "base64 of little-endian f32"},
        ],
    })
}

/// One input's embedding.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct Embedding {
    pub(crate) object: EmbeddingObject,
    pub(crate) index: usize,
    #[schema(value_type = Object)]
    pub(crate) embedding: Value,
}

/// Tokens the inputs took.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
pub(crate) struct EmbeddingUsage {
    pub(crate) prompt_tokens: u64,
    pub(crate) total_tokens: u64,
}

/// `POST /v1/embeddings` answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct EmbeddingList {
    pub(crate) object: ListObject,
    pub(crate) data: Vec<Embedding>,
    pub(crate) model: String,
    pub(crate) usage: EmbeddingUsage,
}

/// The fields that take several shapes, by schema and property: their schemas, written out
/// (utoipa's types cannot hold every keyword of them).
fn shapes() -> [(&'static str, &'static str, Value); 11] {
    [
        ("Sampling", "stop", stop_shape()),
        ("Sampling", "logit_bias", logit_bias_shape()),
        ("ChatFields", "tools", tools_shape()),
        ("ChatFields", "tool_choice", tool_choice_shape()),
        ("ChatFields", "response_format", response_format_shape()),
        ("ChatMessage", "content", content_shape()),
        ("ChatMessage", "tool_calls", history_calls_shape()),
        ("CompletionFields", "prompt", prompt_shape()),
        ("EmbeddingRequest", "input", embedding_input_shape()),
        ("Embedding", "embedding", embedding_shape()),
        ("ChatChoice", "logprobs", logprobs_shape()),
    ]
}

/// `GET /healthz`: the API answers.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[schema(as = Health)]
pub(crate) struct HealthBody {
    #[schema(pattern = "^ok$")]
    pub(crate) status: &'static str,
}

/// Whether the engine can serve now.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReadinessStatus {
    Ready,
    NotReady,
}

/// `GET /readyz`: 200 and `ready`, or 503, `not_ready` and why.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = Readiness)]
pub(crate) struct ReadinessBody {
    pub(crate) status: ReadinessStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// The schemas the typed bodies derive, with those they refer to, by name, as JSON: the
/// fields that take several shapes get their written schemas (and the logprobs of every
/// choice the same).
pub(crate) fn components() -> Result<Vec<(String, Value)>, String> {
    use utoipa::PartialSchema;
    let mut derived = Vec::new();
    macro_rules! add {
        ($($t:ty),* $(,)?) => {
            $(
                derived.push((<$t as ToSchema>::name().into_owned(), <$t as PartialSchema>::schema()));
                <$t as ToSchema>::schemas(&mut derived);
            )*
        };
    }
    add!(
        ChatCompletionRequest,
        CompletionRequest,
        ChatCompletion,
        ChatCompletionChunk,
        Completion,
        ModelList,
        EmbeddingRequest,
        EmbeddingList,
        crate::error::ErrorResponse,
        anthropic::AnthropicRequest,
        anthropic::AnthropicMessage,
        anthropic::AnthropicEvent,
        anthropic::AnthropicError,
        responses::ResponsesRequest,
        responses::ResponseObject,
        responses::ResponseEvent,
        ollama::OllamaChatRequest,
        ollama::OllamaGenerateRequest,
        ollama::OllamaChatLine,
        ollama::OllamaGenerateLine,
        ollama::OllamaModels,
        ollama::OllamaShowRequest,
        ollama::OllamaShowResponse,
        ollama::OllamaVersion,
        ollama::OllamaEmbedRequest,
        ollama::OllamaEmbedResponse,
        ollama::OllamaEmbeddingsRequest,
        ollama::OllamaEmbeddingsResponse,
        crate::error::OllamaErrorBody,
        crate::cluster::ClusterView,
        HealthBody,
        ReadinessBody,
    );
    let mut schemas = serde_json::Map::new();
    for (name, schema) in derived {
        let json = serde_json::to_value(schema).map_err(|e| format!("{name}: {e}"))?;
        schemas.insert(name, json);
    }
    let mut shapes = shapes().to_vec();
    shapes.extend(anthropic::shapes());
    shapes.extend(responses::shapes());
    shapes.extend(ollama::shapes());
    for other in ["ChunkChoice", "CompletionChoice"] {
        shapes.push((other, "logprobs", logprobs_shape()));
    }
    for (name, property, shape) in shapes {
        let slot = schemas
            .get_mut(name)
            .and_then(|s| s.get_mut("properties"))
            .and_then(|p| p.get_mut(property))
            .ok_or_else(|| format!("no property {property} in schema {name}"))?;
        *slot = shape;
    }
    Ok(schemas.into_iter().collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_written_shape_replaces_a_derived_property() {
        let schemas: serde_json::Map<String, Value> = components().unwrap().into_iter().collect();
        let all = shapes()
            .into_iter()
            .chain(anthropic::shapes())
            .chain(responses::shapes())
            .chain(ollama::shapes());
        for (name, property, shape) in all {
            assert_eq!(
                schemas[name]["properties"][property], shape,
                "{name}.{property}"
            );
        }
        assert_eq!(
            schemas["ModelObject"]["enum"],
            json!(["model"]),
            "object names are their serde names"
        );
    }
}

/// Anthropic's Messages dialect (`POST /v1/messages`).
pub(crate) mod anthropic {
    use super::*;

    fn system_shape() -> Value {
        json!({
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {
                    "type": "object",
                    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                    "required": ["type", "text"],
                }},
                {"type": "null"},
            ],
        })
    }

    fn content_shape() -> Value {
        json!({
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"oneOf": [
                    {
                        "type": "object",
                        "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
                        "required": ["type", "text"],
                    },
                    {
                        "type": "object",
                        "description": "In an assistant message: a call it made",
                        "properties": {
                            "type": {"enum": ["tool_use"]},
                            "id": {"type": "string"},
                            "name": {"type": "string"},
                            "input": {"type": "object"},
                        },
                        "required": ["type", "name"],
                    },
                    {
                        "type": "object",
                        "description": "In a user message: a call's result",
                        "properties": {
                            "type": {"enum": ["tool_result"]},
                            "tool_use_id": {"type": "string"},
                            "content": {"type": ["string", "array", "null"]},
                        },
                        "required": ["type"],
                    },
                ]}},
            ],
        })
    }

    fn tools_shape() -> Value {
        json!({
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "description": {"type": "string"},
                    "input_schema": {"type": "object", "description": "JSON Schema of the input"},
                    "type": {"enum": ["custom"], "description": "Server tools are refused"},
                },
                "required": ["name"],
            },
            "description": "Tools through the same module as chat completions': the model's own \
                chat template when it takes tools, the generic Hermes prompt otherwise",
        })
    }

    fn tool_choice_shape() -> Value {
        json!({
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"type": {"enum": ["auto", "any", "none"]}},
                    "required": ["type"],
                },
                {
                    "type": "object",
                    "properties": {"type": {"enum": ["tool"]}, "name": {"type": "string"}},
                    "required": ["type", "name"],
                },
                {"type": "null"},
            ],
            "description": "any and a named tool constrain the answer to one call",
        })
    }

    fn stop_sequences_shape() -> Value {
        json!({"type": ["array", "null"], "items": {"type": "string"}})
    }

    /// The fields whose schemas are written out.
    pub(crate) fn shapes() -> [(&'static str, &'static str, Value); 5] {
        [
            ("AnthropicRequest", "system", system_shape()),
            ("AnthropicRequest", "tools", tools_shape()),
            ("AnthropicRequest", "tool_choice", tool_choice_shape()),
            ("AnthropicRequest", "stop_sequences", stop_sequences_shape()),
            ("AnthropicMessageIn", "content", content_shape()),
        ]
    }

    /// A `POST /v1/messages` body.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct AnthropicRequest {
        /// A model id from `GET /v1/models`.
        pub(crate) model: String,
        /// The most tokens to generate.
        #[schema(minimum = 1)]
        pub(crate) max_tokens: Option<u64>,
        #[schema(min_items = 1)]
        pub(crate) messages: Option<Vec<AnthropicMessageIn>>,
        #[schema(value_type = Option<Object>)]
        pub(crate) system: Option<Value>,
        #[schema(minimum = 0, maximum = 1, default = 1)]
        pub(crate) temperature: Option<f64>,
        #[schema(exclusive_minimum = 0, maximum = 1, default = 1)]
        pub(crate) top_p: Option<f64>,
        pub(crate) top_k: Option<u64>,
        #[schema(value_type = Option<Object>)]
        pub(crate) stop_sequences: Option<Value>,
        /// Answer as Anthropic's named server-sent events.
        #[schema(default = false)]
        pub(crate) stream: Option<bool>,
        #[schema(value_type = Option<Object>)]
        pub(crate) tools: Option<Value>,
        #[schema(value_type = Option<Object>)]
        pub(crate) tool_choice: Option<Value>,
    }

    /// One message of the conversation.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct AnthropicMessageIn {
        /// `user` or `assistant`.
        #[schema(pattern = "^(user|assistant)$")]
        pub(crate) role: String,
        #[schema(value_type = Object)]
        pub(crate) content: Value,
    }

    object_name!(MessageType, "message");

    /// Why an answer ended.
    #[derive(Clone, Copy, Debug, Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub(crate) enum StopReason {
        EndTurn,
        MaxTokens,
        ToolUse,
    }

    /// A block of an answer's content.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(crate) enum ContentBlock {
        Text {
            text: String,
        },
        ToolUse {
            id: String,
            name: String,
            /// The call's arguments.
            #[schema(value_type = Object)]
            input: Value,
        },
    }

    /// Tokens an answer took.
    #[derive(Clone, Copy, Debug, Serialize, ToSchema)]
    pub(crate) struct AnthropicUsage {
        pub(crate) input_tokens: usize,
        pub(crate) output_tokens: usize,
    }

    /// The answer: a message.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct AnthropicMessage {
        pub(crate) id: String,
        #[serde(rename = "type")]
        pub(crate) kind: MessageType,
        pub(crate) role: AssistantRole,
        pub(crate) model: String,
        pub(crate) content: Vec<ContentBlock>,
        /// Null while streaming.
        #[schema(required = true)]
        pub(crate) stop_reason: Option<StopReason>,
        /// Always null: a stop sequence is reported as `end_turn`.
        #[schema(required = true)]
        pub(crate) stop_sequence: Option<String>,
        pub(crate) usage: AnthropicUsage,
    }

    /// What a `content_block_delta` adds.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(crate) enum BlockDelta {
        TextDelta { text: String },
        InputJsonDelta { partial_json: String },
    }

    /// The end of a streamed message.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct MessageDelta {
        pub(crate) stop_reason: StopReason,
        #[schema(required = true)]
        pub(crate) stop_sequence: Option<String>,
    }

    /// The streamed answer: each event's `data` (its SSE name is its `type`).
    #[derive(Clone, Debug, Serialize, ToSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(crate) enum AnthropicEvent {
        MessageStart {
            message: AnthropicMessage,
        },
        ContentBlockStart {
            index: usize,
            content_block: ContentBlock,
        },
        ContentBlockDelta {
            index: usize,
            delta: BlockDelta,
        },
        ContentBlockStop {
            index: usize,
        },
        MessageDelta {
            delta: MessageDelta,
            usage: AnthropicUsage,
        },
        MessageStop,
    }

    impl AnthropicEvent {
        /// The event's SSE name: its `type`.
        pub(crate) fn name(&self) -> &'static str {
            match self {
                AnthropicEvent::MessageStart { .. } => "message_start",
                AnthropicEvent::ContentBlockStart { .. } => "content_block_start",
                AnthropicEvent::ContentBlockDelta { .. } => "content_block_delta",
                AnthropicEvent::ContentBlockStop { .. } => "content_block_stop",
                AnthropicEvent::MessageDelta { .. } => "message_delta",
                AnthropicEvent::MessageStop => "message_stop",
            }
        }
    }

    /// Anthropic's error body.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct AnthropicError {
        #[serde(rename = "type")]
        #[schema(pattern = "^error$")]
        pub(crate) kind: &'static str,
        pub(crate) error: AnthropicErrorBody,
    }

    /// What went wrong, in Anthropic's terms.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct AnthropicErrorBody {
        /// `invalid_request_error`, `authentication_error`, `not_found_error`,
        /// `rate_limit_error`, `api_error`, `overloaded_error`, ...
        #[serde(rename = "type")]
        pub(crate) kind: &'static str,
        pub(crate) message: String,
    }
}

/// OpenAI's Responses dialect (`POST /v1/responses`).
pub(crate) mod responses {
    use super::*;

    fn input_shape() -> Value {
        json!({
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"oneOf": [
                    {
                        "type": "object",
                        "description": "A message (type message, or no type)",
                        "properties": {
                            "type": {"enum": ["message"]},
                            "role": {"enum": ["user", "assistant", "system", "developer"]},
                            "content": {"oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {
                                    "type": "object",
                                    "properties": {
                                        "type": {"enum": ["input_text", "output_text", "text"]},
                                        "text": {"type": "string"},
                                    },
                                    "required": ["type", "text"],
                                }},
                            ]},
                        },
                        "required": ["role", "content"],
                    },
                    {
                        "type": "object",
                        "description": "A call the model made earlier",
                        "properties": {
                            "type": {"enum": ["function_call"]},
                            "call_id": {"type": "string"},
                            "name": {"type": "string"},
                            "arguments": {"type": "string"},
                        },
                        "required": ["type", "name"],
                    },
                    {
                        "type": "object",
                        "description": "A call's result",
                        "properties": {
                            "type": {"enum": ["function_call_output"]},
                            "call_id": {"type": "string"},
                            "output": {"type": "string"},
                        },
                        "required": ["type"],
                    },
                ]}},
            ],
        })
    }

    fn tools_shape() -> Value {
        json!({
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["function"]},
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "description": {"type": "string"},
                    "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
                    "strict": {"type": "boolean"},
                },
                "required": ["type", "name"],
            },
        })
    }

    fn tool_choice_shape() -> Value {
        json!({
            "oneOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "properties": {"type": {"enum": ["function"]}, "name": {"type": "string"}},
                    "required": ["type", "name"],
                },
                {"type": "null"},
            ],
            "description": "required and a named function constrain the answer to one call",
        })
    }

    fn text_shape() -> Value {
        json!({
            "type": ["object", "null"],
            "properties": {"format": {"oneOf": [
                {
                    "type": "object",
                    "properties": {"type": {"enum": ["text", "json_object"]}},
                    "required": ["type"],
                },
                {
                    "type": "object",
                    "properties": {
                        "type": {"enum": ["json_schema"]},
                        "name": {"type": "string"},
                        "schema": {"type": ["object", "boolean"]},
                        "strict": {"type": "boolean"},
                    },
                    "required": ["type", "schema"],
                },
            ]}},
            "description": "json_object and json_schema are enforced by constrained decoding",
        })
    }

    /// The fields whose schemas are written out.
    pub(crate) fn shapes() -> [(&'static str, &'static str, Value); 4] {
        [
            ("ResponsesRequest", "input", input_shape()),
            ("ResponsesRequest", "tools", tools_shape()),
            ("ResponsesRequest", "tool_choice", tool_choice_shape()),
            ("ResponsesRequest", "text", text_shape()),
        ]
    }

    /// A `POST /v1/responses` body.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct ResponsesRequest {
        /// A model id from `GET /v1/models`.
        pub(crate) model: String,
        #[schema(value_type = Option<Object>)]
        pub(crate) input: Option<Value>,
        /// The system turn.
        pub(crate) instructions: Option<String>,
        #[schema(value_type = Option<Object>)]
        pub(crate) tools: Option<Value>,
        #[schema(value_type = Option<Object>)]
        pub(crate) tool_choice: Option<Value>,
        #[schema(value_type = Option<Object>)]
        pub(crate) text: Option<Value>,
        #[schema(minimum = 1)]
        pub(crate) max_output_tokens: Option<u64>,
        #[schema(minimum = 0, maximum = 2, default = 1)]
        pub(crate) temperature: Option<f64>,
        #[schema(exclusive_minimum = 0, maximum = 1, default = 1)]
        pub(crate) top_p: Option<f64>,
        #[schema(value_type = Option<i64>)]
        pub(crate) seed: Option<i128>,
        /// Answer as typed server-sent events.
        #[schema(default = false)]
        pub(crate) stream: Option<bool>,
        /// Refused: nothing is stored, so send the whole conversation in `input`.
        pub(crate) previous_response_id: Option<String>,
        /// Echoed.
        // Type-checked here; the response echoes the body's own value.
        #[allow(dead_code)]
        pub(crate) parallel_tool_calls: Option<bool>,
        /// Echoed.
        #[schema(value_type = Option<Object>)]
        #[allow(dead_code)]
        pub(crate) metadata: Option<Value>,
    }

    object_name!(ResponseObjectName, "response");
    object_name!(OutputTextType, "output_text");

    /// Where a response stands.
    #[derive(Clone, Copy, Debug, Serialize, ToSchema)]
    #[serde(rename_all = "snake_case")]
    pub(crate) enum ResponseStatus {
        InProgress,
        Completed,
        Incomplete,
    }

    /// Why a response is incomplete.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct IncompleteDetails {
        /// `max_output_tokens`.
        pub(crate) reason: &'static str,
    }

    /// Text of a message item.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OutputText {
        #[serde(rename = "type")]
        pub(crate) kind: OutputTextType,
        pub(crate) text: String,
        /// Always empty.
        #[schema(value_type = Vec<Object>)]
        pub(crate) annotations: Vec<Value>,
    }

    /// An item of a response's output.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    #[serde(tag = "type", rename_all = "snake_case")]
    pub(crate) enum OutputItem {
        Message {
            id: String,
            status: ResponseStatus,
            role: AssistantRole,
            content: Vec<OutputText>,
        },
        FunctionCall {
            id: String,
            call_id: String,
            name: String,
            /// The arguments, as the text of a JSON object.
            arguments: String,
            status: ResponseStatus,
        },
    }

    /// Token counts.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct ResponseUsage {
        pub(crate) input_tokens: usize,
        #[schema(value_type = Object)]
        pub(crate) input_tokens_details: Value,
        pub(crate) output_tokens: usize,
        #[schema(value_type = Object)]
        pub(crate) output_tokens_details: Value,
        pub(crate) total_tokens: usize,
    }

    /// The settings a response echoes from its request.
    #[derive(Clone, Debug, Default, Serialize, ToSchema)]
    pub(crate) struct Echo {
        #[schema(value_type = Option<String>, required = true)]
        pub(crate) instructions: Value,
        #[schema(value_type = Option<u64>, required = true)]
        pub(crate) max_output_tokens: Value,
        #[schema(value_type = f64)]
        pub(crate) temperature: Value,
        #[schema(value_type = f64)]
        pub(crate) top_p: Value,
        #[schema(value_type = Vec<Object>)]
        pub(crate) tools: Value,
        /// `auto`, `none`, `required`, or a named function.
        #[schema(value_type = Value)]
        pub(crate) tool_choice: Value,
        #[schema(value_type = Object)]
        pub(crate) text: Value,
        #[schema(value_type = bool)]
        pub(crate) parallel_tool_calls: Value,
        #[schema(value_type = Object)]
        pub(crate) metadata: Value,
    }

    /// A response: in progress, or done with its output.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct ResponseObject {
        pub(crate) id: String,
        pub(crate) object: ResponseObjectName,
        /// Unix seconds.
        pub(crate) created_at: u64,
        pub(crate) status: ResponseStatus,
        /// Always null (a failure is an error answer).
        #[schema(value_type = Option<Object>, required = true)]
        pub(crate) error: Option<Value>,
        #[schema(required = true)]
        pub(crate) incomplete_details: Option<IncompleteDetails>,
        pub(crate) model: String,
        pub(crate) output: Vec<OutputItem>,
        #[schema(required = true)]
        pub(crate) usage: Option<ResponseUsage>,
        #[serde(flatten)]
        pub(crate) echo: Echo,
    }

    /// A streamed event's data (its SSE name is its `type`), numbered in order.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    #[serde(tag = "type")]
    pub(crate) enum ResponseEvent {
        #[serde(rename = "response.created")]
        Created {
            response: ResponseObject,
            sequence_number: u64,
        },
        #[serde(rename = "response.in_progress")]
        InProgress {
            response: ResponseObject,
            sequence_number: u64,
        },
        #[serde(rename = "response.output_item.added")]
        OutputItemAdded {
            output_index: usize,
            item: OutputItem,
            sequence_number: u64,
        },
        #[serde(rename = "response.content_part.added")]
        ContentPartAdded {
            item_id: String,
            output_index: usize,
            content_index: usize,
            part: OutputText,
            sequence_number: u64,
        },
        #[serde(rename = "response.output_text.delta")]
        OutputTextDelta {
            item_id: String,
            output_index: usize,
            content_index: usize,
            delta: String,
            sequence_number: u64,
        },
        #[serde(rename = "response.output_text.done")]
        OutputTextDone {
            item_id: String,
            output_index: usize,
            content_index: usize,
            text: String,
            sequence_number: u64,
        },
        #[serde(rename = "response.content_part.done")]
        ContentPartDone {
            item_id: String,
            output_index: usize,
            content_index: usize,
            part: OutputText,
            sequence_number: u64,
        },
        #[serde(rename = "response.output_item.done")]
        OutputItemDone {
            output_index: usize,
            item: OutputItem,
            sequence_number: u64,
        },
        #[serde(rename = "response.function_call_arguments.delta")]
        FunctionCallArgumentsDelta {
            item_id: String,
            output_index: usize,
            delta: String,
            sequence_number: u64,
        },
        #[serde(rename = "response.function_call_arguments.done")]
        FunctionCallArgumentsDone {
            item_id: String,
            output_index: usize,
            arguments: String,
            sequence_number: u64,
        },
        #[serde(rename = "response.completed")]
        Completed {
            response: ResponseObject,
            sequence_number: u64,
        },
        #[serde(rename = "response.incomplete")]
        Incomplete {
            response: ResponseObject,
            sequence_number: u64,
        },
        #[serde(rename = "error")]
        Error {
            #[schema(required = true)]
            code: Option<String>,
            message: String,
            #[schema(required = true)]
            param: Option<String>,
            sequence_number: u64,
        },
    }
}

/// Ollama's dialect (`/api/*`).
pub(crate) mod ollama {
    use super::*;

    fn messages_shape() -> Value {
        json!({
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "role": {"enum": ["system", "user", "assistant", "tool"]},
                    "content": {"type": "string"},
                    "tool_calls": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"function": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
                            "required": ["name"],
                        }},
                        "required": ["function"],
                    }},
                    "images": {"type": "array", "maxItems": 0, "description": "Refused"},
                },
                "required": ["role"],
            },
            "description": "The conversation; none (or none at all) asks for the model to be loaded",
        })
    }

    fn format_shape() -> Value {
        json!({
            "oneOf": [
                {"enum": ["json", ""]},
                {"type": "object", "description": "A JSON schema the answer follows"},
                {"type": "null"},
            ],
            "description": "Enforced by constrained decoding",
        })
    }

    fn tools_shape() -> Value {
        json!({
            "type": ["array", "null"],
            "items": {
                "type": "object",
                "properties": {
                    "type": {"enum": ["function"]},
                    "function": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                            "description": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                        "required": ["name"],
                    },
                },
                "required": ["type", "function"],
            },
            "description": "OpenAI's tool shape; the model decides whether to call",
        })
    }

    fn input_shape() -> Value {
        json!({
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ],
        })
    }

    fn stop_shape() -> Value {
        json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, {"type": "null"}]})
    }

    /// The fields whose schemas are written out.
    pub(crate) fn shapes() -> [(&'static str, &'static str, Value); 9] {
        [
            ("OllamaChatRequest", "messages", messages_shape()),
            ("OllamaChatRequest", "format", format_shape()),
            ("OllamaChatRequest", "tools", tools_shape()),
            ("OllamaGenerateRequest", "format", format_shape()),
            ("OllamaOptions", "stop", stop_shape()),
            ("OllamaEmbedRequest", "input", input_shape()),
            ("OllamaEmbeddingsRequest", "prompt", input_shape()),
            (
                "OllamaToolCall",
                "function",
                json!({
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "arguments": {"type": "object"}},
                    "required": ["name", "arguments"],
                }),
            ),
            (
                "OllamaShowResponse",
                "model_info",
                json!({"type": "object"}),
            ),
        ]
    }

    /// `options`: the sampling settings the engine honours; others (`num_ctx`,
    /// `repeat_penalty`, ...) are accepted and ignored.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaOptions {
        #[schema(minimum = 0, default = 0.8)]
        pub(crate) temperature: Option<f64>,
        #[schema(exclusive_minimum = 0, maximum = 1, default = 0.9)]
        pub(crate) top_p: Option<f64>,
        #[schema(default = 40)]
        pub(crate) top_k: Option<u64>,
        /// -1 (or none): a random seed.
        #[schema(value_type = Option<i64>)]
        pub(crate) seed: Option<Value>,
        /// The most tokens to generate; -1 or -2: as many as fit the context.
        #[schema(value_type = Option<i64>)]
        pub(crate) num_predict: Option<Value>,
        #[schema(value_type = Option<Object>)]
        pub(crate) stop: Option<Value>,
    }

    /// `POST /api/chat`.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaChatRequest {
        pub(crate) model: String,
        /// Read from the body as chat completions' messages (`request::body_messages`), so
        /// only skipped here.
        #[schema(value_type = Option<Object>)]
        #[allow(dead_code)]
        pub(crate) messages: Option<serde::de::IgnoredAny>,
        #[schema(value_type = Option<Object>)]
        pub(crate) tools: Option<Value>,
        #[schema(value_type = Option<Object>)]
        pub(crate) format: Option<Value>,
        pub(crate) options: Option<OllamaOptions>,
        /// NDJSON lines unless `false`.
        #[schema(default = true)]
        pub(crate) stream: Option<bool>,
    }

    /// `POST /api/generate`.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaGenerateRequest {
        pub(crate) model: String,
        /// The user's turn of the model's chat template (or, with `raw`, the whole prompt); empty
        /// asks for the model to be loaded.
        pub(crate) prompt: Option<String>,
        pub(crate) system: Option<String>,
        /// The prompt is written in the model's own format, control tokens included.
        pub(crate) raw: Option<bool>,
        #[schema(value_type = Option<Object>)]
        pub(crate) format: Option<Value>,
        pub(crate) options: Option<OllamaOptions>,
        #[schema(default = true)]
        pub(crate) stream: Option<bool>,
        /// Refused when not empty.
        #[schema(value_type = Option<Vec<String>>)]
        pub(crate) images: Option<Value>,
        /// Refused when not empty: send the conversation to `/api/chat`.
        #[schema(value_type = Option<Vec<u64>>)]
        pub(crate) context: Option<Value>,
        /// Refused when not empty.
        pub(crate) suffix: Option<String>,
        /// Refused when not empty.
        pub(crate) template: Option<String>,
    }

    /// `POST /api/show` (`name` is older clients' `model`).
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaShowRequest {
        pub(crate) model: Option<String>,
        pub(crate) name: Option<String>,
    }

    /// `POST /api/embed`.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaEmbedRequest {
        pub(crate) model: String,
        #[schema(value_type = Option<Object>)]
        pub(crate) input: Option<Value>,
    }

    /// `POST /api/embeddings`, the older form.
    #[derive(Debug, Default, Deserialize, ToSchema)]
    pub(crate) struct OllamaEmbeddingsRequest {
        pub(crate) model: String,
        #[schema(value_type = Option<Object>)]
        pub(crate) prompt: Option<Value>,
    }

    /// A call the answer made.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaToolCall {
        /// `name`, and `arguments` as an object.
        #[schema(value_type = Object)]
        pub(crate) function: Value,
    }

    /// The assistant's message (a piece of it, streamed).
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaMessage {
        pub(crate) role: AssistantRole,
        pub(crate) content: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) tool_calls: Option<Vec<OllamaToolCall>>,
    }

    /// What the last line adds: why it ended, counts, and durations in nanoseconds (absent
    /// from the other lines).
    #[derive(Clone, Debug, Default, Serialize, ToSchema)]
    pub(crate) struct OllamaDone {
        /// `stop`, `length`, or `load` (a request with nothing to generate).
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) done_reason: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) total_duration: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) load_duration: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) prompt_eval_count: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) prompt_eval_duration: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) eval_count: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) eval_duration: Option<u64>,
    }

    /// A line of `/api/chat`'s answer (NDJSON), or the whole answer.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaChatLine {
        pub(crate) model: String,
        /// RFC 3339.
        pub(crate) created_at: String,
        pub(crate) message: OllamaMessage,
        pub(crate) done: bool,
        #[serde(flatten)]
        pub(crate) end: OllamaDone,
    }

    /// A line of `/api/generate`'s answer (NDJSON), or the whole answer.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaGenerateLine {
        pub(crate) model: String,
        /// RFC 3339.
        pub(crate) created_at: String,
        pub(crate) response: String,
        pub(crate) done: bool,
        #[serde(flatten)]
        pub(crate) end: OllamaDone,
    }

    /// Guessed from the model's id: the API knows no model files.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaDetails {
        pub(crate) parent_model: String,
        pub(crate) format: String,
        pub(crate) family: String,
        pub(crate) families: Vec<String>,
        pub(crate) parameter_size: String,
        pub(crate) quantization_level: String,
    }

    /// A model served.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaModel {
        pub(crate) name: String,
        pub(crate) model: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) modified_at: Option<String>,
        pub(crate) size: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) size_vram: Option<u64>,
        pub(crate) digest: String,
        pub(crate) details: OllamaDetails,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub(crate) context_length: Option<usize>,
    }

    /// `GET /api/tags` and `GET /api/ps`.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaModels {
        pub(crate) models: Vec<OllamaModel>,
    }

    /// `POST /api/show`.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaShowResponse {
        pub(crate) modelfile: String,
        pub(crate) parameters: String,
        pub(crate) template: String,
        pub(crate) details: OllamaDetails,
        #[schema(value_type = Object)]
        pub(crate) model_info: Value,
        /// `completion` and `tools`.
        pub(crate) capabilities: Vec<&'static str>,
        pub(crate) modified_at: String,
    }

    /// `GET /api/version`.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaVersion {
        pub(crate) version: &'static str,
    }

    /// `POST /api/embed`.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaEmbedResponse {
        pub(crate) model: String,
        pub(crate) embeddings: Vec<Vec<f32>>,
        pub(crate) total_duration: u64,
        pub(crate) load_duration: u64,
        pub(crate) prompt_eval_count: u64,
    }

    /// `POST /api/embeddings`.
    #[derive(Clone, Debug, Serialize, ToSchema)]
    pub(crate) struct OllamaEmbeddingsResponse {
        pub(crate) embedding: Vec<f32>,
    }
}
