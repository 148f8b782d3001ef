//! A checkpoint's named templates: a GGUF file with `tokenizer.chat_template.tool_use` (as
//! llama.cpp writes Hugging Face's named `tool_use` template) renders chats with tools with it,
//! and others with the default one.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_model::gguf::Value;
use exo_model::testing::{rewrite_gguf, tiny_config, write_gguf};
use exo_model::{ChatMessage, Checkpoint, ToolSpec, ToolSyntax};

const DEFAULT: &str = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
const TOOL_USE: &str = "{% for t in tools %}<tool_call> offers {{ t.function.name }}\n{% endfor %}\
    {% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";

#[test]
fn chats_with_tools_use_the_tool_use_template() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, named) = (dir.path().join("plain.gguf"), dir.path().join("named.gguf"));
    write_gguf(&plain, &tiny_config(1), 3).unwrap();
    rewrite_gguf(&plain, &named, |metadata, _| {
        metadata.push((
            "tokenizer.chat_template".into(),
            Value::String(DEFAULT.into()),
        ));
        metadata.push((
            "tokenizer.chat_template.tool_use".into(),
            Value::String(TOOL_USE.into()),
        ));
    })
    .unwrap();
    let template = Checkpoint::open(&named)
        .unwrap()
        .chat_template()
        .unwrap()
        .unwrap();
    assert_eq!(template.tool_syntax(), Some(ToolSyntax::Hermes));
    let chat = [ChatMessage::new("user", "hi")];
    assert_eq!(
        template.render_chat(&chat, &[], false).unwrap(),
        "[user] hi\n"
    );
    let tools = [ToolSpec {
        name: "get_weather".into(),
        description: None,
        parameters: "{}".into(),
    }];
    assert_eq!(
        template.render_chat(&chat, &tools, false).unwrap(),
        "<tool_call> offers get_weather\n[user] hi\n"
    );
}
