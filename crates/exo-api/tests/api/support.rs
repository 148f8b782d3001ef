//! Sending requests to the router in-process and reading what comes back.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use exo_api::{ApiConfig, Engine, router};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::fake::FakeEngine;

pub fn app(engine: &Arc<FakeEngine>) -> Router {
    app_with(engine, ApiConfig::default())
}

pub fn app_with(engine: &Arc<FakeEngine>, config: ApiConfig) -> Router {
    let engine: Arc<dyn Engine> = engine.clone();
    router(engine, config)
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "body is not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|value| value.to_str().unwrap())
    }

    /// Asserts an OpenAI error envelope with this status, param and code; returns its message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, param: Option<&str>, code: Option<&str>) -> String {
        assert_eq!(self.status.as_u16(), status, "{}", self.text());
        let body = self.json();
        let error = &body["error"];
        let kind = error["type"].as_str().unwrap();
        let expected_kind = match status {
            429 => "rate_limit_error",
            500.. => "server_error",
            _ => "invalid_request_error",
        };
        assert_eq!(kind, expected_kind, "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
        assert_eq!(error["code"].as_str(), code, "{body}");
        let message = error["message"].as_str().unwrap().to_owned();
        assert!(!message.is_empty());
        assert_eq!(
            body.as_object().unwrap().len(),
            1,
            "envelope has only `error`: {body}"
        );
        message
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn json_request(method: Method, path: &str, body: &Value) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

pub async fn post(app: &Router, path: &str, body: Value) -> Reply {
    send(app, json_request(Method::POST, path, &body)).await
}

pub async fn get(app: &Router, path: &str) -> Reply {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

pub fn chat_body() -> Value {
    json!({
        "model": "llama-3.2-1b",
        "messages": [{"role": "user", "content": "Say hello"}],
    })
}

pub fn completion_body() -> Value {
    json!({"model": "llama-3.2-1b", "prompt": "Once upon a time"})
}

/// Adds or replaces fields of a JSON object.
pub fn with(mut body: Value, fields: Value) -> Value {
    for (key, value) in fields.as_object().unwrap() {
        body[key] = value.clone();
    }
    body
}

/// The `data:` payloads of a server-sent event stream, in order; comment lines are skipped.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The stream's JSON chunks, asserting it ends with exactly one `[DONE]`.
#[track_caller]
pub fn sse_chunks(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut data = sse_data(&reply.text());
    assert_eq!(data.pop().as_deref(), Some("[DONE]"), "{}", reply.text());
    data.iter()
        .map(|chunk| serde_json::from_str(chunk).unwrap())
        .collect()
}
