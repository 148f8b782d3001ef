//! Requests refused before they reach the engine, and requests no route takes.

use axum::body::Body;
use axum::http::{Method, Request, header};
use exo_api::ApiConfig;
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{
    app, app_with, chat_body, completion_body, get, json_request, post, send, with,
};

#[tokio::test]
async fn invalid_chat_requests_are_400_naming_the_field() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let user = |content: Value| json!({"role": "user", "content": content});
    let cases = [
        (json!({"messages": []}), "messages", "at least one"),
        (json!({"messages": "hi"}), "messages", "must be an array"),
        (
            json!({"messages": [user(json!("a")), {"role": "function", "content": "x"}]}),
            "messages[1].role",
            "'function'",
        ),
        (
            json!({"messages": [{"role": 3, "content": "x"}]}),
            "messages[0].role",
            "must be a string",
        ),
        (
            json!({"messages": [{"content": "x"}]}),
            "messages[0].role",
            "missing",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
            "missing",
        ),
        (
            json!({"messages": ["hi"]}),
            "messages[0]",
            "must be an object",
        ),
        (
            json!({"messages": [user(json!([{"type": "image_url", "image_url": {"url": "x"}}]))]}),
            "messages[0].content[0].type",
            "image_url",
        ),
        (
            json!({"messages": [user(json!([{"type": "text"}]))]}),
            "messages[0].content[0].text",
            "string",
        ),
        (
            json!({"messages": [user(json!(5))]}),
            "messages[0].content",
            "string or an array",
        ),
        (json!({"max_tokens": 0}), "max_tokens", "at least 1"),
        (
            json!({"max_completion_tokens": 0}),
            "max_completion_tokens",
            "at least 1",
        ),
        (
            json!({"max_tokens": -5}),
            "max_tokens",
            "non-negative integer",
        ),
        (
            json!({"max_tokens": 1.5}),
            "max_tokens",
            "non-negative integer",
        ),
        (
            json!({"temperature": 2.5}),
            "temperature",
            "between 0 and 2",
        ),
        (
            json!({"temperature": -0.1}),
            "temperature",
            "between 0 and 2",
        ),
        (
            json!({"temperature": "hot"}),
            "temperature",
            "must be a number, got a string",
        ),
        (json!({"top_p": 0}), "top_p", "greater than 0"),
        (json!({"top_p": 1.5}), "top_p", "at most 1"),
        (
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            "stop",
            "at most 4",
        ),
        (json!({"stop": [1]}), "stop", "strings"),
        (json!({"n": 0}), "n", "from 1 to 16"),
        (
            json!({"presence_penalty": 2.5}),
            "presence_penalty",
            "between -2 and 2",
        ),
        (
            json!({"frequency_penalty": "high"}),
            "frequency_penalty",
            "a number",
        ),
        (json!({"logit_bias": {"x": 1}}), "logit_bias", "token ids"),
        (
            json!({"logit_bias": {"5": 101}}),
            "logit_bias",
            "-100 to 100",
        ),
        (json!({"logit_bias": [1]}), "logit_bias", "an object"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "from 0 to 20",
        ),
        (
            json!({"top_logprobs": 3}),
            "top_logprobs",
            "needs 'logprobs'",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
            "must be an object",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "maybe"}),
            "tool_choice",
            "none, auto, required",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
            "json_schema",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "no"}}}),
            "response_format.json_schema.schema",
            "JSON Schema object",
        ),
        (json!({"stream": "yes"}), "stream", "boolean"),
        (json!({"stream_options": true}), "stream_options", "object"),
        (json!({"seed": "42"}), "seed", "integer"),
        (json!({"model": 7}), "model", "must be a string"),
    ];
    for (fields, param, needle) in cases {
        let reply = post(
            &app,
            "/v1/chat/completions",
            with(chat_body(), fields.clone()),
        )
        .await;
        let message = reply.assert_error(400, Some(param), None);
        assert!(message.contains(needle), "{fields}: {message}");
        assert!(
            !message.contains("f32") && !message.contains("u64"),
            "{message}"
        );
    }
    let mut no_model = chat_body();
    no_model.as_object_mut().unwrap().remove("model");
    let reply = post(&app, "/v1/chat/completions", no_model).await;
    let message = reply.assert_error(400, Some("model"), None);
    assert_eq!(message, "missing required parameter 'model'");
    assert!(
        engine.probe.requests().is_empty(),
        "nothing reached the engine"
    );
}

#[tokio::test]
async fn nulls_and_neutral_values_of_unsupported_options_are_accepted() {
    let engine = FakeEngine::new().build();
    let fields = json!({
        "temperature": null, "top_p": null, "max_tokens": null, "stop": null, "seed": null,
        "n": null, "stream": null, "tools": [], "response_format": {"type": "text"},
        "logit_bias": {}, "top_logprobs": 0, "temperature_extra": "ignored",
    });
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), fields),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn malformed_bodies_are_400_saying_what_is_wrong() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let raw = |body: &'static str, content_type: Option<&str>| {
        let mut request = Request::post("/v1/chat/completions");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body)).unwrap()
    };

    let reply = send(&app, raw("{\"model\": ", Some("application/json"))).await;
    let message = reply.assert_error(400, None, None);
    assert!(
        message.contains("could not parse the request body as JSON"),
        "{message}"
    );

    let reply = send(&app, raw("[1, 2]", Some("application/json"))).await;
    let message = reply.assert_error(400, None, None);
    assert!(
        message.contains("must be a JSON object, got an array"),
        "{message}"
    );

    let reply = send(&app, raw("", Some("application/json"))).await;
    reply.assert_error(400, None, None);

    let reply = send(&app, raw("model=x", Some("multipart/form-data"))).await;
    let message = reply.assert_error(400, None, None);
    assert!(
        message.contains("Content-Type must be application/json"),
        "{message}"
    );

    // A charset parameter is fine, and so is a client that sends no Content-Type at all.
    let body = chat_body().to_string().leak();
    let reply = send(&app, raw(body, Some("application/json; charset=utf-8"))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = send(&app, raw(body, None)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn json_sent_as_form_or_text_or_untyped_is_read_as_json() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let raw = |path: &str, body: String, content_type: Option<&str>| {
        let mut request = Request::post(path);
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        request.body(Body::from(body)).unwrap()
    };
    // What `curl -d`, a browser's `fetch` with a string body and a bare client send.
    let lenient = [
        None,
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
    ];
    for content_type in lenient {
        for (path, body) in [
            ("/v1/chat/completions", chat_body()),
            ("/v1/completions", completion_body()),
        ] {
            let reply = send(&app, raw(path, body.to_string(), content_type)).await;
            assert_eq!(
                reply.status,
                200,
                "{path} {content_type:?}: {}",
                reply.text()
            );
            assert!(
                reply.json()["choices"][0].is_object(),
                "{path} {content_type:?}"
            );
        }
    }
    let requests = engine.probe.requests();
    assert_eq!(requests.len(), 6);
    assert!(
        requests
            .iter()
            .all(|request| request.model == "llama-3.2-1b")
    );

    // A body that is not JSON gets the message it gets as application/json.
    let body = "model=llama-3.2-1b&prompt=hi";
    let strict = send(
        &app,
        raw(
            "/v1/chat/completions",
            body.into(),
            Some("application/json"),
        ),
    )
    .await
    .assert_error(400, None, None);
    assert!(
        strict.contains("could not parse the request body as JSON"),
        "{strict}"
    );
    for content_type in lenient {
        let reply = send(&app, raw("/v1/chat/completions", body.into(), content_type)).await;
        assert_eq!(
            reply.assert_error(400, None, None),
            strict,
            "{content_type:?}"
        );
    }
    assert_eq!(engine.probe.requests().len(), 6);
}

#[tokio::test]
async fn oversized_body_is_413() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            max_body_bytes: 1024,
            ..ApiConfig::default()
        },
    );
    let big = with(
        chat_body(),
        json!({"messages": [{"role": "user", "content": "x".repeat(4096)}]}),
    );
    let reply = post(&app, "/v1/chat/completions", big).await;
    let message = reply.assert_error(413, None, Some("request_too_large"));
    assert!(message.contains("1024 bytes"), "{message}");
    assert!(engine.probe.requests().is_empty());

    // Just under the limit still passes.
    let reply = post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn unknown_route_is_404_envelope() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    for path in ["/v1/audio/speech", "/nope", "/v1/models/"] {
        let reply = get(&app, path).await;
        let message = reply.assert_error(404, None, Some("unknown_url"));
        assert!(message.contains(path), "{message}");
    }
}

#[tokio::test]
async fn wrong_method_is_405_envelope() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let reply = get(&app, "/v1/chat/completions").await;
    let message = reply.assert_error(405, None, Some("method_not_allowed"));
    assert!(message.contains("GET"), "{message}");
    let reply = send(&app, json_request(Method::POST, "/v1/models", &json!({}))).await;
    reply.assert_error(405, None, Some("method_not_allowed"));
    let reply = send(
        &app,
        Request::delete("/healthz").body(Body::empty()).unwrap(),
    )
    .await;
    reply.assert_error(405, None, Some("method_not_allowed"));
}
