//! `POST /v1/chat/completions`: both response shapes and what reaches the engine.

use exo_api::{
    ApiConfig, ChatMessage as Message, FinishReason, GenerationError as EngineError,
    GenerationRequest, Prompt, SamplingParams,
};
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{app, app_with, chat_body, post, sse_chunks, sse_data, with};

#[tokio::test]
async fn non_streaming_response_has_openai_shape() {
    let engine = FakeEngine::new().build();
    let reply = post(&app(&engine), "/v1/chat/completions", chat_body()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let body = reply.json();
    assert!(
        body["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{body}"
    );
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "llama-3.2-1b");
    assert_eq!(
        body["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world!"},
            "logprobs": null,
            "finish_reason": "stop",
        }])
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
}

#[tokio::test]
async fn ids_differ_between_requests() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let first = post(&app, "/v1/chat/completions", chat_body()).await.json();
    let second = post(&app, "/v1/chat/completions", chat_body()).await.json();
    assert_ne!(first["id"], second["id"]);
}

#[tokio::test]
async fn length_finish_reason_is_reported() {
    let engine = FakeEngine::new()
        .finish_reason(FinishReason::Length)
        .build();
    let body = post(&app(&engine), "/v1/chat/completions", chat_body())
        .await
        .json();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_sends_role_then_deltas_then_finish_then_done() {
    let engine = FakeEngine::new().build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"stream": true})),
    )
    .await;
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    let chunks = sse_chunks(&reply);
    assert_eq!(chunks.len(), 5, "role, three pieces, finish: {chunks:?}");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["created"], chunks[0]["created"]);
        assert_eq!(chunk["model"], "llama-3.2-1b");
        assert!(
            chunk.get("usage").is_none(),
            "no usage unless asked: {chunk}"
        );
        assert_eq!(chunk["choices"].as_array().unwrap().len(), 1);
        assert_eq!(chunk["choices"][0]["index"], 0);
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    for (chunk, piece) in chunks[1..4].iter().zip(["Hello", ", wor", "ld!"]) {
        assert_eq!(chunk["choices"][0]["delta"], json!({"content": piece}));
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn streamed_chunks_assemble_to_the_non_streamed_content() {
    let engine = FakeEngine::new()
        .pieces(&["Zwei ", "Wörter", " — und ", "ein 🦀", "\nZeilenumbruch"])
        .build();
    let app = app(&engine);
    let whole = post(&app, "/v1/chat/completions", chat_body()).await.json();
    let streamed = sse_chunks(
        &post(
            &app,
            "/v1/chat/completions",
            with(chat_body(), json!({"stream": true})),
        )
        .await,
    );
    let assembled: String = streamed
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(assembled, whole["choices"][0]["message"]["content"]);
    assert_eq!(assembled, "Zwei Wörter — und ein 🦀\nZeilenumbruch");
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_and_null_usage_elsewhere() {
    let engine = FakeEngine::new().build();
    let chunks = sse_chunks(
        &post(
            &app(&engine),
            "/v1/chat/completions",
            with(
                chat_body(),
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        )
        .await,
    );
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10})
    );
    assert_eq!(rest.len(), 5);
    for chunk in rest {
        assert_eq!(chunk["usage"], Value::Null, "{chunk}");
        assert!(
            chunk.get("usage").is_some(),
            "usage is present as null: {chunk}"
        );
    }
}

#[tokio::test]
async fn request_fields_reach_the_engine() {
    let engine = FakeEngine::new().build();
    let body = json!({
        "model": "llama-3.2-1b",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "Again", "name": "bob"},
        ],
        "max_tokens": 50,
        "max_completion_tokens": 20,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 42,
        "stop": "\n\n",
        "n": 1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"7": -100, "12": 3.5},
        "logprobs": false,
        "user": "someone",
        "metadata": {"anything": "goes"},
    });
    let reply = post(&app(&engine), "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let message = |role: &str, content: &str| Message::new(role, content);
    assert_eq!(
        engine.probe.requests(),
        vec![GenerationRequest {
            logprobs: None,
            embed: false,
            prompt_logprobs: None,
            penalties: exo_api::Penalties {
                presence: 0.5,
                frequency: -0.25,
                logit_bias: vec![(7, -100.0), (12, 3.5)],
            },
            constraint: None,
            tools: Vec::new(),
            share_prefill: None,
            model: "llama-3.2-1b".into(),
            prompt: Prompt::Chat(vec![
                message("system", "Be brief."),
                message("user", "Hi\nthere"),
                message("assistant", ""),
                message("user", "Again"),
            ]),
            max_tokens: Some(20),
            sampling: SamplingParams {
                temperature: 0.5,
                top_p: 0.9,
                top_k: 0,
                seed: 42,
            },
            stop: vec!["\n\n".into()],
            ignore_eos: false,
        }]
    );
}

#[tokio::test]
async fn defaults_reach_the_engine_and_configured_max_tokens_applies() {
    let engine = FakeEngine::new().build();
    let config = ApiConfig {
        default_max_tokens: Some(256),
        ..ApiConfig::default()
    };
    let app = app_with(&engine, config);
    post(&app, "/v1/chat/completions", chat_body()).await;
    post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"max_tokens": 3, "stop": ["a", "b"]})),
    )
    .await;
    let requests = engine.probe.requests();
    assert_eq!(requests[0].max_tokens, Some(256));
    assert_eq!(requests[0].sampling.temperature, 1.0);
    assert_eq!(requests[0].sampling.top_p, 1.0);
    // Without a seed each request samples differently, as OpenAI's API does.
    assert_ne!(requests[0].sampling.seed, requests[1].sampling.seed);
    assert!(requests[0].stop.is_empty());
    assert_eq!(requests[1].max_tokens, Some(3));
    assert_eq!(requests[1].stop, vec!["a".to_owned(), "b".to_owned()]);
}

#[tokio::test]
async fn engine_error_before_the_first_chunk_is_an_http_error() {
    let engine = FakeEngine::new()
        .start_error(EngineError::Unavailable(
            "not enough memory across nodes: need 3.1 GiB, have 2.0 GiB".into(),
        ))
        .build();
    let app = app(&engine);
    for stream in [false, true] {
        let reply = post(
            &app,
            "/v1/chat/completions",
            with(chat_body(), json!({"stream": stream})),
        )
        .await;
        let message = reply.assert_error(503, None, Some("service_unavailable"));
        let id = reply.header("x-request-id").unwrap();
        assert!(id.starts_with("req_"), "{id}");
        assert_eq!(
            message,
            format!("not enough memory across nodes: need 3.1 GiB, have 2.0 GiB (request {id})")
        );
    }
}

#[tokio::test]
async fn engine_error_on_the_first_item_of_a_stream_is_an_http_error() {
    let engine = FakeEngine::new().error_at(0, EngineError::Busy).build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"stream": true})),
    )
    .await;
    reply.assert_error(429, None, Some("rate_limit_exceeded"));
}

#[tokio::test]
async fn engine_error_mid_stream_is_an_error_event_without_done() {
    let engine = FakeEngine::new()
        .error_at(
            2,
            EngineError::Unavailable("node desktop left the cluster".into()),
        )
        .build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"stream": true})),
    )
    .await;
    assert_eq!(reply.status, 200);
    let id = reply.header("x-request-id").unwrap().to_owned();
    let data = sse_data(&reply.text());
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(
        last,
        json!({"error": {
            "message": format!("node desktop left the cluster (request {id})"),
            "type": "server_error",
            "param": null,
            "code": "service_unavailable",
        }})
    );
    // Role chunk and the two pieces before the failure came first.
    assert_eq!(data.len(), 4, "{data:?}");
}

#[tokio::test]
async fn engine_error_mid_non_streamed_generation_is_an_http_error() {
    let engine = FakeEngine::new()
        .error_at(1, EngineError::Internal("stage 2 returned NaN".into()))
        .build();
    let reply = post(&app(&engine), "/v1/chat/completions", chat_body()).await;
    let message = reply.assert_error(500, None, None);
    let id = reply.header("x-request-id").unwrap();
    assert_eq!(
        message,
        format!("internal error, see the node's log (request {id})")
    );
    assert!(!reply.text().contains("NaN"));
}

#[tokio::test]
async fn a_failed_stage_is_told_to_clients_without_node_ids_or_addresses() {
    use exo_core::{Epoch, FailureKind, LayerRange, NodeId, StageFailure};
    for (kind, status, says) in [
        (FailureKind::Lost, 503, "went away"),
        (FailureKind::Unresponsive, 503, "stopped answering"),
        (FailureKind::Failed, 503, "failed while computing"),
    ] {
        let failure = StageFailure {
            node: NodeId::from("12D3KooWSecretNodeId"),
            stage: 1,
            layers: LayerRange::new(5, 23),
            epoch: Epoch::from_hash(0xbeef),
            kind,
            reason: "node at http://10.0.0.7:52417: connection reset".into(),
        };
        let engine = FakeEngine::new()
            .error_at(1, EngineError::StageFailed(failure))
            .build();
        for stream in [false, true] {
            let reply = post(
                &app(&engine),
                "/v1/chat/completions",
                with(chat_body(), json!({"stream": stream})),
            )
            .await;
            let text = reply.text();
            for secret in ["12D3KooW", "10.0.0.7", "52417", "5..23", "beef"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
            assert!(text.contains(says), "{text}");
            let id = reply.header("x-request-id").unwrap();
            assert!(text.contains(&format!("(request {id})")), "{text}");
            if !stream {
                assert_eq!(reply.status.as_u16(), status);
            }
        }
    }
}

#[tokio::test]
async fn engine_errors_map_to_statuses() {
    let cases = [
        (
            EngineError::ContextExceeded {
                prompt_tokens: 100,
                max_tokens: 9000,
                context_length: 8192,
            },
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            EngineError::ContextExceeded {
                prompt_tokens: 9000,
                max_tokens: 16,
                context_length: 8192,
            },
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            EngineError::Invalid {
                param: Some("stop".into()),
                message: "stop strings longer than 64 bytes are not supported".into(),
            },
            400,
            Some("stop"),
            None,
        ),
        (EngineError::Busy, 429, None, Some("rate_limit_exceeded")),
        (EngineError::Internal("oops".into()), 500, None, None),
    ];
    for (error, status, param, code) in cases {
        let engine = FakeEngine::new().start_error(error.clone()).build();
        let reply = post(&app(&engine), "/v1/chat/completions", chat_body()).await;
        let message = reply.assert_error(status, param, code);
        if status == 400 {
            assert_eq!(message, error.to_string());
        }
    }
}

#[tokio::test]
async fn busy_engine_response_says_when_to_retry() {
    let engine = FakeEngine::new().start_error(EngineError::Busy).build();
    let reply = post(&app(&engine), "/v1/chat/completions", chat_body()).await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("retry-after"), Some("1"));
}

#[tokio::test]
async fn unknown_model_is_404_listing_available_models() {
    let engine = FakeEngine::new().build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"model": "gpt-4o"})),
    )
    .await;
    let message = reply.assert_error(404, Some("model"), Some("model_not_found"));
    assert!(message.contains("gpt-4o"), "{message}");
    assert!(
        message.contains("llama-3.2-1b, meta-llama/Llama-3.2-1B"),
        "{message}"
    );
}

#[tokio::test]
async fn n_choices_are_generations_with_their_own_seeds() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let body = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"n": 3, "seed": 10})),
    )
    .await
    .json();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], "Hello, world!");
    }
    // The prompt counts once, every choice's tokens count.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16})
    );
    let seeds: Vec<u64> = engine
        .probe
        .requests()
        .iter()
        .map(|r| r.sampling.seed)
        .collect();
    assert_eq!(seeds, vec![10, 11, 12]);
    // One key marks them choices of one answer, so that the engine may share their prefill.
    let keys: Vec<Option<u64>> = engine
        .probe
        .requests()
        .iter()
        .map(|r| r.share_prefill)
        .collect();
    assert!(
        keys[0].is_some() && keys.iter().all(|k| *k == keys[0]),
        "{keys:?}"
    );
    post(&app, "/v1/chat/completions", chat_body()).await;
    assert_eq!(engine.probe.requests()[3].share_prefill, None);

    // Streamed: each choice's chunks carry its index, and one [DONE] ends them all.
    let reply = post(
        &app,
        "/v1/chat/completions",
        with(
            chat_body(),
            json!({"n": 2, "stream": true, "stream_options": {"include_usage": true}}),
        ),
    )
    .await;
    let chunks = sse_chunks(&reply);
    for index in 0..2 {
        let text: String = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == index)
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello, world!", "choice {index}");
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6, "{usage}");
    assert_eq!(reply.text().matches("[DONE]").count(), 1);

    // More choices than the server runs at once cannot be served together.
    let reply = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"n": 17})),
    )
    .await;
    reply.assert_error(400, Some("n"), None);
}

#[tokio::test]
async fn logprobs_come_in_openais_shapes() {
    let engine = FakeEngine::new().pieces(&["Hel", "lo"]).build();
    let app = app(&engine);
    let body = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"logprobs": true, "top_logprobs": 2})),
    )
    .await
    .json();
    assert_eq!(engine.probe.requests()[0].logprobs, Some(2));
    let content = &body["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 2);
    assert_eq!(content[0]["token"], "Hel");
    assert_eq!(content[0]["logprob"], -0.5);
    assert_eq!(content[0]["bytes"], json!([72, 101, 108]));
    assert_eq!(content[0]["top_logprobs"][1]["token"], "alt1");
    assert_eq!(content[0]["top_logprobs"][1]["logprob"], -2.0);

    // Streamed: each token's entry rides with the chunk of its text.
    let reply = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"logprobs": true, "stream": true})),
    )
    .await;
    let tokens: Vec<String> = sse_chunks(&reply)
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .map(|e| e["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tokens, ["Hel", "lo"]);

    // Legacy completions: the parallel lists, with each token's offset in the text.
    let body = post(
        &app,
        "/v1/completions",
        json!({"model": "llama-3.2-1b", "prompt": "x", "logprobs": 1}),
    )
    .await
    .json();
    let logprobs = &body["choices"][0]["logprobs"];
    assert_eq!(logprobs["tokens"], json!(["Hel", "lo"]));
    assert_eq!(logprobs["token_logprobs"], json!([-0.5, -0.5]));
    assert_eq!(
        logprobs["top_logprobs"],
        json!([{"alt0": -1.0}, {"alt0": -1.0}])
    );
    assert_eq!(logprobs["text_offset"], json!([0, 3]));
    // Without asking, none.
    let body = post(&app, "/v1/chat/completions", chat_body()).await.json();
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
}
