//! Tool calling and structured output in OpenAI's shapes: `tools` and `tool_choice`, tool
//! turns in the history, `response_format`, and the tool calls read back out of the text.
//!
//! Tools reach the model through a generic prompt in the Hermes format (the one Qwen's and
//! Hermes' templates write): the functions' signatures in a `<tools>` block of the system
//! message, each call the model makes as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
//! earlier calls written back the same way, and tool results as `<tool_response>` blocks in a
//! user turn. Any model can be asked this way; models trained on the format answer it best.
//! `tool_choice: "required"` or a named function constrains the output to exactly such a
//! call, by grammar, so even a model that knows nothing of tools calls one with arguments
//! valid against its schema.

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::fields::{Fields, describe};
use exo_core::{ChatMessage, OutputConstraint};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";

/// One function a request offers the model.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tool {
    pub(crate) name: String,
    description: Option<String>,
    /// The JSON Schema of its arguments (an object schema).
    parameters: Value,
}

/// What a request's `tool_choice` asks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Choice {
    /// The model may answer or call (the default with tools).
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this tool.
    Named(String),
}

/// The tools a request offers and how it wants them used; `None` from [`parse`] when it
/// offers none or says `tool_choice: "none"` (the model then just answers).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ToolUse {
    pub(crate) tools: Vec<Tool>,
    pub(crate) choice: Choice,
}

/// Reads `tools` and `tool_choice`.
pub(crate) fn parse(fields: &Fields<'_>) -> Result<Option<ToolUse>, ApiError> {
    let tools = match fields.array("tools")? {
        None => Vec::new(),
        Some(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| tool(i, item))
            .collect::<Result<Vec<_>, _>>()?,
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|earlier| earlier.name == t.name) {
            return Err(ApiError::invalid_param(
                format!("tools[{i}].function.name"),
                format!("two tools are named '{}'", t.name),
            ));
        }
    }
    let choice = match fields.get("tool_choice") {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "none" => return Ok(None),
            "auto" => Some(Choice::Auto),
            "required" => Some(Choice::Required),
            other => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!(
                        "'tool_choice' is '{other}'; use none, auto, required or \
                         {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                    ),
                ));
            }
        },
        Some(Value::Object(object)) => {
            let name = object
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "tool_choice",
                        "'tool_choice' must name a function: \
                         {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !tools.iter().any(|t| t.name == name) {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    format!("'tool_choice' names '{name}', which is not among 'tools'"),
                ));
            }
            Some(Choice::Named(name.to_owned()))
        }
        Some(other) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                format!(
                    "'tool_choice' must be a string or an object, got {}",
                    describe(other)
                ),
            ));
        }
    };
    if tools.is_empty() {
        return match choice {
            Some(Choice::Required) => Err(ApiError::invalid_param(
                "tool_choice",
                "'tool_choice' is 'required' but the request offers no 'tools'",
            )),
            _ => Ok(None),
        };
    }
    Ok(Some(ToolUse {
        tools,
        choice: choice.unwrap_or(Choice::Auto),
    }))
}

fn tool(i: usize, item: &Value) -> Result<Tool, ApiError> {
    let at = |field: &str| format!("tools[{i}].{field}");
    let kind = item.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(ApiError::invalid_param(
            at("type"),
            format!("'{}' must be \"function\"", at("type")),
        ));
    }
    let Some(Value::Object(function)) = item.get("function") else {
        return Err(ApiError::invalid_param(
            at("function"),
            format!("'{}' must be an object", at("function")),
        ));
    };
    let name = match function.get("name") {
        Some(Value::String(name))
            if !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.') =>
        {
            name.clone()
        }
        _ => {
            return Err(ApiError::invalid_param(
                at("function.name"),
                format!(
                    "'{}' must be 1 to 64 letters, digits, '_', '-' or '.'",
                    at("function.name")
                ),
            ));
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) => Value::Object(schema.clone()),
        Some(other) => {
            return Err(ApiError::invalid_param(
                at("function.parameters"),
                format!(
                    "'{}' must be a JSON Schema object, got {}",
                    at("function.parameters"),
                    describe(other)
                ),
            ));
        }
    };
    Ok(Tool {
        name,
        description: function
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        parameters,
    })
}

impl ToolUse {
    /// The system prompt's tool section.
    fn prompt(&self) -> String {
        let mut text = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in &self.tools {
            let mut function = Map::new();
            function.insert("name".into(), Value::String(t.name.clone()));
            if let Some(d) = &t.description {
                function.insert("description".into(), Value::String(d.clone()));
            }
            function.insert("parameters".into(), t.parameters.clone());
            text.push('\n');
            text.push_str(&json!({"type": "function", "function": function}).to_string());
        }
        text.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        text
    }

    /// Puts the tools into the conversation: into the system message, or a new one first.
    pub(crate) fn add_to(&self, messages: &mut Vec<ChatMessage>) {
        let prompt = self.prompt();
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => messages.insert(0, ChatMessage::new("system", prompt)),
        }
    }

    /// The grammar the output must follow: exactly one call of the named tool, or of any
    /// of them, with arguments valid against its schema; `None` when the model may answer.
    pub(crate) fn constraint(&self) -> Option<OutputConstraint> {
        let chosen: Vec<&Tool> = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => self.tools.iter().collect(),
            Choice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let calls: Vec<Value> = chosen
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        "arguments": t.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut schema = match <[Value; 1]>::try_from(calls) {
            Ok([one]) => one,
            Err(calls) => json!({"anyOf": calls}),
        };
        if let Value::Object(map) = &mut schema {
            map.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        Some(OutputConstraint::Lark(format!(
            "start: \"{CALL_OPEN}\\n\" call \"\\n{CALL_CLOSE}\"\ncall: %json {schema}"
        )))
    }
}

/// A tool call read out of the model's text.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Call {
    pub(crate) name: String,
    /// The arguments as JSON text (OpenAI sends them as a string).
    pub(crate) arguments: String,
}

impl Call {
    /// OpenAI's shape of the call; a streamed delta also gives its `index` in the list.
    pub(crate) fn to_json(&self, index: Option<usize>) -> Value {
        let mut call = json!({
            "id": format!("call_{:024x}", rand::random::<u128>() >> 32),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        });
        if let (Some(index), Value::Object(fields)) = (index, &mut call) {
            fields.insert("index".into(), index.into());
        }
        call
    }
}

/// Splits the model's text into what it said and the calls it made: every
/// `<tool_call>{...}</tool_call>` block whose JSON names one of `tools` (a last block may
/// lack its closing tag when the answer was cut). If any block does not parse, nothing is
/// taken for a call and the text stays as it was.
pub(crate) fn read_calls(text: &str, tools: &ToolUse) -> (Option<String>, Vec<Call>) {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut rest = text;
    while let Some(start) = rest.find(CALL_OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + CALL_OPEN.len()..];
        let (inner, next) = match after.find(CALL_CLOSE) {
            Some(end) => (&after[..end], &after[end + CALL_CLOSE.len()..]),
            None => (after, ""),
        };
        match call(inner.trim(), tools) {
            Some(c) => calls.push(c),
            None => return (Some(text.to_owned()), Vec::new()),
        }
        rest = next;
    }
    content.push_str(rest);
    let content = content.trim();
    let content = (!content.is_empty() || calls.is_empty()).then(|| content.to_owned());
    match calls.is_empty() {
        true => (Some(text.to_owned()), calls),
        false => (content, calls),
    }
}

fn call(json: &str, tools: &ToolUse) -> Option<Call> {
    let Value::Object(object) = serde_json::from_str::<Value>(json).ok()? else {
        return None;
    };
    let name = object.get("name")?.as_str()?;
    if !tools.tools.iter().any(|t| t.name == name) {
        return None;
    }
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None => "{}".to_owned(),
        // Some models write the arguments as a string of JSON already.
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Some(v) => v.to_string(),
    };
    Some(Call {
        name: name.to_owned(),
        arguments,
    })
}

/// What a stream with tools holds back: text that may be (or is) a tool call.
#[derive(Debug, Default)]
pub(crate) struct Held {
    text: String,
    /// A `<tool_call>` tag has come: everything from it waits for the end.
    in_call: bool,
}

impl Held {
    /// What of `piece` may be streamed now: all of it without tools; with tools, all but what
    /// could be a tool call, which waits for [`Held::finish`].
    pub(crate) fn pass(&mut self, tools: Option<&ToolUse>, piece: String) -> String {
        match tools {
            Some(_) => self.take(piece),
            None => piece,
        }
    }

    /// At the end of a stream: the text held back that is not a call, and the calls.
    pub(crate) fn finish(&mut self, tools: Option<&ToolUse>) -> (String, Vec<Call>) {
        let rest = std::mem::take(&mut self.text);
        match tools {
            Some(tools) => {
                let (text, calls) = read_calls(&rest, tools);
                (text.unwrap_or_default(), calls)
            }
            None => (rest, Vec::new()),
        }
    }

    /// What of `piece` may be streamed now, holding back what could be a tool call; the
    /// rest stays in `text` for [`read_calls`] at the end.
    fn take(&mut self, piece: String) -> String {
        self.text.push_str(&piece);
        if self.in_call {
            return String::new();
        }
        if let Some(at) = self.text.find(CALL_OPEN) {
            self.in_call = true;
            let before = self.text[..at].to_owned();
            self.text.drain(..at);
            return before;
        }
        let keep = partial_open(&self.text);
        let ready = self.text[..self.text.len() - keep].to_owned();
        self.text.drain(..self.text.len() - keep);
        ready
    }
}

/// How much of `text`'s end could be the start of a `<tool_call>` tag, held back from a
/// stream until the next piece tells.
pub(crate) fn partial_open(text: &str) -> usize {
    (1..CALL_OPEN.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && CALL_OPEN.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// An assistant turn's earlier tool calls, written as the model would have written them.
pub(crate) fn write_calls(i: usize, calls: &Value) -> Result<String, ApiError> {
    let at = format!("messages[{i}].tool_calls");
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid_param(
            at.clone(),
            format!("'{at}' must be an array, got {}", describe(calls)),
        ));
    };
    let mut text = String::new();
    for (j, c) in calls.iter().enumerate() {
        let function = c.get("function");
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name else {
            return Err(ApiError::invalid_param(
                format!("{at}[{j}].function.name"),
                format!("'{at}[{j}].function.name' must be a string"),
            ));
        };
        // Arguments come as a string of JSON; written back as the object they stand for.
        let arguments = match function.and_then(|f| f.get("arguments")) {
            Some(Value::String(s)) => {
                serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.clone()))
            }
            Some(v) => v.clone(),
            None => json!({}),
        };
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&format!(
            "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
            json!({"name": name, "arguments": arguments})
        ));
    }
    Ok(text)
}

/// A `tool` message's result, as the user turn that carries it back.
pub(crate) fn write_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// Reads `response_format`: `None` for text, else the grammar of the JSON asked for.
pub(crate) fn response_format(fields: &Fields<'_>) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(format) = fields.get("response_format") else {
        return Ok(None);
    };
    let param = "response_format";
    let kind = format.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputConstraint::json_object())),
        Some("json_schema") => {
            let schema = format
                .get("json_schema")
                .filter(|s| !s.is_null())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "response_format.json_schema",
                        "'response_format.json_schema' is required with type 'json_schema'",
                    )
                })?;
            match schema.get("schema") {
                None | Some(Value::Null) => Ok(Some(OutputConstraint::json_object())),
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(OutputConstraint::JsonSchema(s.to_string())))
                }
                Some(other) => Err(ApiError::invalid_param(
                    "response_format.json_schema.schema",
                    format!(
                        "'response_format.json_schema.schema' must be a JSON Schema object, got {}",
                        describe(other)
                    ),
                )),
            }
        }
        _ => Err(ApiError::invalid_param(
            param,
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'",
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn weather() -> ToolUse {
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        });
        parse(&Fields(body.as_object().unwrap())).unwrap().unwrap()
    }

    #[test]
    fn calls_are_read_out_of_the_text_and_the_rest_is_content() {
        let tools = weather();
        let (content, calls) = read_calls(
            "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            &tools,
        );
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, r#"{"city":"Paris"}"#);
        // A call cut before its closing tag still counts; one of an unknown tool does not.
        let (content, calls) = read_calls(
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}",
            &tools,
        );
        assert_eq!((content, calls.len()), (None, 1));
        let text = "<tool_call>{\"name\": \"rm_rf\", \"arguments\": {}}</tool_call>";
        assert_eq!(read_calls(text, &tools), (Some(text.to_owned()), vec![]));
        assert_eq!(
            read_calls("just text", &tools),
            (Some("just text".to_owned()), vec![])
        );
    }

    #[test]
    fn a_partial_opening_tag_is_held_back() {
        assert_eq!(partial_open("hello <tool_"), 6);
        assert_eq!(partial_open("hello <"), 1);
        assert_eq!(partial_open("hello"), 0);
        assert_eq!(partial_open("é<t"), 2);
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let body = json!({"tools": [], "tool_choice": "required"});
        assert!(parse(&Fields(body.as_object().unwrap())).is_err());
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        });
        let e = parse(&Fields(body.as_object().unwrap())).unwrap_err();
        assert!(
            e.envelope()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("'b'")
        );
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": "none",
        });
        assert_eq!(parse(&Fields(body.as_object().unwrap())).unwrap(), None);
        let body = json!({"tools": [{"type": "function", "function": {"name": "a b"}}]});
        let e = parse(&Fields(body.as_object().unwrap())).unwrap_err();
        assert_eq!(e.envelope()["error"]["param"], "tools[0].function.name");
    }

    #[test]
    fn a_required_call_is_a_grammar_and_auto_is_free() {
        let mut tools = weather();
        assert_eq!(tools.constraint(), None);
        tools.choice = Choice::Required;
        let Some(OutputConstraint::Lark(grammar)) = tools.constraint() else {
            panic!("no grammar");
        };
        assert!(grammar.contains("\"const\":\"get_weather\""), "{grammar}");
        assert!(
            grammar.starts_with("start: \"<tool_call>\\n\""),
            "{grammar}"
        );
    }
}
