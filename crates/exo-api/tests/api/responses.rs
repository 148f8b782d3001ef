//! `POST /v1/responses`, OpenAI's Responses dialect: input items to turns, the response
//! object, typed stream events, function calls and `text.format`.

use exo_api::{OutputConstraint, Prompt};
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{app, post};

fn events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn a_response_has_openais_shape_and_items_become_turns() {
    let engine = FakeEngine::new().build();
    let reply = post(
        &app(&engine),
        "/v1/responses",
        json!({
            "model": "llama-3.2-1b",
            "instructions": "Be brief.",
            "max_output_tokens": 20,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "rain"},
            ],
        }),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let response = reply.json();
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["type"], "message");
    assert_eq!(response["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(response["output"][0]["content"][0]["text"], "Hello, world!");
    assert_eq!(response["usage"]["input_tokens"], 7);
    assert_eq!(response["usage"]["output_tokens"], 3);
    assert_eq!(response["instructions"], "Be brief.");
    let request = engine.probe.requests().pop().unwrap();
    assert_eq!(request.max_tokens, Some(20));
    let Prompt::Chat(turns) = request.prompt else {
        panic!()
    };
    assert_eq!(turns[0].content, "Be brief.");
    assert_eq!(turns[1].content, "Weather?");
    assert!(turns[2].content.contains("<tool_call>") && turns[2].content.contains("Oslo"));
    assert_eq!(turns[3].content, "<tool_response>\nrain\n</tool_response>");
}

#[tokio::test]
async fn a_stream_sends_the_typed_events_in_order() {
    let engine = FakeEngine::new().build();
    let reply = post(
        &app(&engine),
        "/v1/responses",
        json!({"model": "llama-3.2-1b", "input": "Hi", "stream": true}),
    )
    .await;
    let events = events(&reply.text());
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        &kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello, world!");
    let numbers: Vec<u64> = events
        .iter()
        .map(|e| e["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (0..events.len() as u64).collect::<Vec<_>>());
    let done = events.last().unwrap();
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        "Hello, world!"
    );
}

#[tokio::test]
async fn calls_become_function_call_items_and_formats_grammars() {
    let engine = FakeEngine::new()
        .pieces(&["<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>"])
        .build();
    let app = app(&engine);
    let tools = json!([{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]);
    let response = post(
        &app,
        "/v1/responses",
        json!({"model": "llama-3.2-1b", "input": "Weather?", "tools": tools, "tool_choice": "required"}),
    )
    .await
    .json();
    let call = &response["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["name"], "get_weather");
    assert_eq!(call["arguments"], "{\"city\":\"Rome\"}");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    assert!(matches!(
        engine.probe.requests()[0].constraint,
        Some(OutputConstraint::Lark(_))
    ));

    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    post(
        &app,
        "/v1/responses",
        json!({"model": "llama-3.2-1b", "input": "x", "text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}}),
    )
    .await;
    assert_eq!(
        engine.probe.requests()[1].constraint,
        Some(OutputConstraint::JsonSchema(schema.to_string()))
    );
    let reply = post(
        &app,
        "/v1/responses",
        json!({"model": "llama-3.2-1b", "input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    reply.assert_error(400, Some("previous_response_id"), None);
    let reply = post(
        &app,
        "/v1/responses",
        json!({"model": "llama-3.2-1b", "input": "x", "max_output_tokens": 0}),
    )
    .await;
    reply.assert_error(400, Some("max_output_tokens"), None);
}
