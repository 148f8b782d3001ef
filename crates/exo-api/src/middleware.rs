//! What wraps every route: the request log line, API-key checks, the request body's time
//! limit and the error envelopes for requests no handler takes.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use tower_http::timeout::{DeadlineBody, TimeoutError};
use tracing::Instrument;

use crate::error::ApiError;

/// Per-request facts only a handler learns (token counts), for the log line written when the
/// response body is done, and the request's id.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequestLog {
    /// Prompt and completion tokens of the request's generations, summed.
    tokens: Arc<Mutex<Option<(usize, usize)>>>,
    id: Arc<str>,
}

/// The header that gives a client its request's id, which every log line about the request
/// carries (`request{id=...}`): what to quote when asking what went wrong.
pub(crate) const REQUEST_ID: &str = "x-request-id";

impl RequestLog {
    fn new() -> Self {
        Self {
            tokens: Arc::default(),
            id: format!("req_{:016x}", rand::random::<u64>()).into(),
        }
    }

    /// Adds a finished generation's tokens. A request may run several (`n` choices, each
    /// prefilling the prompt; embeddings, one per input): the log line shows their sums.
    pub(crate) fn record_tokens(&self, prompt_tokens: usize, completion_tokens: usize) {
        if let Ok(mut tokens) = self.tokens.lock() {
            let (prompt, completion) = tokens.get_or_insert((0, 0));
            *prompt += prompt_tokens;
            *completion += completion_tokens;
        }
    }

    /// The request's id (`req_` and 16 hex digits; empty outside the logging middleware).
    pub(crate) fn id(&self) -> &str {
        &self.id
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestLog {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Self>().cloned().unwrap_or_default())
    }
}

/// Writes one info line per request once its response body has been sent or dropped, so
/// that a streamed generation is logged with its full duration and token counts.
pub(crate) async fn log_requests(mut req: Request, next: Next) -> Response {
    let log = RequestLog::new();
    req.extensions_mut().insert(log.clone());
    let span = tracing::info_span!("request", id = %log.id);
    let mut line = LogLine {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        status: CLIENT_CLOSED_REQUEST,
        started: Instant::now(),
        log,
        complete: false,
    };
    // When the client goes away before the response is ready, this future is dropped here
    // and the line is written with the placeholder status.
    let mut response = next.run(req).instrument(span.clone()).await;
    line.status = response.status().as_u16();
    if let Ok(value) = HeaderValue::from_str(&line.log.id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response.map(|inner| Body::new(LoggedBody { inner, line, span }))
}

/// The status logged for a request whose client left before the response was ready, as
/// nginx logs it.
const CLIENT_CLOSED_REQUEST: u16 = 499;

struct LogLine {
    method: Method,
    path: String,
    status: u16,
    started: Instant,
    log: RequestLog,
    /// Whether the whole body went out; false when the client went away first.
    complete: bool,
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let status = self.status;
        let tokens = self.log.tokens.lock().ok().and_then(|t| *t);
        match tokens {
            Some((prompt_tokens, completion_tokens)) => tracing::info!(
                id = %self.log.id,
                method = %self.method,
                path = %self.path,
                status,
                duration_ms,
                prompt_tokens,
                completion_tokens,
                complete = self.complete,
                "request",
            ),
            None => tracing::info!(
                id = %self.log.id,
                method = %self.method,
                path = %self.path,
                status,
                duration_ms,
                complete = self.complete,
                "request",
            ),
        }
    }
}

/// A response body that writes its request's log line when dropped; what it logs while it
/// streams carries the request's id.
struct LoggedBody {
    inner: Body,
    line: LogLine,
    span: tracing::Span,
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let span = self.span.clone();
        let _entered = span.enter();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.line.complete = true,
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.line.complete = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Requires `Authorization: Bearer <key>` (or `x-api-key: <key>`, as Anthropic's clients send
/// it) on `/v1/*` (OpenAI's and Anthropic's dialects), `/metrics` and
/// `/api/*` (Ollama's), answering each in its own error shape. Ollama's clients send no key
/// unless told to, but they can send the header (`ollama.Client(headers=...)`, Open WebUI's
/// connection key), and a configured key that one dialect bypassed would protect nothing.
pub(crate) async fn require_api_key(
    State(key): State<Arc<str>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let ollama = under("/api");
    if !(under("/v1") || ollama || path == "/metrics") {
        return next.run(req).await;
    }
    // Anthropic's clients send the key in `x-api-key`.
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token)
        .or_else(|| {
            req.headers()
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
                .map(str::trim)
                .filter(|key| !key.is_empty())
        });
    let error = match given {
        Some(given) if same_secret(given.as_bytes(), key.as_bytes()) => {
            return next.run(req).await;
        }
        Some(_) => ApiError::unauthorized("incorrect API key provided"),
        None => ApiError::unauthorized(
            "missing API key: send it in an 'Authorization: Bearer <key>' header",
        ),
    };
    if ollama {
        error.into_ollama_response()
    } else {
        error.into_response()
    }
}

fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|token| !token.is_empty())
}

/// Compares two secrets in time independent of where they first differ.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// Gives a request's body `limit` from the end of its head to arrive in full; a handler
/// reading a slower one gets an error, and the client 408 with the connection closed.
pub(crate) async fn limit_body_time(
    State(limit): State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        Body::new(DeadlineNoted {
            inner: Box::pin(DeadlineBody::new(limit, body)),
            timed_out: Arc::clone(&timed_out),
        })
    });
    let response = next.run(req).await;
    if !timed_out.load(Ordering::Relaxed) {
        return response;
    }
    let mut response = ApiError::body_timeout(limit).into_response();
    // The rest of the body may still be on its way; the connection cannot carry another
    // request after it.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// A request body that notes when its deadline passed, so that the response can say so
/// whatever the handler made of the failed read.
struct DeadlineNoted {
    /// Boxed because the deadline's timer must not move.
    inner: Pin<Box<DeadlineBody<Body>>>,
    timed_out: Arc<AtomicBool>,
}

impl http_body::Body for DeadlineNoted {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled
            && error.is::<TimeoutError>()
        {
            self.timed_out.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// 404 envelope for paths nothing is routed at.
pub(crate) async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

/// 405 envelope for routed paths asked with another method.
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_token_required() {
        assert_eq!(bearer_token("Bearer sk-1"), Some("sk-1"));
        assert_eq!(bearer_token("bearer  sk-1 "), Some("sk-1"));
        assert_eq!(bearer_token("Basic sk-1"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("sk-1"), None);
    }

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret(b"sk-1", b"sk-1"));
        assert!(!same_secret(b"sk-2", b"sk-1"));
        assert!(!same_secret(b"sk-10", b"sk-1"));
    }
}
