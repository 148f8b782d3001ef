//! A model whose own chat template takes tools, served by a node and through `exo-gateway`:
//! the default model with its template replaced by one that writes tools and calls in Llama
//! 3.x's syntax (`{"name": ..., "parameters": ...}` answers, results in `ipython` turns) on the
//! model's ChatML tokens. Both fronts list the syntax, hand the tools to the template as
//! structured data (the template reports what it saw), force a required call in that syntax
//! and read it back as OpenAI's `tool_calls`, whole and streamed, and render a history of a
//! call and its result through the template.
//!
//! Run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Proc, free_port, http, start_cluster_with_key};
use exo_model::gguf::Value;
use serde_json::{Value as Json, json};

const KEY: &str = "tool-templates-test-key";
const MODEL: &str = "smollm2-llama3-tools";

/// Llama 3.x's way with tools on ChatML turns. A last message `probe` makes the template stop
/// with the names of the tools it was given, which shows they reached it as data.
const TEMPLATE: &str = r#"{%- if not tools is defined %}{% set tools = none %}{% endif %}
{%- if messages[-1].content == 'probe' %}{{ raise_exception('the template saw ' ~ tools[0].function.name ~ ' taking ' ~ (tools[0].function.parameters.properties | list | join(','))) }}{% endif %}
{%- if tools is not none %}<|im_start|>system
Environment: ipython
You may call these functions. To call one, answer only {"name": function name, "parameters": its arguments}.
{% for t in tools %}{{ t | tojson(indent=2) }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if 'tool_calls' in m %}<|im_start|>assistant
{"name": "{{ m.tool_calls[0].function.name }}", "parameters": {{ m.tool_calls[0].function.arguments | tojson }}}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>ipython
{{ m.content }}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

fn tools() -> Json {
    // Bounded strings, so that a greedy 135M model ends its arguments well within the limit.
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
        },
    }}])
}

fn chat(api: &str, body: &Json) -> (u16, Json) {
    let (status, text) = http(api, "POST", "/v1/chat/completions", Some(&body.to_string()));
    let json = serde_json::from_str(&text).unwrap_or(Json::String(text));
    (status, json)
}

/// The call a reply made, checked against the tool's schema.
fn checked_call(front: &str, reply: &Json) -> Json {
    let choice = &reply["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{front}: {reply}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{front}: {reply}");
    let arguments: Json =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{front}: {reply}");
    assert!(
        ["c", "f"].contains(&arguments["unit"].as_str().unwrap()),
        "{front}: {reply}"
    );
    arguments
}

#[test]
fn a_template_that_takes_tools_is_used_by_a_node_and_through_a_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(format!("{MODEL}.gguf"));
    exo_model::testing::rewrite_gguf(&common::default_model(), &model, |metadata, _| {
        let entry = metadata
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.chat_template")
            .expect("the default model has a chat template");
        entry.1 = Value::String(TEMPLATE.to_owned());
    })
    .unwrap();
    let cluster = start_cluster_with_key(1, "4GiB", KEY, &["--model", model.to_str().unwrap()]);
    let node = &cluster.nodes[0];

    let gateway_api = format!("127.0.0.1:{}", free_port());
    let home = tempfile::tempdir().unwrap();
    let mut gateway = Command::new(common::sibling_binary("exo-gateway", "exo-gateway"));
    gateway
        .env("EXO_HOME", home.path())
        .args(["--no-mdns", "--cluster-key", KEY])
        .args(["--listen", &format!("/ip4/127.0.0.1/tcp/{}", free_port())])
        .args(["--api-addr", &gateway_api])
        .args(["--peer", &node.membership]);
    let gateway = Proc::spawn(gateway);
    gateway.wait_for("gateway serving the API", Duration::from_secs(30));
    gateway.wait_for_count(0, "node joined", 1, Duration::from_secs(30));
    let gateway_api = format!("http://{gateway_api}/v1");

    for (front, api) in [
        ("node", node.api.as_str()),
        ("gateway", gateway_api.as_str()),
    ] {
        // The syntax is listed with the model.
        let (status, models) = http(api, "GET", "/v1/models", None);
        assert_eq!(status, 200, "{front}: {models}");
        let models: Json = serde_json::from_str(&models).unwrap();
        assert_eq!(
            models["data"][0]["tool_syntax"], "llama3",
            "{front}: {models}"
        );

        // The tools reach the template as data: their names and schemas.
        let (status, reply) = chat(
            api,
            &json!({"model": MODEL, "tools": tools(), "messages": [{"role": "user", "content": "probe"}]}),
        );
        assert_eq!(status, 400, "{front}: {reply}");
        let message = reply["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("the template saw get_weather taking city,unit"),
            "{front}: {reply}"
        );

        // A required call, in Llama 3.x's syntax, read back as OpenAI's tool_calls.
        let ask = json!({
            "model": MODEL,
            "tools": tools(),
            "tool_choice": "required",
            "temperature": 0,
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        });
        let (status, reply) = chat(api, &ask);
        assert_eq!(
            status,
            200,
            "{front}: {reply}\nnode log:\n{}",
            node.proc.log_text()
        );
        checked_call(front, &reply);

        // Streamed: the call comes as a delta, no text before it.
        let mut streamed = ask.clone();
        streamed["stream"] = json!(true);
        let (status, events) = http(
            api,
            "POST",
            "/v1/chat/completions",
            Some(&streamed.to_string()),
        );
        assert_eq!(status, 200, "{front}: {events}");
        let chunks: Vec<Json> = events
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|l| *l != "[DONE]")
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let calls: Vec<&Json> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
            .collect();
        assert_eq!(calls.len(), 1, "{front}: {events}");
        assert_eq!(
            calls[0][0]["function"]["name"], "get_weather",
            "{front}: {events}"
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "", "{front}: {events}");

        // The call and its result go back through the template, and the chat goes on.
        let (status, reply) = chat(
            api,
            &json!({
                "model": MODEL,
                "tools": tools(),
                "max_tokens": 8,
                "messages": [
                    {"role": "user", "content": "What is the weather in Paris?"},
                    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"},
                ],
            }),
        );
        assert_eq!(status, 200, "{front}: {reply}");
        assert!(
            reply["usage"]["prompt_tokens"].as_u64().unwrap() > 100,
            "{front}: {reply}"
        );
    }
}
