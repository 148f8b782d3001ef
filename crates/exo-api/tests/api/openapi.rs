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
    let envelope = resolve(
        &document,
        &document["components"]["schemas"]["ErrorResponse"]["properties"]["error"],
    );
    let required: Vec<&Value> = envelope["required"].as_array().unwrap().iter().collect();
    assert_eq!(required.len(), 4);
}

/// `schema`, or the component its `$ref` names.
fn resolve<'d>(document: &'d Value, schema: &'d Value) -> &'d Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let name = reference.trim_start_matches("#/components/schemas/");
            &document["components"]["schemas"][name]
        }
        None => schema,
    }
}

/// Where `value` breaks `schema` (the JSON Schema keywords the document uses), if anywhere:
/// a wrong type, a missing required property, a value outside an `enum`, or a property the
/// schema does not declare.
fn violation(document: &Value, schema: &Value, value: &Value, at: &str) -> Option<String> {
    let schema = resolve(document, schema);
    if let Some(all) = schema["allOf"].as_array() {
        // Parts of one object: each checks its own properties, none the others'.
        let mut merged = serde_json::Map::new();
        let mut required = Vec::new();
        for part in all {
            let part = resolve(document, part);
            merged.extend(part["properties"].as_object().cloned().unwrap_or_default());
            required.extend(part["required"].as_array().cloned().unwrap_or_default());
        }
        let object =
            serde_json::json!({"type": "object", "properties": merged, "required": required});
        return violation(document, &object, value, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        return match options
            .iter()
            .any(|o| violation(document, o, value, at).is_none())
        {
            true => None,
            false => Some(format!("{at}: {value} matches none of {schema}")),
        };
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        return Some(format!("{at}: {value} is not one of {allowed:?}"));
    }
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let fits = types.is_empty()
        || types.contains(&kind)
        || (kind == "integer" && types.contains(&"number"));
    if !fits {
        return Some(format!("{at}: {value} is not {types:?}"));
    }
    match value {
        Value::Object(fields) => {
            let properties = schema["properties"].as_object();
            for name in schema["required"].as_array().into_iter().flatten() {
                let name = name.as_str().unwrap_or_default();
                if !fields.contains_key(name) {
                    return Some(format!("{at}: no required '{name}' in {value}"));
                }
            }
            for (name, field) in fields {
                let here = format!("{at}.{name}");
                match properties.and_then(|p| p.get(name)) {
                    Some(property) => {
                        if let Some(problem) = violation(document, property, field, &here) {
                            return Some(problem);
                        }
                    }
                    None if properties.is_some() => {
                        return Some(format!("{here} is not in the schema"));
                    }
                    None => {}
                }
            }
            None
        }
        Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let schema = &schema["items"];
            (!schema.is_null())
                .then(|| violation(document, schema, item, &format!("{at}[{i}]")))
                .flatten()
        }),
        _ => None,
    }
}

/// Every body the OpenAI routes send, whole and streamed, with tools, log-probabilities and
/// usage, and their errors, follows the schema the document derives for it.
#[tokio::test]
async fn answers_follow_the_documented_schemas() {
    use crate::support::{post, sse_chunks, with};
    use serde_json::json;
    let document = exo_api::openapi();
    let schema = |name: &str| document["components"]["schemas"][name].clone();
    let check = |name: &str, value: &Value| {
        if let Some(problem) = violation(&document, &schema(name), value, name) {
            panic!("{problem}");
        }
    };
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let engine = FakeEngine::new()
        .pieces(&[
            "Sure. ",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call>",
        ])
        .build();
    let app = app(&engine);
    for extra in [
        json!({}),
        json!({"tools": weather, "n": 2}),
        json!({"logprobs": true, "top_logprobs": 2}),
    ] {
        let reply = post(
            &app,
            "/v1/chat/completions",
            with(chat_body(), extra.clone()),
        )
        .await;
        check("ChatCompletion", &reply.json());
        let mut streamed = extra.clone();
        streamed["stream"] = json!(true);
        streamed["stream_options"] = json!({"include_usage": true});
        let reply = post(&app, "/v1/chat/completions", with(chat_body(), streamed)).await;
        for chunk in sse_chunks(&reply) {
            check("ChatCompletionChunk", &chunk);
        }
    }
    for extra in [json!({}), json!({"logprobs": 2, "echo": true})] {
        let reply = post(
            &app,
            "/v1/completions",
            with(completion_body(), extra.clone()),
        )
        .await;
        check("Completion", &reply.json());
        let mut streamed = extra;
        streamed["stream"] = json!(true);
        let reply = post(&app, "/v1/completions", with(completion_body(), streamed)).await;
        for chunk in sse_chunks(&reply) {
            check("Completion", &chunk);
        }
    }
    check("ModelList", &get(&app, "/v1/models").await.json());
    check("ClusterView", &get(&app, "/v1/cluster").await.json());
    check("Health", &get(&app, "/healthz").await.json());
    check("Readiness", &get(&app, "/readyz").await.json());
    check("Model", &get(&app, "/v1/models/llama-3.2-1b").await.json());
    let reply = post(
        &app,
        "/v1/chat/completions",
        json!({"model": "llama-3.2-1b", "messages": [{"role": 3}]}),
    )
    .await;
    assert_eq!(reply.status, 400);
    check("ErrorResponse", &reply.json());
    // Anthropic's dialect: the message, every streamed event (text and a call), an error.
    let anthropic = json!({
        "model": "llama-3.2-1b",
        "max_tokens": 32,
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "Weather?"}],
    });
    check("AnthropicRequest", &anthropic);
    let reply = post(&app, "/v1/messages", anthropic.clone()).await;
    check("AnthropicMessage", &reply.json());
    let mut streamed = anthropic.clone();
    streamed["stream"] = json!(true);
    let reply = post(&app, "/v1/messages", streamed).await;
    let events = crate::support::sse_data(&reply.text());
    assert!(events.len() > 5, "{events:?}");
    for data in events {
        check("AnthropicEvent", &serde_json::from_str(&data).unwrap());
    }
    // The check can fail: an event of no documented type, or one missing a field, does not pass.
    for wrong in [
        json!({"type": "message_stopped"}),
        json!({"type": "content_block_stop"}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}),
    ] {
        assert!(
            violation(&document, &schema("AnthropicEvent"), &wrong, "e").is_some(),
            "{wrong}"
        );
    }
    let reply = post(&app, "/v1/messages", json!({"model": "llama-3.2-1b"})).await;
    assert_eq!(reply.status, 400);
    check("AnthropicError", &reply.json());
    // The Responses dialect: the response, every streamed event (text and a call).
    let responses = json!({
        "model": "llama-3.2-1b",
        "input": [{"role": "user", "content": "Weather?"}],
        "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
    });
    check("ResponsesRequest", &responses);
    let reply = post(&app, "/v1/responses", responses.clone()).await;
    check("ResponseObject", &reply.json());
    let mut streamed = responses;
    streamed["stream"] = json!(true);
    let reply = post(&app, "/v1/responses", streamed).await;
    let events = crate::support::sse_data(&reply.text());
    assert!(events.len() > 8, "{events:?}");
    for data in events {
        check("ResponseEvent", &serde_json::from_str(&data).unwrap());
    }
    // Ollama's dialect: whole and streamed lines (with a call), the lists, show, version,
    // embeddings, an error.
    let ollama = json!({
        "model": "llama-3.2-1b",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": weather,
        "options": {"temperature": 0},
        "stream": false,
    });
    check("OllamaChatRequest", &ollama);
    check(
        "OllamaChatLine",
        &post(&app, "/api/chat", ollama.clone()).await.json(),
    );
    let mut streamed = ollama;
    streamed["stream"] = json!(true);
    let reply = post(&app, "/api/chat", streamed).await;
    for line in reply.text().lines() {
        check("OllamaChatLine", &serde_json::from_str(line).unwrap());
    }
    let generate = json!({"model": "llama-3.2-1b", "prompt": "Hi", "stream": true});
    check("OllamaGenerateRequest", &generate);
    let reply = post(&app, "/api/generate", generate).await;
    for line in reply.text().lines() {
        check("OllamaGenerateLine", &serde_json::from_str(line).unwrap());
    }
    let load = json!({"model": "llama-3.2-1b", "prompt": ""});
    check(
        "OllamaGenerateLine",
        &post(&app, "/api/generate", load).await.json(),
    );
    check("OllamaModels", &get(&app, "/api/tags").await.json());
    check("OllamaModels", &get(&app, "/api/ps").await.json());
    check("OllamaVersion", &get(&app, "/api/version").await.json());
    let show = json!({"model": "llama-3.2-1b"});
    check(
        "OllamaShowResponse",
        &post(&app, "/api/show", show).await.json(),
    );
    let reply = post(&app, "/api/chat", json!({"model": "gpt-9", "messages": []})).await;
    check("OllamaError", &reply.json());
    // And what the document says a request is, a request is.
    check(
        "ChatCompletionRequest",
        &with(
            chat_body(),
            json!({"tools": weather, "stop": ["x"], "seed": -1}),
        ),
    );
    check("CompletionRequest", &completion_body());
}
