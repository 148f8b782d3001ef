//! Tools and structured output at the API: what reaches the engine (the tools' prompt, the
//! history's calls and results, the grammar) and how calls in the text come back, whole and
//! streamed.

use exo_api::{ChatMessage, OutputConstraint, Prompt, ToolCall, ToolSpec, ToolSyntax};
use serde_json::{Value, json};

use crate::fake::FakeEngine;
use crate::support::{app, chat_body, post, sse_chunks, with};

/// The text a streamed chat's chunks carry.
fn streamed_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// The `tool_calls` deltas of a streamed chat's chunks.
fn streamed_calls(chunks: &[Value]) -> Vec<&Value> {
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect()
}

fn weather() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}])
}

#[tokio::test]
async fn tools_and_the_history_reach_the_model_in_the_hermes_format() {
    let engine = FakeEngine::new().build();
    let body = with(
        chat_body(),
        json!({
            "tools": weather(),
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            ],
        }),
    );
    let reply = post(&app(&engine), "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let request = engine.probe.requests().pop().unwrap();
    let Prompt::Chat(messages) = request.prompt else {
        panic!("{:?}", request.prompt);
    };
    assert_eq!(messages[0].role, "system");
    assert!(
        messages[0].content.starts_with("Be brief.\n\n# Tools"),
        "{}",
        messages[0].content
    );
    assert!(
        messages[0].content.contains("\"name\":\"get_weather\""),
        "{}",
        messages[0].content
    );
    assert_eq!(
        messages[2].content,
        "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}\n</tool_call>"
    );
    assert_eq!(messages[3].role, "user");
    assert_eq!(
        messages[3].content,
        "<tool_response>\nsunny\n</tool_response>"
    );
    // `auto`: the model is free, no grammar.
    assert_eq!(request.constraint, None);
}

#[tokio::test]
async fn a_required_call_and_a_response_format_are_grammars() {
    let engine = FakeEngine::new().build();
    let app = app(&engine);
    post(
        &app,
        "/v1/chat/completions",
        with(
            chat_body(),
            json!({"tools": weather(), "tool_choice": "required"}),
        ),
    )
    .await;
    post(
        &app,
        "/v1/chat/completions",
        with(
            chat_body(),
            json!({"response_format": {"type": "json_object"}}),
        ),
    )
    .await;
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": true, "schema": schema}}})),
    )
    .await;
    // `none`: the tools are not even shown to the model.
    post(
        &app,
        "/v1/chat/completions",
        with(
            chat_body(),
            json!({"tools": weather(), "tool_choice": "none"}),
        ),
    )
    .await;
    let requests = engine.probe.requests();
    assert!(
        matches!(&requests[0].constraint, Some(OutputConstraint::Lark(g)) if g.contains("get_weather"))
    );
    assert_eq!(
        requests[1].constraint,
        Some(OutputConstraint::json_object())
    );
    assert_eq!(
        requests[2].constraint,
        Some(OutputConstraint::JsonSchema(schema.to_string()))
    );
    assert_eq!(requests[3].constraint, None);
    let Prompt::Chat(messages) = &requests[3].prompt else {
        panic!()
    };
    assert!(messages.iter().all(|m| !m.content.contains("# Tools")));
}

#[tokio::test]
async fn a_call_in_the_text_comes_back_as_tool_calls() {
    let engine = FakeEngine::new()
        .pieces(&[
            "Sure.",
            "<tool_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ])
        .build();
    let body = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather()})),
    )
    .await
    .json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "Sure.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Paris\"}");
}

#[tokio::test]
async fn a_streamed_call_is_held_back_and_sent_as_one_delta() {
    // The opening tag arrives cut in two: nothing of it may leak as text.
    let engine = FakeEngine::new()
        .pieces(&[
            "Let me check <tool",
            "_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>",
        ])
        .build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather(), "stream": true})),
    )
    .await;
    let chunks = sse_chunks(&reply);
    let text = streamed_text(&chunks);
    assert_eq!(text, "Let me check ");
    let calls = streamed_calls(&chunks);
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0][0]["index"], 0);
    assert_eq!(calls[0][0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
    let last = chunks
        .iter()
        .rev()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn text_that_only_looks_like_a_tag_streams_as_text() {
    let engine = FakeEngine::new().pieces(&["a <to", "y> b"]).build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather(), "stream": true})),
    )
    .await;
    let chunks = sse_chunks(&reply);
    let text = streamed_text(&chunks);
    assert_eq!(text, "a <toy> b");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["delta"].get("tool_calls").is_none())
    );
}

#[tokio::test]
async fn a_template_that_takes_tools_gets_them_and_the_history_as_they_are() {
    let engine = FakeEngine::new().tool_syntax(ToolSyntax::Llama3).build();
    let body = with(
        chat_body(),
        json!({
            "tools": weather(),
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "windy"},
            ],
        }),
    );
    let reply = post(&app(&engine), "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let request = engine.probe.requests().pop().unwrap();
    assert_eq!(
        request.tools,
        vec![ToolSpec {
            name: "get_weather".into(),
            description: Some("Weather of a city".into()),
            parameters: weather()[0]["function"]["parameters"].to_string(),
        }]
    );
    let tool = |id: &str, content: &str| ChatMessage {
        tool_call_id: Some(id.into()),
        ..ChatMessage::new("tool", content)
    };
    assert_eq!(
        request.prompt,
        Prompt::Chat(vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: vec![ToolCall {
                    id: "c1".into(),
                    name: "get_weather".into(),
                    arguments: "{\"city\": \"Paris\"}".into(),
                }],
                ..ChatMessage::new("assistant", "")
            },
            tool("c1", "sunny"),
            tool("c2", "windy"),
        ])
    );
}

#[tokio::test]
async fn without_such_a_template_two_results_are_one_user_turn() {
    let engine = FakeEngine::new().build();
    let body = with(
        chat_body(),
        json!({
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
                    {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "c2", "content": "windy"},
            ],
        }),
    );
    let reply = post(&app(&engine), "/v1/chat/completions", body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let request = engine.probe.requests().pop().unwrap();
    assert!(request.tools.is_empty());
    let Prompt::Chat(messages) = request.prompt else {
        panic!("{:?}", request.prompt);
    };
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(
        messages[2],
        ChatMessage::new(
            "user",
            "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwindy\n</tool_response>"
        )
    );
}

#[tokio::test]
async fn llama_3_calls_come_back_whole_and_streamed() {
    let engine = FakeEngine::new()
        .tool_syntax(ToolSyntax::Llama3)
        .pieces(&[
            " <|python",
            "_tag|>{\"name\": \"get_weather\", ",
            "\"parameters\": {\"city\": \"Lyon\"}}",
        ])
        .build();
    let app = app(&engine);
    let body = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather()})),
    )
    .await
    .json();
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], "{\"city\":\"Lyon\"}");

    let reply = post(
        &app,
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather(), "stream": true})),
    )
    .await;
    let chunks = sse_chunks(&reply);
    let text = streamed_text(&chunks);
    assert_eq!(text, "");
    let calls = streamed_calls(&chunks);
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0][0]["function"]["arguments"], "{\"city\":\"Lyon\"}");
}

#[tokio::test]
async fn a_llama_3_answer_in_words_streams_as_it_comes() {
    let engine = FakeEngine::new()
        .tool_syntax(ToolSyntax::Llama3)
        .pieces(&[" ", "It is", " {sunny}"])
        .build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather(), "stream": true})),
    )
    .await;
    let chunks = sse_chunks(&reply);
    let texts: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    // Held while it could still open a call, then streamed piece by piece.
    assert_eq!(texts, [" It is", " {sunny}"]);
}

#[tokio::test]
async fn mistral_calls_follow_their_text() {
    let engine = FakeEngine::new()
        .tool_syntax(ToolSyntax::Mistral)
        .pieces(&[
            "Checking. [TOOL_",
            "CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}]",
        ])
        .build();
    let reply = post(
        &app(&engine),
        "/v1/chat/completions",
        with(chat_body(), json!({"tools": weather(), "stream": true})),
    )
    .await;
    let chunks = sse_chunks(&reply);
    let text = streamed_text(&chunks);
    assert_eq!(text, "Checking. ");
    let calls = streamed_calls(&chunks);
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0][0]["function"]["arguments"], "{\"city\":\"Rome\"}");
}

#[tokio::test]
async fn a_required_call_follows_the_models_syntax() {
    for (syntax, start) in [
        (ToolSyntax::Hermes, "start: \"<tool_call>\\n\" call"),
        (ToolSyntax::Llama3, "start: call\n"),
        (ToolSyntax::Mistral, "start: \"[TOOL_CALLS] [\" call \"]\""),
    ] {
        let engine = FakeEngine::new().tool_syntax(syntax).build();
        post(
            &app(&engine),
            "/v1/chat/completions",
            with(
                chat_body(),
                json!({"tools": weather(), "tool_choice": "required"}),
            ),
        )
        .await;
        let request = engine.probe.requests().pop().unwrap();
        let Some(OutputConstraint::Lark(grammar)) = request.constraint else {
            panic!("{syntax:?}: {:?}", request.constraint);
        };
        assert!(grammar.starts_with(start), "{syntax:?}: {grammar}");
        let arguments = match syntax {
            ToolSyntax::Llama3 => "\"parameters\"",
            _ => "\"arguments\"",
        };
        assert!(grammar.contains(arguments), "{syntax:?}: {grammar}");
    }
}
