//! `POST /v1/completions`, the legacy text completions.

use exo_api::Prompt;
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{app, completion_body, post, sse_chunks, with};

#[tokio::test]
async fn non_streaming_response_has_openai_shape() {
    let engine = FakeEngine::new().build();
    let reply = post(&app(&engine), "/v1/completions", completion_body()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"), "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "llama-3.2-1b");
    assert!(body["created"].as_u64().is_some());
    assert_eq!(
        body["choices"],
        json!([{"text": "Hello, world!", "index": 0, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(body["usage"]["total_tokens"], 10);
    assert_eq!(
        engine.probe.requests()[0].prompt,
        Prompt::Text("Once upon a time".into())
    );
}

#[tokio::test]
async fn stream_sends_text_chunks_then_finish_then_usage_then_done() {
    let engine = FakeEngine::new().build();
    let chunks = sse_chunks(
        &post(
            &app(&engine),
            "/v1/completions",
            with(
                completion_body(),
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await,
    );
    assert_eq!(chunks.len(), 5, "three pieces, finish, usage: {chunks:?}");
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
        assert_eq!(chunk["id"], chunks[0]["id"]);
    }
    let texts: Vec<&str> = chunks[..3]
        .iter()
        .map(|chunk| chunk["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["Hello", ", wor", "ld!"]);
    for chunk in &chunks[..3] {
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunk["usage"], Value::Null);
    }
    assert_eq!(
        chunks[3]["choices"],
        json!([{"text": "", "index": 0, "logprobs": null, "finish_reason": "stop"}])
    );
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
}

#[tokio::test]
async fn prompt_may_be_an_array_of_one_string() {
    let engine = FakeEngine::new().build();
    let reply = post(
        &app(&engine),
        "/v1/completions",
        with(completion_body(), json!({"prompt": ["In the beginning"]})),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        engine.probe.requests()[0].prompt,
        Prompt::Text("In the beginning".into())
    );
}

#[tokio::test]
async fn unsupported_prompts_and_options_are_400() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let cases = [
        (json!({"prompt": ["a", "b"]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [1, -2, 3]}), "prompt"),
        (json!({"prompt": [1.5]}), "prompt"),
        (json!({"prompt": [[1, 2], [3]]}), "prompt"),
        (json!({"prompt": [[]]}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"best_of": 3}), "best_of"),
        (json!({"suffix": "the end"}), "suffix"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"n": 99}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
    ];
    for (fields, param) in cases {
        let reply = post(
            &app,
            "/v1/completions",
            with(completion_body(), fields.clone()),
        )
        .await;
        let message = reply.assert_error(400, Some(param), None);
        assert!(!message.is_empty(), "{fields}");
    }
    let mut missing = completion_body();
    missing.as_object_mut().unwrap().remove("prompt");
    let reply = post(&app, "/v1/completions", missing).await;
    reply.assert_error(400, Some("prompt"), None);
    assert!(engine.probe.requests().is_empty());

    // The neutral values of the unsupported options are accepted.
    let neutral = json!({"echo": false, "best_of": 1, "suffix": null, "logprobs": null});
    let reply = post(&app, "/v1/completions", with(completion_body(), neutral)).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn context_overflow_blames_the_prompt_field() {
    let engine = FakeEngine::new()
        .start_error(exo_api::GenerationError::ContextExceeded {
            prompt_tokens: 10_000,
            max_tokens: 16,
            context_length: 8192,
        })
        .build();
    let reply = post(&app(&engine), "/v1/completions", completion_body()).await;
    reply.assert_error(400, Some("prompt"), Some("context_length_exceeded"));
}

#[tokio::test]
async fn echo_begins_the_text_with_the_prompt_and_scores_its_tokens_with_logprobs() {
    let engine = FakeEngine::new().pieces(&["Hel", "lo"]).build();
    let app = app(&engine);
    // Without logprobs: the prompt, then the answer; nothing asks the engine to score it.
    let body = post(
        &app,
        "/v1/completions",
        json!({"model": "llama-3.2-1b", "prompt": "Prompt", "echo": true}),
    )
    .await
    .json();
    assert_eq!(body["choices"][0]["text"], "PromptHello");
    assert_eq!(engine.probe.requests().pop().unwrap().prompt_logprobs, None);

    // With logprobs: the prompt's tokens lead the lists, the first with null (nothing before
    // it predicts it), and the offsets run on through the answer.
    let ask = json!({"model": "llama-3.2-1b", "prompt": "Prompt", "echo": true, "logprobs": 1});
    let body = post(&app, "/v1/completions", ask.clone()).await.json();
    assert_eq!(
        engine.probe.requests().pop().unwrap().prompt_logprobs,
        Some(1)
    );
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "PromptHello");
    let logprobs = &choice["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["P", "rompt", "Hel", "lo"]));
    assert_eq!(logprobs["token_logprobs"], json!([null, -0.25, -0.5, -0.5]));
    assert_eq!(
        logprobs["top_logprobs"],
        json!([null, {"alt0": -1.0}, {"alt0": -1.0}, {"alt0": -1.0}])
    );
    assert_eq!(logprobs["text_offset"], json!([0, 1, 6, 9]));

    // Streamed: the first chunk is the prompt with its tokens' log-probabilities.
    let reply = post(&app, "/v1/completions", with(ask, json!({"stream": true}))).await;
    let chunks = sse_chunks(&reply);
    assert_eq!(chunks[0]["choices"][0]["text"], "Prompt");
    let first = &chunks[0]["choices"][0]["logprobs"];
    assert_eq!(first["tokens"], json!(["P", "rompt"]));
    assert_eq!(first["token_logprobs"], json!([null, -0.25]));
    assert_eq!(first["text_offset"], json!([0, 1]));
    let texts: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(texts, "PromptHello");
    assert_eq!(
        chunks[1]["choices"][0]["logprobs"]["text_offset"],
        json!([6])
    );
}

#[tokio::test]
async fn a_prompt_of_token_ids_reaches_the_engine_as_ids_and_echoes_as_their_texts() {
    let engine = FakeEngine::new().pieces(&["Hel", "lo"]).build();
    let app = app(&engine);
    for prompt in [json!([5, 6]), json!([[5, 6]])] {
        let body = post(
            &app,
            "/v1/completions",
            json!({"model": "llama-3.2-1b", "prompt": prompt, "echo": true}),
        )
        .await
        .json();
        let request = engine.probe.requests().pop().unwrap();
        assert_eq!(request.prompt, Prompt::Tokens(vec![5, 6]));
        // Echoed without logprobs: the texts come from the engine's scores, which are not
        // shown.
        assert_eq!(request.prompt_logprobs, Some(0));
        assert_eq!(body["choices"][0]["text"], "PromptHello");
        assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    }
}
