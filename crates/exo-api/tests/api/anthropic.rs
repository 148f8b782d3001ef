//! `POST /v1/messages`, Anthropic's dialect: what reaches the engine, the whole answer, the
//! named stream events, tool_use blocks, errors in Anthropic's shape and `x-api-key`.

use axum::http::Method;
use exo_api::{ApiConfig, Prompt};
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{app, app_with, json_request, post, send};

fn body() -> Value {
    json!({
        "model": "llama-3.2-1b",
        "max_tokens": 32,
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    })
}

fn events(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(data) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(data).unwrap()));
        }
    }
    out
}

#[tokio::test]
async fn a_whole_message_has_anthropics_shape() {
    let engine = FakeEngine::new().build();
    let reply = post(&app(&engine), "/v1/messages", body()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let message = reply.json();
    assert!(message["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello, world!"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 7, "output_tokens": 3})
    );
    let request = engine.probe.requests().pop().unwrap();
    assert_eq!(request.max_tokens, Some(32));
    let Prompt::Chat(turns) = request.prompt else {
        panic!()
    };
    assert_eq!(
        (turns[0].role.as_str(), turns[0].content.as_str()),
        ("system", "Be brief.")
    );
    assert_eq!(
        (turns[1].role.as_str(), turns[1].content.as_str()),
        ("user", "Hi")
    );
}

#[tokio::test]
async fn a_stream_sends_anthropics_events_in_order() {
    let engine = FakeEngine::new().build();
    let mut request = body();
    request["stream"] = true.into();
    let reply = post(&app(&engine), "/v1/messages", request).await;
    let events = events(&reply.text());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names[1], "content_block_start");
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, e)| e["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello, world!");
    for (name, event) in &events {
        assert_eq!(event["type"], name.as_str());
    }
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 3);
}

#[tokio::test]
async fn tool_use_blocks_go_both_ways() {
    let engine = FakeEngine::new()
        .pieces(&["<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>"])
        .build();
    let mut request = body();
    request["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    request["tool_choice"] = json!({"type": "tool", "name": "get_weather"});
    request["messages"] = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "rain"}]},
    ]);
    let message = post(&app(&engine), "/v1/messages", request).await.json();
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(message["content"][0]["type"], "tool_use");
    assert_eq!(message["content"][0]["name"], "get_weather");
    assert_eq!(message["content"][0]["input"], json!({"city": "Rome"}));
    let request = engine.probe.requests().pop().unwrap();
    assert!(request.constraint.is_some(), "a named tool is a grammar");
    let Prompt::Chat(turns) = request.prompt else {
        panic!()
    };
    assert!(
        turns[0].content.contains("get_weather"),
        "the tools' prompt"
    );
    assert!(turns[2].content.contains("<tool_call>") && turns[2].content.contains("Oslo"));
    assert_eq!(turns[3].content, "<tool_response>\nrain\n</tool_response>");
}

#[tokio::test]
async fn errors_have_anthropics_shape_and_the_key_may_come_in_x_api_key() {
    let engine = FakeEngine::new().build();
    let mut request = body();
    request["max_tokens"] = Value::Null;
    let reply = post(&app(&engine), "/v1/messages", request).await;
    assert_eq!(reply.status, 400);
    let error = reply.json();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let mut request = body();
    request["messages"] = json!([{"role": "user", "content": [{"type": "image", "source": {}}]}]);
    let reply = post(&app(&engine), "/v1/messages", request).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'image'")
    );

    let config = ApiConfig {
        api_key: Some("secret".into()),
        ..ApiConfig::default()
    };
    let app = app_with(&engine, config);
    let mut with_key = json_request(Method::POST, "/v1/messages", &body());
    with_key
        .headers_mut()
        .insert("x-api-key", "secret".parse().unwrap());
    assert_eq!(send(&app, with_key).await.status, 200);
    let mut wrong = json_request(Method::POST, "/v1/messages", &body());
    wrong
        .headers_mut()
        .insert("x-api-key", "nope".parse().unwrap());
    assert_eq!(send(&app, wrong).await.status, 401);
}
