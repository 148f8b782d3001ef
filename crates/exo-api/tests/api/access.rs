//! API keys and CORS.

use axum::body::Body;
use axum::http::{Method, Request, header};
use exo_api::ApiConfig;

use crate::fake::FakeEngine;
use crate::support::{app, app_with, chat_body, get, json_request, send};

fn keyed() -> ApiConfig {
    ApiConfig {
        api_key: Some("sk-test-123".into()),
        ..ApiConfig::default()
    }
}

fn authorized(path: &str, authorization: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(value) = authorization {
        request = request.header(header::AUTHORIZATION, value);
    }
    request.body(Body::empty()).unwrap()
}

#[tokio::test]
async fn without_a_configured_key_no_key_is_needed() {
    let engine = FakeEngine::new().build();
    let reply = get(&app(&engine), "/v1/models").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn missing_or_wrong_key_is_401() {
    let engine = FakeEngine::new().build();
    let app = app_with(&engine, keyed());
    for path in [
        "/v1/models",
        "/v1/cluster",
        "/v1/cluster/events",
        "/v1/models/llama-3.2-1b",
        "/v1/nothing",
        "/metrics",
    ] {
        let reply = send(&app, authorized(path, None)).await;
        let message = reply.assert_error(401, None, Some("invalid_api_key"));
        assert!(message.contains("Authorization: Bearer"), "{message}");
        for wrong in [
            "Bearer sk-test-12",
            "Bearer sk-test-1234",
            "Basic sk-test-123",
            "sk-test-123",
        ] {
            let reply = send(&app, authorized(path, Some(wrong))).await;
            reply.assert_error(401, None, Some("invalid_api_key"));
        }
    }
    let mut request = json_request(Method::POST, "/v1/chat/completions", &chat_body());
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, "Bearer nope".parse().unwrap());
    let reply = send(&app, request).await;
    reply.assert_error(401, None, Some("invalid_api_key"));
    assert!(engine.probe.requests().is_empty());
}

#[tokio::test]
async fn right_key_is_let_through() {
    let engine = FakeEngine::new().build();
    let app = app_with(&engine, keyed());
    let reply = send(&app, authorized("/v1/models", Some("Bearer sk-test-123"))).await;
    assert_eq!(reply.status, 200);
    let mut request = json_request(Method::POST, "/v1/chat/completions", &chat_body());
    request
        .headers_mut()
        .insert(header::AUTHORIZATION, "bearer sk-test-123".parse().unwrap());
    let reply = send(&app, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn health_and_openapi_stay_open() {
    let engine = FakeEngine::new().build();
    let app = app_with(&engine, keyed());
    assert_eq!(get(&app, "/healthz").await.status, 200);
    assert_eq!(get(&app, "/health").await.status, 200);
    assert_eq!(get(&app, "/openapi.json").await.status, 200);
}

fn from_origin(method: Method, path: &str, origin: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::ORIGIN, origin)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn no_cors_headers_unless_configured() {
    let engine = FakeEngine::new().build();
    let reply = send(
        &app(&engine),
        from_origin(Method::GET, "/v1/models", "https://chat.example"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("access-control-allow-origin"), None);
}

#[tokio::test]
async fn configured_origins_get_cors_headers() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            cors_origins: vec!["https://chat.example".into()],
            ..keyed()
        },
    );
    let reply = send(
        &app,
        from_origin(Method::GET, "/healthz", "https://chat.example"),
    )
    .await;
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
    let reply = send(
        &app,
        from_origin(Method::GET, "/healthz", "https://evil.example"),
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), None);

    // A preflight needs no key and allows the Authorization header.
    let preflight = Request::builder()
        .method(Method::OPTIONS)
        .uri("/v1/chat/completions")
        .header(header::ORIGIN, "https://chat.example")
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            "authorization,content-type",
        )
        .body(Body::empty())
        .unwrap();
    let reply = send(&app, preflight).await;
    assert!(reply.status.is_success(), "{}", reply.status);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
    let allowed = reply.header("access-control-allow-headers").unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(
        reply
            .header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );

    // Errors carry the header too, so that the page can read them.
    let reply = send(
        &app,
        from_origin(Method::GET, "/v1/models", "https://chat.example"),
    )
    .await;
    assert_eq!(reply.status, 401);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://chat.example")
    );
}

#[tokio::test]
async fn wildcard_origin_allows_any() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            cors_origins: vec!["*".into()],
            ..ApiConfig::default()
        },
    );
    let reply = send(
        &app,
        from_origin(Method::GET, "/v1/models", "https://anywhere.example"),
    )
    .await;
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
}
