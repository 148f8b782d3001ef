//! Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, `/api/show`, `/api/ps`,
//! `/api/version`), so that Open WebUI, desktop tools and the `ollama` client libraries can
//! talk to the cluster natively.
//!
//! A thin mapping over the same [`Engine`](crate::Engine), admission queue and
//! [`Running`] generation as OpenAI's routes: only the wire shapes differ. Requests are read
//! in Ollama's terms (`options.num_predict`, `stream` on by default), answers are NDJSON lines
//! (`application/x-ndjson`) or one JSON object, durations are nanoseconds, and errors are
//! `{"error": "<message>"}` with the status OpenAI's routes would give.

use std::collections::VecDeque;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use exo_core::{
    ChatMessage, FinishReason, Finished, GenerationRequest, OutputConstraint, Prompt,
    SamplingParams,
};

use crate::engine::ModelCard;
use crate::error::ApiError;
use crate::fields::{describe, missing};
use crate::generate::{Params, Running, Step, counts};
use crate::middleware::RequestLog;
use crate::request::{JsonObject, body_messages};
use crate::schema::ollama::{
    OllamaChatLine, OllamaChatRequest, OllamaDetails, OllamaDone, OllamaGenerateLine,
    OllamaGenerateRequest, OllamaMessage, OllamaModel, OllamaModels, OllamaOptions,
    OllamaShowRequest, OllamaShowResponse, OllamaToolCall, OllamaVersion,
};
use crate::schema::{self};
use crate::state::AppState;
use crate::tools::{self, Call, Held, ToolUse};

/// The content type of Ollama's streamed answers: one JSON object per line.
const NDJSON: &str = "application/x-ndjson";

/// Ollama's documented sampling defaults, used when a request leaves them out (Ollama takes
/// them from the model's Modelfile, which is usually these).
const DEFAULT_TEMPERATURE: f64 = 0.8;
const DEFAULT_TOP_P: f64 = 0.9;
const DEFAULT_TOP_K: u64 = 40;

/// An error answered in Ollama's shape.
#[derive(Debug)]
pub(crate) struct OllamaError(ApiError);

impl From<ApiError> for OllamaError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl IntoResponse for OllamaError {
    fn into_response(self) -> Response {
        self.0.into_ollama_response()
    }
}

/// `POST /api/chat`.
pub(crate) async fn chat(
    State(state): State<AppState>,
    log: RequestLog,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let JsonObject(body) = body?;
    let typed: OllamaChatRequest = schema::read(&body)?;
    let model = typed.model;
    let Some(mut parsed) = parse_chat(&body)? else {
        return load(&state, Dialect::Chat, &model);
    };
    // Ollama's `tools` are OpenAI's; it has no `tool_choice` (the model decides).
    let mut tools = tools::parse(typed.tools.as_ref(), None)?;
    let resolved = resolve(&state, &model);
    let specs = tools::lower(
        state.tool_syntax(Some(&resolved)),
        &mut parsed,
        tools.as_mut(),
    );
    let options = options(typed.options, typed.stream, state.config.default_max_tokens)?;
    let mut request = options.request(resolved, Prompt::Chat(parsed));
    request.tools = specs;
    request.constraint = format(typed.format.as_ref())?;
    run(
        &state,
        Dialect::Chat,
        model,
        request,
        options.stream,
        started,
        log,
        tools,
    )
    .await
}

/// `POST /api/generate`.
pub(crate) async fn generate(
    State(state): State<AppState>,
    log: RequestLog,
    body: Result<JsonObject, ApiError>,
) -> Result<Response, OllamaError> {
    let started = Instant::now();
    let JsonObject(body) = body?;
    let typed: OllamaGenerateRequest = schema::read(&body)?;
    let model = typed.model;
    let prompt = typed.prompt.unwrap_or_default();
    for (unsupported, value) in [("suffix", &typed.suffix), ("template", &typed.template)] {
        if value.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid_param(
                unsupported,
                format!("'{unsupported}' is not supported"),
            )
            .into());
        }
    }
    refuse_non_empty("images", typed.images.as_ref(), "images are not supported")?;
    refuse_non_empty(
        "context",
        typed.context.as_ref(),
        "'context' (token ids of an earlier answer) is not supported; send the conversation \
         to /api/chat instead",
    )?;
    let constraint = format(typed.format.as_ref())?;
    // An empty prompt is how Ollama's clients ask for the model to be loaded.
    if prompt.is_empty() {
        return load(&state, Dialect::Generate, &model);
    }
    let prompt = if typed.raw == Some(true) {
        // The caller wrote the model's own format, control tokens included.
        Prompt::Raw(prompt)
    } else {
        // Like Ollama, the prompt is the user's turn of the model's chat template.
        let mut turns = Vec::with_capacity(2);
        if let Some(system) = typed.system.filter(|s| !s.is_empty()) {
            turns.push(ChatMessage::new("system", system));
        }
        turns.push(ChatMessage::new("user", prompt));
        Prompt::Chat(turns)
    };
    let options = options(typed.options, typed.stream, state.config.default_max_tokens)?;
    let mut request = options.request(resolve(&state, &model), prompt);
    request.constraint = constraint;
    run(
        &state,
        Dialect::Generate,
        model,
        request,
        options.stream,
        started,
        log,
        None,
    )
    .await
}

/// `GET /api/tags`: the models the engine serves.
pub(crate) async fn tags(State(state): State<AppState>) -> Json<OllamaModels> {
    let models = state
        .engine
        .models()
        .iter()
        .map(|card| OllamaModel {
            name: card.id.clone(),
            model: card.id.clone(),
            modified_at: Some(rfc3339(card.created, 0)),
            size: 0,
            size_vram: None,
            digest: digest(&card.id),
            details: details(&card.id),
            context_length: None,
        })
        .collect();
    Json(OllamaModels { models })
}

/// `GET /api/ps`: the models loaded now, which for a cluster are the ones it serves.
pub(crate) async fn ps(State(state): State<AppState>) -> Json<OllamaModels> {
    let models = state
        .engine
        .models()
        .iter()
        .map(|card| OllamaModel {
            name: card.id.clone(),
            model: card.id.clone(),
            modified_at: None,
            size: 0,
            size_vram: Some(0),
            digest: digest(&card.id),
            details: details(&card.id),
            context_length: Some(card.context_length),
        })
        .collect();
    Json(OllamaModels { models })
}

/// `POST /api/show`: one model's details (`model`, or `name` as older clients send it).
pub(crate) async fn show(
    State(state): State<AppState>,
    body: Result<JsonObject, ApiError>,
) -> Result<Json<OllamaShowResponse>, OllamaError> {
    let JsonObject(body) = body?;
    let typed: OllamaShowRequest = schema::read(&body)?;
    let model = typed.model.or(typed.name).ok_or_else(|| missing("model"))?;
    let card = find(&state, &model)?;
    let family = family(&card.id);
    Ok(Json(OllamaShowResponse {
        modelfile: String::new(),
        parameters: String::new(),
        template: String::new(),
        details: details(&card.id),
        model_info: json!({
            "general.architecture": family,
            "general.basename": card.id,
            format!("{family}.context_length"): card.context_length,
        }),
        // Every model takes tools: through its chat template, or the generic prompt.
        capabilities: vec!["completion", "tools"],
        modified_at: rfc3339(card.created, 0),
    }))
}

/// `GET /api/version`: this server's version (the crate's, not an Ollama release's).
pub(crate) async fn version() -> Json<OllamaVersion> {
    Json(OllamaVersion {
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Which Ollama endpoint a generation answers; they differ only in where the text goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dialect {
    Chat,
    Generate,
}

impl Dialect {
    fn prompt_param(self) -> &'static str {
        match self {
            Dialect::Chat => "messages",
            Dialect::Generate => "prompt",
        }
    }
}

/// The messages of a chat request, or `None` for none at all (Ollama's "load the model").
fn parse_chat(body: &Map<String, Value>) -> Result<Option<Vec<ChatMessage>>, ApiError> {
    let Some(value) = body.get("messages").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    if value.as_array().is_some_and(Vec::is_empty) {
        return Ok(None);
    }
    if let Some(items) = value.as_array() {
        for (i, item) in items.iter().enumerate() {
            if item
                .get("images")
                .and_then(Value::as_array)
                .is_some_and(|images| !images.is_empty())
            {
                return Err(ApiError::invalid_param(
                    format!("messages[{i}].images"),
                    "images are not supported",
                ));
            }
        }
    }
    body_messages(body).map(Some)
}

/// `format`: `"json"` for any JSON object, or a JSON schema the answer must follow.
fn format(format: Option<&Value>) -> Result<Option<OutputConstraint>, ApiError> {
    match format {
        None => Ok(None),
        Some(Value::String(format)) if format.is_empty() => Ok(None),
        Some(Value::String(format)) if format == "json" => {
            Ok(Some(OutputConstraint::json_object()))
        }
        Some(schema @ Value::Object(_)) => {
            Ok(Some(OutputConstraint::JsonSchema(schema.to_string())))
        }
        Some(other) => Err(ApiError::invalid_param(
            "format",
            format!(
                "'format' must be \"json\" or a JSON schema object, got {}",
                describe(other)
            ),
        )),
    }
}

fn refuse_non_empty(name: &str, value: Option<&Value>, message: &str) -> Result<(), ApiError> {
    match value {
        Some(Value::Array(items)) if items.is_empty() => Ok(()),
        None => Ok(()),
        Some(_) => Err(ApiError::invalid_param(name, message)),
    }
}

/// What a request's `stream` and `options` ask for.
#[derive(Debug)]
struct Options {
    stream: bool,
    max_tokens: Option<u32>,
    sampling: SamplingParams,
    stop: Vec<String>,
}

impl Options {
    fn request(&self, model: String, prompt: Prompt) -> GenerationRequest {
        GenerationRequest {
            logprobs: None,
            embed: false,
            prompt_logprobs: None,
            penalties: Default::default(),
            constraint: None,
            tools: Vec::new(),
            share_prefill: None,
            model,
            prompt,
            max_tokens: self.max_tokens,
            sampling: self.sampling,
            stop: self.stop.clone(),
            ignore_eos: false,
        }
    }
}

/// Reads `stream` (on unless `false`, as in Ollama) and the `options` the engine can honour;
/// the other options (`num_ctx`, `repeat_penalty`, ...) are accepted and ignored, as
/// Ollama's clients send them freely.
fn options(
    options: Option<OllamaOptions>,
    stream: Option<bool>,
    default_max_tokens: Option<usize>,
) -> Result<Options, ApiError> {
    let stream = stream.unwrap_or(true);
    let options = options.unwrap_or_default();
    let at = |name: &str| format!("options.{name}");
    let temperature = options.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::invalid_param(
            at("temperature"),
            format!("'options.temperature' must be at least 0, got {temperature}"),
        ));
    }
    let top_p = options.top_p.unwrap_or(DEFAULT_TOP_P);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            at("top_p"),
            format!("'options.top_p' must be greater than 0 and at most 1, got {top_p}"),
        ));
    }
    let top_k = options.top_k.unwrap_or(DEFAULT_TOP_K);
    let seed = match &options.seed {
        // Ollama's -1 (and no seed) mean a random one.
        None => None,
        Some(value) => match value.as_i64().filter(|&n| n >= 0) {
            Some(n) => Some(n as u64),
            None if value.as_i64() == Some(-1) => None,
            None => Some(value.as_u64().ok_or_else(|| {
                ApiError::invalid_param(
                    at("seed"),
                    format!(
                        "'options.seed' must be an integer (-1 for a random one), got {}",
                        describe(value)
                    ),
                )
            })?),
        },
    };
    let max_tokens = match &options.num_predict {
        None => None,
        Some(value) => match value.as_i64() {
            // -1 (no limit) and -2 (fill the context) leave it to the engine, within the
            // model's context.
            Some(n) if n < 0 => None,
            Some(0) => {
                return Err(ApiError::invalid_param(
                    at("num_predict"),
                    "'options.num_predict' must be at least 1, or -1 for no limit",
                ));
            }
            Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
            None => match value.as_u64() {
                Some(_) => Some(u32::MAX),
                None => {
                    return Err(ApiError::invalid_param(
                        at("num_predict"),
                        format!(
                            "'options.num_predict' must be an integer, got {}",
                            describe(value)
                        ),
                    ));
                }
            },
        },
    };
    let max_tokens =
        max_tokens.or_else(|| default_max_tokens.map(|n| u32::try_from(n).unwrap_or(u32::MAX)));
    let stop = match &options.stop {
        None => Vec::new(),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop.clone()),
                other => Err(ApiError::invalid_param(
                    at("stop"),
                    format!("'options.stop' must hold strings, got {}", describe(other)),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                at("stop"),
                format!(
                    "'options.stop' must be an array of strings, got {}",
                    describe(other)
                ),
            ));
        }
    };
    Ok(Options {
        stream,
        max_tokens,
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: u32::try_from(top_k).unwrap_or(u32::MAX),
            seed: seed.unwrap_or_else(rand::random),
        },
        // An empty stop string would end every generation at once.
        stop: stop.into_iter().filter(|stop| !stop.is_empty()).collect(),
    })
}

/// The model id to ask the engine for: Ollama's clients may add the default tag `:latest`
/// to a name the tags list gave them without one.
pub(crate) fn resolve(state: &AppState, model: &str) -> String {
    let models = state.engine.models();
    if models.iter().any(|card| card.id == model) {
        return model.to_owned();
    }
    match model.strip_suffix(":latest") {
        Some(bare) if models.iter().any(|card| card.id == bare) => bare.to_owned(),
        _ => model.to_owned(),
    }
}

/// The served model named `model`, or the 404 that lists the others.
fn find(state: &AppState, model: &str) -> Result<ModelCard, ApiError> {
    let resolved = resolve(state, model);
    let models = state.engine.models();
    match models.iter().find(|card| card.id == resolved) {
        Some(card) => Ok(card.clone()),
        None => Err(ApiError::unknown_model(
            model,
            models.into_iter().map(|card| card.id).collect(),
        )),
    }
}

/// Ollama's answer to a request with nothing to generate ("load the model"): the model is
/// served already, so it is done at once; an unknown model is still a 404.
fn load(state: &AppState, dialect: Dialect, model: &str) -> Result<Response, OllamaError> {
    find(state, model)?;
    let done = OllamaDone {
        done_reason: Some("load"),
        ..OllamaDone::default()
    };
    Ok(Json(line(dialect, model, "", &[], Some(done))).into_response())
}

/// Admits, starts and delivers one generation, as NDJSON lines or one JSON object; calls of
/// `tools` come back as the message's `tool_calls`.
#[allow(clippy::too_many_arguments)]
async fn run(
    state: &AppState,
    dialect: Dialect,
    model: String,
    request: GenerationRequest,
    stream: bool,
    started: Instant,
    log: RequestLog,
    tools: Option<ToolUse>,
) -> Result<Response, OllamaError> {
    let params = Params {
        prompt: dialect.prompt_param(),
        constraint: "format",
    };
    let mut running = Running::start(state, request, params, log).await?;
    let mut lines = Lines {
        dialect,
        model,
        started,
        tools,
        held: Held::default(),
    };

    if !stream {
        let (text, finished) = running.whole().await?;
        let (text, calls) = match &lines.tools {
            Some(tools) => {
                let (content, calls) = tools::read_calls(&text, tools);
                (content.unwrap_or_default(), calls)
            }
            None => (text, Vec::new()),
        };
        return Ok(Json(lines.last(&text, &calls, &finished)).into_response());
    }

    // Until the first item the response can still be an ordinary error; after it, errors
    // can only travel inside the stream, as a line `{"error": ...}` (as Ollama sends them).
    let first = running.first().await?;
    let mut pending = VecDeque::new();
    lines.render(first, &mut pending);
    let body = running.into_stream(pending, move |step, out| lines.render(step, out));
    let mut response = Body::from_stream(body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}

/// What every line of one answer shares.
#[derive(Debug)]
struct Lines {
    dialect: Dialect,
    /// The model as the client named it, echoed as Ollama does.
    model: String,
    started: Instant,
    /// The tools offered, whose calls are read out of the text.
    tools: Option<ToolUse>,
    /// Text held back while it may be a call.
    held: Held,
}

impl Lines {
    /// The NDJSON lines one item of a streamed answer produces: pieces as they come (less what
    /// may be a tool call), and at the end the rest of the text and the calls, then the last
    /// line.
    fn render(&mut self, step: Step, out: &mut VecDeque<Bytes>) {
        let mut lines = Vec::new();
        match step {
            Step::Logprob(_) => {}
            Step::Text(piece) => {
                let piece = self.held.pass(self.tools.as_ref(), piece);
                if !piece.is_empty() {
                    lines.push(self.piece(&piece, &[]));
                }
            }
            Step::Finished(finished) => {
                let (rest, calls) = self.held.finish(self.tools.as_ref());
                if !rest.is_empty() || !calls.is_empty() {
                    lines.push(self.piece(&rest, &calls));
                }
                lines.push(self.last("", &[], &finished));
            }
            Step::Failed(error) => lines.push(error.ollama_body()),
        }
        for line in lines {
            let mut bytes = line.to_string().into_bytes();
            bytes.push(b'\n');
            out.push_back(Bytes::from(bytes));
        }
    }

    /// A line carrying a piece of the answer (and calls, at its end).
    fn piece(&self, piece: &str, calls: &[Call]) -> Value {
        line(self.dialect, &self.model, piece, calls, None)
    }

    /// The last line (or the whole answer, when not streamed), with the counts and timings.
    fn last(&self, text: &str, calls: &[Call], finished: &Finished) -> Value {
        let done_reason = match finished.reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        };
        let (prompt_tokens, completion_tokens) = counts(finished);
        let done = OllamaDone {
            done_reason: Some(done_reason),
            total_duration: Some(nanos(self.started.elapsed().as_secs_f64())),
            // The cluster loads its model before it serves, never per request.
            load_duration: Some(0),
            prompt_eval_count: Some(prompt_tokens),
            prompt_eval_duration: Some(nanos(finished.time_to_first_token_s)),
            eval_count: Some(completion_tokens),
            eval_duration: Some(nanos(finished.decode_s)),
        };
        line(self.dialect, &self.model, text, calls, Some(done))
    }
}

/// One line of an answer: the text (and a chat's tool calls, Ollama's shape: the arguments as
/// an object) where the dialect puts it; with `done`, the last.
fn line(
    dialect: Dialect,
    model: &str,
    text: &str,
    calls: &[Call],
    done: Option<OllamaDone>,
) -> Value {
    let (model, created_at, finished) = (model.to_owned(), now(), done.is_some());
    let line = match dialect {
        Dialect::Chat => serde_json::to_value(OllamaChatLine {
            model,
            created_at,
            message: OllamaMessage {
                role: schema::AssistantRole::Name,
                content: text.to_owned(),
                tool_calls: (!calls.is_empty()).then(|| {
                    calls
                        .iter()
                        .map(|c| {
                            let arguments: Value =
                                serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
                            OllamaToolCall {
                                function: json!({"name": c.name, "arguments": arguments}),
                            }
                        })
                        .collect()
                }),
            },
            done: finished,
            end: done.unwrap_or_default(),
        }),
        Dialect::Generate => serde_json::to_value(OllamaGenerateLine {
            model,
            created_at,
            response: text.to_owned(),
            done: finished,
            end: done.unwrap_or_default(),
        }),
    };
    line.unwrap_or_default()
}

/// Seconds as whole nanoseconds (Ollama's unit for durations); negative or non-finite
/// inputs give 0.
fn nanos(seconds: f64) -> u64 {
    if seconds.is_finite() && seconds > 0.0 {
        (seconds * 1e9) as u64
    } else {
        0
    }
}

/// A stable digest for a model that has no file digest the API knows of: the SHA-256 of
/// its id, so that clients that key on it see the same model as the same.
fn digest(id: &str) -> String {
    let hash = Sha256::digest(id.as_bytes());
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Ollama's `details`, guessed from the model id (the API knows no more of the model).
fn details(id: &str) -> OllamaDetails {
    let family = family(id);
    OllamaDetails {
        parent_model: String::new(),
        format: "gguf".to_owned(),
        families: vec![family.clone()],
        family,
        parameter_size: parameter_size(id),
        quantization_level: String::new(),
    }
}

/// The family a model id names: its last path segment up to the first `-`, lowercased
/// (`meta-llama/Llama-3.2-1B` -> `llama`, `qwen3-0.6b` -> `qwen3`).
fn family(id: &str) -> String {
    let name = id.rsplit('/').next().unwrap_or(id);
    let name = name.split(':').next().unwrap_or(name);
    name.split(['-', '_'])
        .next()
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// The parameter count a model id names (`1b`, `0.6B`, `135M`), as Ollama writes it
/// (`1B`), or empty.
fn parameter_size(id: &str) -> String {
    let name = id.rsplit('/').next().unwrap_or(id);
    name.split(['-', '_', ':'])
        .find(|part| {
            let Some(number) = part
                .strip_suffix(['b', 'B'])
                .or_else(|| part.strip_suffix(['m', 'M']))
            else {
                return false;
            };
            !number.is_empty()
                && number.chars().all(|c| c.is_ascii_digit() || c == '.')
                && number.chars().any(|c| c.is_ascii_digit())
        })
        .map(str::to_ascii_uppercase)
        .unwrap_or_default()
}

/// Now, in RFC 3339 with nanoseconds, as Ollama's `created_at`.
fn now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(since.as_secs(), since.subsec_nanos())
}

/// Unix time as RFC 3339 in UTC. Written out (Howard Hinnant's `civil_from_days`) rather
/// than adding a date crate to the API for one format.
fn rfc3339(unix_seconds: u64, nanos: u32) -> String {
    let days = unix_seconds / 86_400;
    let of_day = unix_seconds % 86_400;
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    // Days since 0000-03-01, in 400-year eras of 146 097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let fraction = if nanos == 0 {
        String::new()
    } else {
        format!(".{nanos:09}")
    };
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}Z")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        // A leap day, and a fraction.
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(4_102_444_799, 0), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn details_are_guessed_from_the_id() {
        assert_eq!(family("meta-llama/Llama-3.2-1B"), "llama");
        assert_eq!(family("qwen3-0.6b"), "qwen3");
        assert_eq!(parameter_size("meta-llama/Llama-3.2-1B"), "1B");
        assert_eq!(parameter_size("qwen3-0.6b"), "0.6B");
        assert_eq!(parameter_size("SmolLM2-135M-Instruct"), "135M");
        assert_eq!(parameter_size("mistral"), "");
        assert_eq!(parameter_size("x-b"), "");
    }

    #[test]
    fn digest_is_the_sha256_of_the_id() {
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn options_of(body: Value) -> Result<Options, ApiError> {
        let Value::Object(map) = body else {
            panic!("not an object")
        };
        let typed: OllamaChatRequest = schema::read(&map)?;
        options(typed.options, typed.stream, None)
    }

    #[test]
    fn options_follow_ollama() {
        let defaults = options_of(json!({"model": "m"})).unwrap();
        assert!(defaults.stream);
        assert_eq!(defaults.max_tokens, None);
        assert_eq!(defaults.sampling.top_k, 40);
        let set = options_of(json!({
            "model": "m",
            "stream": false,
            "options": {"temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 42,
                        "num_predict": 8, "stop": ["\n", ""], "num_ctx": 4096},
        }))
        .unwrap();
        assert!(!set.stream);
        assert_eq!(set.max_tokens, Some(8));
        assert_eq!(set.sampling.temperature, 0.0);
        assert_eq!(set.sampling.top_k, 3);
        assert_eq!(set.sampling.seed, 42);
        assert_eq!(set.stop, ["\n"]);
        let unlimited = options_of(json!({"model": "m", "options": {"num_predict": -1}})).unwrap();
        assert_eq!(unlimited.max_tokens, None);
        let error =
            options_of(json!({"model": "m", "options": {"temperature": "hot"}})).unwrap_err();
        assert_eq!(
            error.envelope()["error"]["param"],
            json!("options.temperature")
        );
        assert!(options_of(json!({"model": "m", "options": {"num_predict": 0}})).is_err());
        assert!(options_of(json!({"model": "m", "options": {"seed": 1.5}})).is_err());
        assert!(options_of(json!({"model": "m", "options": 3})).is_err());
    }
}
