//! The OpenAPI document describes what is routed.

use axum::http::Method;
use serde_json::Value;

use crate::fake::FakeEngine;
use crate::support::{app, chat_body, completion_body, get, json_request, send};

#[tokio::test]
async fn document_is_served_and_matches_the_library_function() {
    let engine = FakeEngine::new().build();
    let reply = get(&app(&engine), "/openapi.json").await;
    assert_eq!(reply.status, 200);
    let document = reply.json();
    assert_eq!(document, exo_api::openapi());
    assert_eq!(document["openapi"], "3.1.0");
    assert!(document["components"]["schemas"]["ErrorResponse"].is_object());
}

#[tokio::test]
async fn every_routed_path_is_documented_and_every_documented_path_is_routed() {
    let document = exo_api::openapi();
    let paths = document["paths"].as_object().unwrap();
    let mut documented: Vec<&str> = paths.keys().map(String::as_str).collect();
    documented.sort_unstable();
    assert_eq!(
        documented,
        [
            "/",
            "/api/chat",
            "/api/embed",
            "/api/embeddings",
            "/api/generate",
            "/api/ps",
            "/api/show",
            "/api/tags",
            "/api/version",
            "/health",
            "/healthz",
            "/metrics",
            "/openapi.json",
            "/readyz",
            "/ui/{file}",
            "/v1/chat/completions",
            "/v1/cluster",
            "/v1/cluster/events",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/messages",
            "/v1/models",
            "/v1/models/{model}",
            "/v1/responses",
        ]
    );

    let engine = FakeEngine::new().build();
    let app = app(&engine);
    for (path, item) in paths {
        let concrete = path
            .replace("{model}", "llama-3.2-1b")
            .replace("{file}", "app.js");
        for method in item.as_object().unwrap().keys() {
            if path == "/v1/cluster/events" {
                // An event stream does not end: its status is what can be checked here (its
                // events are checked in `web.rs`).
                let request = axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let response = tower::ServiceExt::oneshot(app.clone(), request)
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{method} {path}");
                continue;
            }
            let reply = match method.as_str() {
                "get" => get(&app, &concrete).await,
                "post" => {
                    let body = if path == "/v1/responses" || path.contains("embed") {
                        serde_json::json!({"model": "llama-3.2-1b", "input": "Hi", "prompt": "Hi"})
                    } else if path == "/v1/messages" {
                        let mut body = chat_body();
                        body["max_tokens"] = 16.into();
                        body
                    } else if path.contains("chat") {
                        chat_body()
                    } else {
                        completion_body()
                    };
                    send(&app, json_request(Method::POST, &concrete, &body)).await
                }
                other => panic!("unexpected method {other} for {path}"),
            };
            assert_eq!(reply.status, 200, "{method} {path}: {}", reply.text());
        }
    }

    // Every documented operation names its responses, and errors use the shared envelope.
    for item in paths.values() {
        for operation in item.as_object().unwrap().values() {
            assert!(operation["responses"]["200"].is_object(), "{operation}");
        }
    }
    let envelope = &document["components"]["schemas"]["ErrorResponse"]["properties"]["error"];
    let required: Vec<&Value> = envelope["required"].as_array().unwrap().iter().collect();
    assert_eq!(required.len(), 4);
}
