//! `POST /v1/embeddings` and Ollama's `/api/embed` and `/api/embeddings`: one embedding
//! request per input, in order, their widths and base64, and errors that name the field.

use std::sync::atomic::Ordering;

use exo_api::{ApiConfig, GenerationError, Prompt};
use serde_json::json;

use crate::fake::{FakeEngine, fake_embedding};
use crate::support::{app, app_with, post};

fn expected(text: &str) -> Vec<f32> {
    fake_embedding(&Prompt::Text(text.to_owned()))
}

fn floats(value: &serde_json::Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn each_input_is_embedded_as_text_in_order() {
    let engine = FakeEngine::new().build();
    let config = ApiConfig {
        max_concurrent: 2,
        ..ApiConfig::default()
    };
    let texts = ["a", "bb", "ccc", "dddd", "eeeee"];
    let reply = post(
        &app_with(&engine, config),
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": texts}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "llama-3.2-1b");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    for (i, (item, text)) in data.iter().zip(texts).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        assert_eq!(floats(&item["embedding"]), expected(text), "input {i}");
    }
    // The fake counts 7 prompt tokens per request.
    assert_eq!(body["usage"]["prompt_tokens"], 7 * texts.len());
    assert_eq!(body["usage"]["total_tokens"], 7 * texts.len());
    // Each input is a request of its own, as plain text, generating nothing, at most
    // --max-concurrent at a time.
    let requests = engine.probe.requests();
    assert_eq!(requests.len(), texts.len());
    for request in &requests {
        assert!(request.embed);
        assert_eq!(request.model, "llama-3.2-1b");
        assert!(matches!(request.prompt, Prompt::Text(_)));
    }
    assert!(engine.probe.peak.load(Ordering::SeqCst) <= 2);
}

#[tokio::test]
async fn base64_is_little_endian_f32_and_dimensions_must_be_the_models() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let reply = post(
        &app,
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": "abc", "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let encoded = reply.json()["data"][0]["embedding"]
        .as_str()
        .unwrap()
        .to_owned();
    // 2 floats = 8 bytes = 12 base64 characters with one '='.
    assert_eq!(encoded.len(), 12);
    assert!(encoded.ends_with('='));

    let reply = post(
        &app,
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": "abc", "dimensions": 2}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = post(
        &app,
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": "abc", "dimensions": 1}),
    )
    .await;
    let message = reply.assert_error(400, Some("dimensions"), None);
    assert!(message.contains("have 2 dimensions"), "{message}");
    let reply = post(
        &app,
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": "abc", "encoding_format": "int8"}),
    )
    .await;
    reply.assert_error(400, Some("encoding_format"), None);
}

#[tokio::test]
async fn bad_inputs_and_engine_errors_are_openai_errors() {
    let engine = FakeEngine::new().build();
    let router = app(&engine);
    for (input, needle) in [
        (json!([1, 2, 3]), "token ids"),
        (json!([]), "at least one"),
        (json!(["a", ""]), "'input[1]' is empty"),
        (json!(7), "must be a string or an array"),
    ] {
        let reply = post(
            &router,
            "/v1/embeddings",
            json!({"model": "llama-3.2-1b", "input": input}),
        )
        .await;
        let message = reply.assert_error(400, Some("input"), None);
        assert!(message.contains(needle), "{message}");
    }
    assert!(engine.probe.requests().is_empty());
    let reply = post(&router, "/v1/embeddings", json!({"input": "a"})).await;
    reply.assert_error(400, Some("model"), None);
    let reply = post(
        &router,
        "/v1/embeddings",
        json!({"model": "nope", "input": "a"}),
    )
    .await;
    reply.assert_error(404, Some("model"), Some("model_not_found"));

    // A text longer than the context is the input's fault.
    let engine = FakeEngine::new()
        .start_error(GenerationError::ContextExceeded {
            prompt_tokens: 9000,
            max_tokens: 0,
            context_length: 8192,
        })
        .build();
    let reply = post(
        &app(&engine),
        "/v1/embeddings",
        json!({"model": "llama-3.2-1b", "input": ["a", "b"]}),
    )
    .await;
    reply.assert_error(400, Some("input"), Some("context_length_exceeded"));
}

#[tokio::test]
async fn ollama_embed_and_the_older_embeddings_answer_in_ollamas_shape() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let reply = post(
        &app,
        "/api/embed",
        json!({"model": "llama-3.2-1b:latest", "input": ["hi", "there"]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["model"], "llama-3.2-1b:latest");
    let embeddings = body["embeddings"].as_array().unwrap();
    assert_eq!(floats(&embeddings[0]), expected("hi"));
    assert_eq!(floats(&embeddings[1]), expected("there"));
    assert_eq!(body["prompt_eval_count"], 14);
    assert!(body["total_duration"].as_u64().is_some());
    // `:latest` names the served model.
    assert!(
        engine
            .probe
            .requests()
            .iter()
            .all(|r| r.model == "llama-3.2-1b")
    );

    let reply = post(
        &app,
        "/api/embeddings",
        json!({"model": "llama-3.2-1b", "prompt": "hello"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(floats(&reply.json()["embedding"]), expected("hello"));

    let reply = post(&app, "/api/embed", json!({"model": "llama-3.2-1b"})).await;
    assert_eq!(reply.status, 400);
    let error = reply.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("input"), "{error}");
}
