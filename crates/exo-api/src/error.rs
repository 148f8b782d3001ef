//! `ApiError`, the one type every handler fails with, which renders OpenAI's error envelope
//! and never leaks internals; engines report `exo-core`'s `GenerationError`, mapped here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use exo_core::{FailureKind, GenerationError};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// An error response in OpenAI's envelope: `{"error": {"message", "type", "param", "code"}}`.
///
/// OpenAI's SDKs pick the exception class from the status code alone, so the status is what
/// matters most; `type` follows OpenAI's own values.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

/// The API's error envelope, OpenAI's.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ErrorResponse {
    pub(crate) error: ErrorBody,
}

/// What went wrong.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub(crate) message: String,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(invalid_request_error|rate_limit_error|server_error)$")]
    pub(crate) kind: String,
    /// The request field at fault.
    #[schema(required = true)]
    pub(crate) param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, ...).
    #[schema(required = true)]
    pub(crate) code: Option<String>,
}

/// Ollama's error shape.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(as = OllamaError)]
pub(crate) struct OllamaErrorBody {
    pub(crate) error: String,
}

const INVALID_REQUEST: &str = "invalid_request_error";
const SERVER_ERROR: &str = "server_error";
const RATE_LIMIT: &str = "rate_limit_error";
const INTERNAL_MESSAGE: &str = "internal error, see the node's log";

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400: the request is malformed or asks for something unsupported.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, INVALID_REQUEST, message)
    }

    /// 400 naming the request field at fault.
    pub(crate) fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// 401: the API key is missing or wrong.
    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, INVALID_REQUEST, message).with_code("invalid_api_key")
    }

    /// 404 for a path nothing is routed at.
    pub(crate) fn unknown_route(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            INVALID_REQUEST,
            format!("invalid URL ({method} {path}): no such route"),
        )
        .with_code("unknown_url")
    }

    /// 405 for a routed path asked with the wrong method.
    pub(crate) fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            INVALID_REQUEST,
            format!("method {method} is not allowed on {path}"),
        )
        .with_code("method_not_allowed")
    }

    /// 404 for a model that is not served.
    pub(crate) fn unknown_model(model: &str, available: Vec<String>) -> Self {
        Self::from_engine(
            GenerationError::UnknownModel {
                model: model.to_owned(),
                available,
            },
            "model",
        )
    }

    /// 413: the body is over the configured limit.
    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            INVALID_REQUEST,
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with_code("request_too_large")
    }

    /// 408: the request body did not arrive within `limit`.
    pub(crate) fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            INVALID_REQUEST,
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
        )
        .with_code("request_timeout")
    }

    /// 503: every one of the server's `max_connections` connections has a request in flight.
    pub(crate) fn too_many_connections(max_connections: usize) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            SERVER_ERROR,
            format!(
                "server is at its limit of {max_connections} open connections, each with a \
                 request in flight; retry shortly"
            ),
        )
        .with_code("service_unavailable")
    }

    /// 429: the generation queue is full.
    pub(crate) fn queue_full(running: usize, queued: usize) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            RATE_LIMIT,
            format!(
                "server is at capacity: {running} generation(s) running and the queue of \
                 {queued} waiting request(s) is full; retry shortly"
            ),
        )
        .with_code("rate_limit_exceeded")
    }

    /// 500 with the generic message; the caller has logged the detail.
    pub(crate) fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            SERVER_ERROR,
            INTERNAL_MESSAGE,
        )
    }

    /// Maps an engine error to its status; `prompt_param` names the request field holding the
    /// prompt (`messages` or `prompt`), blamed when the prompt alone overflows the context.
    pub(crate) fn from_engine(error: GenerationError, prompt_param: &str) -> Self {
        let message = error.to_string();
        match error {
            GenerationError::UnknownModel { .. } => {
                Self::new(StatusCode::NOT_FOUND, INVALID_REQUEST, message)
                    .with_param("model")
                    .with_code("model_not_found")
            }
            GenerationError::ContextExceeded {
                prompt_tokens,
                context_length,
                ..
            } => {
                let param = if prompt_tokens >= context_length {
                    prompt_param
                } else {
                    "max_tokens"
                };
                Self::invalid_param(param, message).with_code("context_length_exceeded")
            }
            GenerationError::Invalid { param, message } => Self {
                param,
                ..Self::invalid(message)
            },
            GenerationError::Unavailable(message) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
                    .with_code("service_unavailable")
            }
            GenerationError::Busy => Self::new(StatusCode::TOO_MANY_REQUESTS, RATE_LIMIT, message)
                .with_code("rate_limit_exceeded"),
            // A device of the cluster failed under the request: the client may retry. Which
            // node, where and why is for the log, not for clients.
            GenerationError::StageFailed(failure) => {
                tracing::warn!(%failure, "generation failed on a stage");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    SERVER_ERROR,
                    stage_failure_for_clients(failure.kind),
                )
                .with_code("service_unavailable")
            }
            GenerationError::Cancelled => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, SERVER_ERROR, message)
                    .with_code("cancelled")
            }
            other => {
                tracing::error!(error = %other, "engine failed");
                Self::internal()
            }
        }
    }

    /// Adds the request's id to a server error's message, so that the client can quote it
    /// and the operator find the detail in the log (every line about the request carries it).
    pub(crate) fn for_request(mut self, id: &str) -> Self {
        if self.status.is_server_error() && !id.is_empty() {
            self.message = format!("{} (request {id})", self.message);
        }
        self
    }

    pub(crate) fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(crate) fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// What went wrong, for people.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    /// The request field at fault, if one is.
    pub(crate) fn param(&self) -> Option<&str> {
        self.param.as_deref()
    }

    /// The same error blaming `to` where it blamed `from` (or a field under it): a dialect
    /// that reads its field through another's parser names its own.
    pub(crate) fn renamed(mut self, from: &str, to: &str) -> Self {
        if let Some(param) = &self.param
            && (param == from || param.starts_with(&format!("{from}.")))
        {
            let renamed = format!("{to}{}", &param[from.len()..]);
            self.message = self
                .message
                .replace(&format!("'{param}'"), &format!("'{renamed}'"));
            self.param = Some(renamed);
        }
        self
    }

    /// The envelope, also sent as an SSE event when a stream fails after its first chunk.
    pub(crate) fn envelope(&self) -> Value {
        let envelope = ErrorResponse {
            error: ErrorBody {
                message: self.message.clone(),
                kind: self.kind.to_owned(),
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        };
        serde_json::to_value(envelope).unwrap_or_default()
    }
}

/// What a client is told when a stage fails: the cluster-level problem, without node ids or
/// addresses.
fn stage_failure_for_clients(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Lost => {
            "a node of the cluster went away while computing this request, and the request \
             could not go on without it; retry"
        }
        FailureKind::Unresponsive => {
            "a node of the cluster stopped answering while computing this request, and the \
             request could not go on without it; retry"
        }
        FailureKind::Refused => {
            "the cluster was changing its plan and could not take this request; retry"
        }
        _ => "a node of the cluster failed while computing this request; see its log",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let envelope = self.envelope();
        self.respond_with(envelope)
    }
}

impl ApiError {
    /// Ollama's error shape, `{"error": "<message>"}`, with the same status: what the
    /// `/api/*` routes answer, and also a line of their NDJSON streams.
    pub(crate) fn ollama_body(&self) -> Value {
        let body = OllamaErrorBody {
            error: self.message.clone(),
        };
        serde_json::to_value(body).unwrap_or_default()
    }

    /// The response for an `/api/*` route (Ollama's dialect).
    pub(crate) fn into_ollama_response(self) -> Response {
        let body = self.ollama_body();
        self.respond_with(body)
    }

    fn respond_with(self, body: Value) -> Response {
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            // The OpenAI SDKs honour this when they retry.
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_model_message_lists_available_models() {
        let error = GenerationError::UnknownModel {
            model: "gpt-9".into(),
            available: vec!["llama-3.2-1b".into(), "qwen3-0.6b".into()],
        };
        assert_eq!(
            error.to_string(),
            "model `gpt-9` does not exist or is not loaded; available models: llama-3.2-1b, \
             qwen3-0.6b"
        );
        let none = GenerationError::UnknownModel {
            model: "x".into(),
            available: vec![],
        };
        assert!(none.to_string().ends_with("no models are available"));
    }

    #[test]
    fn context_overflow_blames_the_prompt_only_when_the_prompt_alone_overflows() {
        let completion_too_long = ApiError::from_engine(
            GenerationError::ContextExceeded {
                prompt_tokens: 100,
                max_tokens: 8000,
                context_length: 8192,
            },
            "messages",
        );
        assert_eq!(completion_too_long.param.as_deref(), Some("max_tokens"));
        assert!(
            completion_too_long
                .message
                .contains("8100 tokens were requested"),
            "{}",
            completion_too_long.message
        );
        let prompt_too_long = ApiError::from_engine(
            GenerationError::ContextExceeded {
                prompt_tokens: 9000,
                max_tokens: 1,
                context_length: 8192,
            },
            "messages",
        );
        assert_eq!(prompt_too_long.param.as_deref(), Some("messages"));
        assert_eq!(prompt_too_long.code, Some("context_length_exceeded"));
    }

    #[test]
    fn internal_detail_is_not_shown_to_the_client() {
        let error = ApiError::from_engine(
            GenerationError::Internal("tensor shape [3] vs [4]".into()),
            "prompt",
        );
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!error.envelope().to_string().contains("tensor"));
    }
}
