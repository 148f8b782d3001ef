//! Ollama's dialect (`/api/*`) over the same fake engine: NDJSON streams, whole answers,
//! the model list and Ollama's `{"error": ...}` shape.

use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use exo_api::{ApiConfig, FinishReason, GenerationError, Prompt};
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{Reply, app, app_with, get, post, send, with};

fn chat_body() -> Value {
    json!({
        "model": "llama-3.2-1b",
        "messages": [{"role": "user", "content": "Say hello"}],
    })
}

/// The NDJSON lines of a streamed answer, each parsed.
#[track_caller]
fn ndjson(reply: &Reply) -> Vec<Value> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/x-ndjson"));
    let text = reply.text();
    assert!(text.ends_with('\n'), "{text}");
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// Asserts Ollama's error shape with this status; returns the message.
#[track_caller]
fn assert_ollama_error(reply: &Reply, status: u16) -> String {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let message = body["error"].as_str().unwrap().to_owned();
    assert!(!message.is_empty());
    message
}

#[track_caller]
fn assert_done_line(line: &Value, reason: &str, prompt_tokens: u64, completion_tokens: u64) {
    assert_eq!(line["done"], true, "{line}");
    assert_eq!(line["done_reason"], reason, "{line}");
    assert_eq!(line["prompt_eval_count"], prompt_tokens, "{line}");
    assert_eq!(line["eval_count"], completion_tokens, "{line}");
    for duration in [
        "total_duration",
        "load_duration",
        "prompt_eval_duration",
        "eval_duration",
    ] {
        assert!(line[duration].is_u64(), "{duration}: {line}");
    }
    assert!(line["total_duration"].as_u64().unwrap() > 0, "{line}");
}

#[tokio::test]
async fn chat_streams_ndjson_by_default() {
    let engine = FakeEngine::new().build();
    let reply = post(&app(&engine), "/api/chat", chat_body()).await;
    let lines = ndjson(&reply);
    let (last, pieces) = lines.split_last().unwrap();
    let mut text = String::new();
    for line in pieces {
        assert_eq!(line["model"], "llama-3.2-1b");
        assert_eq!(line["done"], false, "{line}");
        assert_eq!(line["message"]["role"], "assistant");
        assert!(
            line["created_at"].as_str().unwrap().ends_with('Z'),
            "{line}"
        );
        text.push_str(line["message"]["content"].as_str().unwrap());
    }
    assert_eq!(text, "Hello, world!");
    assert_eq!(pieces.len(), 3);
    assert_done_line(last, "stop", 7, 3);
    assert_eq!(last["message"], json!({"role": "assistant", "content": ""}));

    let requests = engine.probe.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(
        request.prompt,
        Prompt::Chat(vec![exo_api::ChatMessage::new("user", "Say hello")])
    );
    // Ollama's defaults when no options are given.
    assert_eq!(request.sampling.top_k, 40);
    assert!((request.sampling.temperature - 0.8).abs() < 1e-6);
}

#[tokio::test]
async fn chat_without_streaming_answers_one_object_and_maps_options() {
    let engine = FakeEngine::new()
        .finish_reason(FinishReason::Length)
        .build();
    let body = with(
        chat_body(),
        json!({
            "stream": false,
            "options": {"temperature": 0, "top_p": 0.5, "top_k": 5, "seed": 42,
                        "num_predict": 8, "stop": ["\n\n"], "num_ctx": 4096},
            "keep_alive": "5m",
        }),
    );
    let reply = post(&app(&engine), "/api/chat", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let answer = reply.json();
    assert_eq!(answer["model"], "llama-3.2-1b");
    assert_eq!(
        answer["message"],
        json!({"role": "assistant", "content": "Hello, world!"})
    );
    assert_done_line(&answer, "length", 7, 3);

    let request = &engine.probe.requests()[0];
    assert_eq!(request.max_tokens, Some(8));
    assert_eq!(request.sampling.temperature, 0.0);
    assert_eq!(request.sampling.top_p, 0.5);
    assert_eq!(request.sampling.top_k, 5);
    assert_eq!(request.sampling.seed, 42);
    assert_eq!(request.stop, ["\n\n"]);
}

#[tokio::test]
async fn generate_answers_in_response_with_the_system_prompt_and_raw_mode() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let body = json!({"model": "llama-3.2-1b", "prompt": "Why?", "system": "Be brief"});
    let lines = ndjson(&post(&app, "/api/generate", body).await);
    let (last, pieces) = lines.split_last().unwrap();
    let text: String = pieces
        .iter()
        .map(|line| line["response"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello, world!");
    assert!(pieces.iter().all(|line| line.get("message").is_none()));
    assert_done_line(last, "stop", 7, 3);
    assert_eq!(last["response"], "");

    let whole = post(
        &app,
        "/api/generate",
        json!({"model": "llama-3.2-1b", "prompt": "<s>Why?", "raw": true, "stream": false}),
    )
    .await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
    assert_eq!(whole.json()["response"], "Hello, world!");

    let requests = engine.probe.requests();
    assert_eq!(
        requests[0].prompt,
        Prompt::Chat(vec![
            exo_api::ChatMessage::new("system", "Be brief"),
            exo_api::ChatMessage::new("user", "Why?"),
        ])
    );
    assert_eq!(requests[1].prompt, Prompt::Raw("<s>Why?".into()));
}

#[tokio::test]
async fn an_empty_prompt_loads_the_model_without_generating() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let reply = post(
        &app,
        "/api/generate",
        json!({"model": "llama-3.2-1b", "prompt": ""}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["done"], true);
    assert_eq!(answer["done_reason"], "load");
    assert_eq!(answer["response"], "");
    let chat = post(
        &app,
        "/api/chat",
        json!({"model": "llama-3.2-1b", "messages": []}),
    )
    .await;
    assert_eq!(chat.json()["done_reason"], "load");
    assert!(engine.probe.requests().is_empty());

    // Loading a model that is not served is still a 404.
    let unknown = post(&app, "/api/generate", json!({"model": "gpt-9"})).await;
    assert_ollama_error(&unknown, 404);
}

#[tokio::test]
async fn the_latest_tag_names_the_untagged_model() {
    let engine = FakeEngine::new().build();
    let body = with(
        chat_body(),
        json!({"model": "llama-3.2-1b:latest", "stream": false}),
    );
    let reply = post(&app(&engine), "/api/chat", body).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["model"], "llama-3.2-1b:latest");
    assert_eq!(engine.probe.requests()[0].model, "llama-3.2-1b");
}

#[tokio::test]
async fn tags_show_ps_and_version_describe_the_served_models() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let tags = get(&app, "/api/tags").await;
    assert_eq!(tags.status, StatusCode::OK);
    let tags = tags.json();
    let models = tags["models"].as_array().unwrap();
    let names: Vec<&str> = models
        .iter()
        .map(|model| model["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["llama-3.2-1b", "meta-llama/Llama-3.2-1B"]);
    let first = &models[0];
    assert_eq!(first["model"], "llama-3.2-1b");
    assert_eq!(first["modified_at"], "2023-11-14T22:13:20Z");
    assert_eq!(first["size"], 0);
    let digest = first["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 64);
    assert_ne!(digest, models[1]["digest"].as_str().unwrap());
    assert_eq!(first["details"]["family"], "llama");
    assert_eq!(first["details"]["parameter_size"], "1B");
    // Stable from one call to the next.
    assert_eq!(get(&app, "/api/tags").await.json(), tags);

    let show = post(
        &app,
        "/api/show",
        json!({"model": "meta-llama/Llama-3.2-1B"}),
    )
    .await;
    assert_eq!(show.status, StatusCode::OK, "{}", show.text());
    let show = show.json();
    assert_eq!(show["model_info"]["llama.context_length"], 8192);
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    // Clients (Open WebUI) offer tools only to models whose capabilities list them.
    assert_eq!(show["capabilities"], json!(["completion", "tools"]));
    assert_eq!(show["details"]["family"], "llama");
    // Older clients send `name`.
    let by_name = post(&app, "/api/show", json!({"name": "llama-3.2-1b"})).await;
    assert_eq!(by_name.status, StatusCode::OK, "{}", by_name.text());

    let ps = get(&app, "/api/ps").await.json();
    assert_eq!(ps["models"][0]["context_length"], 8192);

    let version = get(&app, "/api/version").await;
    assert_eq!(
        version.json(),
        json!({"version": env!("CARGO_PKG_VERSION")})
    );
}

#[tokio::test]
async fn errors_use_ollamas_shape_and_status() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    let unknown = post(
        &app,
        "/api/chat",
        with(chat_body(), json!({"model": "gpt-9"})),
    )
    .await;
    let message = assert_ollama_error(&unknown, 404);
    assert!(message.contains("gpt-9"), "{message}");
    assert_ollama_error(
        &post(&app, "/api/show", json!({"model": "gpt-9"})).await,
        404,
    );

    for body in [
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        with(chat_body(), json!({"format": "yaml"})),
        with(chat_body(), json!({"format": 7})),
        with(chat_body(), json!({"options": {"temperature": "hot"}})),
        with(chat_body(), json!({"options": {"num_predict": 0}})),
        with(chat_body(), json!({"tools": [{"type": "function"}]})),
        with(
            chat_body(),
            json!({"messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}),
        ),
        with(chat_body(), json!({"messages": "hi"})),
    ] {
        let reply = post(&app, "/api/chat", body.clone()).await;
        assert_ollama_error(&reply, 400);
    }
    let context = post(
        &app,
        "/api/generate",
        json!({"model": "llama-3.2-1b", "prompt": "hi", "context": [1, 2]}),
    )
    .await;
    assert_ollama_error(&context, 400);
    let not_json = send(
        &app,
        Request::post("/api/chat")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{"))
            .unwrap(),
    )
    .await;
    assert_ollama_error(&not_json, 400);
    // Only the unknown model reached the engine (which resolves model ids); every 400 was
    // refused before it.
    let requests = engine.probe.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].model, "gpt-9");
}

#[tokio::test]
async fn engine_failures_map_to_the_same_statuses_as_openais_routes() {
    let busy = FakeEngine::new().start_error(GenerationError::Busy).build();
    let reply = post(&app(&busy), "/api/chat", chat_body()).await;
    assert_ollama_error(&reply, 429);
    assert_eq!(reply.header("retry-after"), Some("1"));

    let unavailable = FakeEngine::new()
        .start_error(GenerationError::Unavailable("not enough memory".into()))
        .build();
    let reply = post(
        &app(&unavailable),
        "/api/generate",
        json!({"model": "llama-3.2-1b", "prompt": "hi"}),
    )
    .await;
    let message = assert_ollama_error(&reply, 503);
    // The request id is quoted, as on the OpenAI side.
    let id = reply.header("x-request-id").unwrap();
    assert!(message.contains(id), "{message}");

    let internal = FakeEngine::new()
        .start_error(GenerationError::Internal("tensor shape [3] vs [4]".into()))
        .build();
    let reply = post(&app(&internal), "/api/chat", chat_body()).await;
    let message = assert_ollama_error(&reply, 500);
    assert!(!message.contains("tensor"), "{message}");
}

#[tokio::test]
async fn an_error_mid_stream_is_an_error_line() {
    let engine = FakeEngine::new()
        .error_at(1, GenerationError::Unavailable("a stage left".into()))
        .build();
    let lines = ndjson(&post(&app(&engine), "/api/chat", chat_body()).await);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message"]["content"], "Hello");
    assert!(lines[1]["error"].as_str().unwrap().contains("a stage left"));
}

#[tokio::test]
async fn a_configured_key_protects_the_ollama_routes() {
    let engine = FakeEngine::new().build();
    let app = app_with(
        &engine,
        ApiConfig {
            api_key: Some("sk-test-123".into()),
            ..ApiConfig::default()
        },
    );
    let missing = get(&app, "/api/tags").await;
    let message = assert_ollama_error(&missing, 401);
    assert!(message.contains("Authorization"), "{message}");
    assert_ollama_error(&post(&app, "/api/chat", chat_body()).await, 401);
    let keyed = send(
        &app,
        Request::get("/api/tags")
            .header(header::AUTHORIZATION, "Bearer sk-test-123")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(keyed.status, StatusCode::OK);
    // A path that only starts like /api is not under it.
    assert_eq!(get(&app, "/apix").await.status, StatusCode::NOT_FOUND);
    assert!(engine.probe.requests().is_empty());
}

#[tokio::test]
async fn dropping_a_streamed_chat_cancels_the_generation() {
    // One piece, then nothing until cancelled: only the disconnect can stop it.
    let engine = FakeEngine::new().hang_after(1).build();
    let server = crate::serve::start(&engine).await;
    let mut stream =
        crate::serve::request(server.address, "POST", "/api/chat", Some(&chat_body())).await;
    let received = crate::serve::read_until(&mut stream, "Hello").await;
    assert!(received.contains("application/x-ndjson"), "{received}");
    assert_eq!(engine.probe.cancelled.load(Ordering::SeqCst), 0);

    drop(stream);
    engine
        .probe
        .wait_for("the engine to notice the client left", |p| {
            p.cancelled.load(Ordering::SeqCst) == 1 && p.running.load(Ordering::SeqCst) == 0
        })
        .await;
    assert!(!engine.probe.finished.load(Ordering::SeqCst));
}

#[tokio::test]
async fn tools_go_in_and_calls_come_back_as_ollama_writes_them() {
    let weather = json!([{"type": "function", "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }}]);
    let engine = FakeEngine::new()
        .pieces(&[
            "Checking. <tool_",
            "call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
        ])
        .build();
    let app = app(&engine);
    // A history with a call and its result, as Ollama's clients send it: arguments as an
    // object, the result in a `tool` turn.
    let body = with(
        chat_body(),
        json!({
            "stream": false,
            "tools": weather,
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
                {"role": "user", "content": "And Oslo?"},
            ],
        }),
    );
    let whole = post(&app, "/api/chat", body.clone()).await;
    assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["message"]["content"], "Checking.", "{whole}");
    assert_eq!(
        whole["message"]["tool_calls"],
        json!([{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    );
    // The model (no template of its own for tools) got them in the generic prompt, and the
    // history's call and result in its format.
    let request = engine.probe.requests().pop().unwrap();
    let Prompt::Chat(turns) = request.prompt else {
        panic!("{:?}", request.prompt)
    };
    assert!(turns[0].content.contains("get_weather"), "{turns:?}");
    assert!(turns[2].content.contains("<tool_call>"), "{turns:?}");
    assert_eq!(turns[3].content, "<tool_response>\nsunny\n</tool_response>");

    // Streamed: the text as it comes, the call in a line of its own, then the last line.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let lines = ndjson(&post(&app, "/api/chat", streamed).await);
    let text: String = lines
        .iter()
        .filter_map(|l| l["message"]["content"].as_str())
        .collect();
    assert_eq!(text, "Checking. ");
    let calls: Vec<&Value> = lines
        .iter()
        .filter_map(|l| l["message"].get("tool_calls"))
        .collect();
    assert_eq!(calls.len(), 1, "{lines:?}");
    assert_eq!(calls[0][0]["function"]["arguments"]["city"], "Oslo");
    assert_eq!(lines.last().unwrap()["done"], true);
}
