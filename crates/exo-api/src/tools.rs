//! Tool calling and structured output in OpenAI's shapes: `tools` and `tool_choice`, tool
//! turns in the history, `response_format`, and the tool calls read back out of the text.
//!
//! A model whose chat template takes tools (the engine's [`ModelCard::tool_syntax`] says
//! which call syntax the template teaches) gets them through that template: the tools, the
//! history's calls and the tools' results go to the engine as they are
//! ([`GenerationRequest::tools`](exo_core::GenerationRequest::tools), [`ChatMessage::tool_calls`],
//! `tool` turns) and the template writes them the way the model was trained on. Its answer's
//! calls are read in that syntax: Hermes' and Qwen's `<tool_call>` blocks, Llama 3.x's
//! `{"name": ..., "parameters": ...}` answer, Mistral's `[TOOL_CALLS] [...]` list.
//!
//! Any other model is asked through a generic prompt in the Hermes format: the functions'
//! signatures in a `<tools>` block of the system message, each call the model makes as
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, earlier calls written back the
//! same way, and tool results as `<tool_response>` blocks in a user turn ([`lower`] rewrites
//! the chat so). Models trained on the format answer it best.
//!
//! `tool_choice: "required"` or a named function constrains the output to exactly one call in
//! the model's syntax, by grammar, so even a model that knows nothing of tools calls one with
//! arguments valid against its schema.
//!
//! [`ModelCard::tool_syntax`]: crate::ModelCard::tool_syntax

use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::fields::describe;
use crate::schema;
use exo_core::{ChatMessage, OutputConstraint, ToolCall, ToolSpec, ToolSyntax};

const CALL_OPEN: &str = "<tool_call>";
const CALL_CLOSE: &str = "</tool_call>";
/// What opens Mistral's list of calls (a control token in its tokenizers, which the answer's
/// text spells out).
const MISTRAL_CALLS: &str = "[TOOL_CALLS]";
/// What Llama 3.x may write before a call (a control token, spelled out in the text).
const PYTHON_TAG: &str = "<|python_tag|>";

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
    /// The syntax the model writes calls in: its template's, or the generic prompt's Hermes.
    pub(crate) syntax: ToolSyntax,
}

/// Reads `tools` and `tool_choice` (absent or null: `None`).
pub(crate) fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
) -> Result<Option<ToolUse>, ApiError> {
    let tools = match tools.filter(|v| !v.is_null()) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| tool(i, item))
            .collect::<Result<Vec<_>, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "tools",
                format!("'tools' must be an array, got {}", describe(other)),
            ));
        }
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|earlier| earlier.name == t.name) {
            return Err(ApiError::invalid_param(
                format!("tools[{i}].function.name"),
                format!("two tools are named '{}'", t.name),
            ));
        }
    }
    let choice = match choice.filter(|v| !v.is_null()) {
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
        syntax: ToolSyntax::Hermes,
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
    fn add_to(&self, messages: &mut Vec<ChatMessage>) {
        let prompt = self.prompt();
        match messages.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{prompt}", first.content);
            }
            _ => messages.insert(0, ChatMessage::new("system", prompt)),
        }
    }

    /// The tools as the engine hands them to a chat template.
    fn specs(&self) -> Vec<ToolSpec> {
        self.tools
            .iter()
            .map(|t| ToolSpec {
                name: t.name.clone(),
                description: t.description.clone(),
                parameters: t.parameters.to_string(),
            })
            .collect()
    }

    /// The grammar the output must follow: exactly one call of the named tool, or of any
    /// of them, with arguments valid against its schema, in the model's syntax; `None` when
    /// the model may answer.
    pub(crate) fn constraint(&self) -> Option<OutputConstraint> {
        let chosen: Vec<&Tool> = match &self.choice {
            Choice::Auto => return None,
            Choice::Required => self.tools.iter().collect(),
            Choice::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        // Llama 3.x names the arguments `parameters`.
        let arguments = match self.syntax {
            ToolSyntax::Llama3 => "parameters",
            ToolSyntax::Hermes | ToolSyntax::Mistral => "arguments",
        };
        let calls: Vec<Value> = chosen
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        arguments: t.parameters,
                    },
                    "required": ["name", arguments],
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
        let start = match self.syntax {
            ToolSyntax::Hermes => format!("\"{CALL_OPEN}\\n\" call \"\\n{CALL_CLOSE}\""),
            ToolSyntax::Llama3 => "call".to_owned(),
            ToolSyntax::Mistral => format!("\"{MISTRAL_CALLS} [\" call \"]\""),
        };
        Some(OutputConstraint::Lark(format!(
            "start: {start}\ncall: %json {schema}"
        )))
    }
}

/// Makes a parsed chat fit the model: with a chat template that takes tools (`native`), the
/// tools are handed to the engine as they are and the history's calls and results stay
/// structured; otherwise the chat is rewritten for the generic Hermes prompt: the tools into
/// the system message, earlier calls into their assistant turns' text, and each run of tool
/// results into one user turn of `<tool_response>` blocks. Returns what goes in
/// [`GenerationRequest::tools`](exo_core::GenerationRequest::tools).
pub(crate) fn lower(
    native: Option<ToolSyntax>,
    messages: &mut Vec<ChatMessage>,
    tools: Option<&mut ToolUse>,
) -> Vec<ToolSpec> {
    if let Some(syntax) = native {
        return match tools {
            Some(tools) => {
                tools.syntax = syntax;
                tools.specs()
            }
            None => Vec::new(),
        };
    }
    let mut lowered: Vec<ChatMessage> = Vec::with_capacity(messages.len());
    for m in messages.drain(..) {
        if m.role == "tool" {
            let result = write_result(&m.content);
            match lowered.last_mut() {
                Some(last) if last.role == "user" && last.content.ends_with("</tool_response>") => {
                    last.content = format!("{}\n{result}", last.content);
                }
                _ => lowered.push(ChatMessage::new("user", result)),
            }
            continue;
        }
        let content = match m.tool_calls.is_empty() {
            true => m.content,
            false => {
                let calls = write_calls(&m.tool_calls);
                match m.content.is_empty() {
                    true => calls,
                    false => format!("{}\n{calls}", m.content),
                }
            }
        };
        lowered.push(ChatMessage::new(m.role, content));
    }
    *messages = lowered;
    if let Some(tools) = tools {
        tools.syntax = ToolSyntax::Hermes;
        tools.add_to(messages);
    }
    Vec::new()
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
    pub(crate) fn openai(&self, index: Option<usize>) -> schema::ToolCall {
        schema::ToolCall {
            id: new_call_id(),
            kind: schema::FunctionType::Name,
            function: schema::FunctionCall {
                name: self.name.clone(),
                arguments: self.arguments.clone(),
            },
            index,
        }
    }
}

/// A new id for a call the answer made, written as OpenAI writes them.
pub(crate) fn new_call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// Splits the model's text into what it said and the calls it made, in the model's syntax
/// (see the module's text). A call must name one of `tools`; if any does not parse, nothing is
/// taken for a call and the text stays as it was.
pub(crate) fn read_calls(text: &str, tools: &ToolUse) -> (Option<String>, Vec<Call>) {
    let read = match tools.syntax {
        ToolSyntax::Hermes => read_hermes(text, tools),
        ToolSyntax::Llama3 => read_llama3(text, tools),
        ToolSyntax::Mistral => read_mistral(text, tools),
    };
    match read {
        Some((content, calls)) if !calls.is_empty() => {
            let content = content.trim();
            ((!content.is_empty()).then(|| content.to_owned()), calls)
        }
        _ => (Some(text.to_owned()), Vec::new()),
    }
}

/// Every `<tool_call>{...}</tool_call>` block (a last block may lack its closing tag when the
/// answer was cut), and the text around them.
fn read_hermes(text: &str, tools: &ToolUse) -> Option<(String, Vec<Call>)> {
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
        calls.push(call(&serde_json::from_str(inner.trim()).ok()?, tools)?);
        rest = next;
    }
    content.push_str(rest);
    Some((content, calls))
}

/// Llama 3.x: the whole answer is one call (or several, separated by `;`), perhaps after
/// `<|python_tag|>`.
fn read_llama3(text: &str, tools: &ToolUse) -> Option<(String, Vec<Call>)> {
    let body = text.trim_start();
    let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body);
    let mut calls = Vec::new();
    let mut rest = body.trim();
    while !rest.is_empty() {
        let (value, used) = first_json(rest)?;
        calls.push(call(&value, tools)?);
        rest = rest[used..]
            .trim_start()
            .trim_start_matches(';')
            .trim_start();
    }
    Some((String::new(), calls))
}

/// Mistral: text, then `[TOOL_CALLS]` and a JSON list of calls (or, in its newer tokenizers,
/// `name[ARGS]{...}` for each call).
fn read_mistral(text: &str, tools: &ToolUse) -> Option<(String, Vec<Call>)> {
    let at = text.find(MISTRAL_CALLS)?;
    let mut calls = Vec::new();
    let mut rest = text[at..].trim_start_matches(MISTRAL_CALLS).trim_start();
    if rest.starts_with('[') {
        let (Value::Array(items), used) = first_json(rest)? else {
            return None;
        };
        for item in &items {
            calls.push(call(item, tools)?);
        }
        rest = &rest[used..];
    } else {
        while let Some((name, after)) = rest.split_once("[ARGS]") {
            let (arguments, used) = first_json(after)?;
            calls.push(call(
                &json!({"name": name.trim(), "arguments": arguments}),
                tools,
            )?);
            rest = after[used..].trim_start().trim_start_matches(MISTRAL_CALLS);
        }
    }
    rest.trim()
        .is_empty()
        .then(|| (text[..at].to_owned(), calls))
}

/// The JSON value at the start of `text`, and the bytes it took.
fn first_json(text: &str) -> Option<(Value, usize)> {
    let mut values = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    let value = values.next()?.ok()?;
    Some((value, values.byte_offset()))
}

fn call(value: &Value, tools: &ToolUse) -> Option<Call> {
    let Value::Object(object) = value else {
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
    /// A call has begun: everything from it waits for the end.
    in_call: bool,
    /// Llama 3.x: the answer began with text, so it is no call.
    free: bool,
}

impl Held {
    /// What of `piece` may be streamed now: all of it without tools; with tools, all but what
    /// could be a tool call, which waits for [`Held::finish`].
    pub(crate) fn pass(&mut self, tools: Option<&ToolUse>, piece: String) -> String {
        match tools.map(|t| t.syntax) {
            None => piece,
            Some(ToolSyntax::Hermes) => self.take(piece, CALL_OPEN),
            Some(ToolSyntax::Mistral) => self.take(piece, MISTRAL_CALLS),
            Some(ToolSyntax::Llama3) => self.take_start(piece),
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

    /// What of `piece` may be streamed now, holding back from `marker` on (and what could be
    /// its start); the rest stays in `text` for [`read_calls`] at the end.
    fn take(&mut self, piece: String, marker: &str) -> String {
        self.text.push_str(&piece);
        if self.in_call {
            return String::new();
        }
        if let Some(at) = self.text.find(marker) {
            self.in_call = true;
            let before = self.text[..at].to_owned();
            self.text.drain(..at);
            return before;
        }
        let keep = partial_marker(&self.text, marker);
        let ready = self.text[..self.text.len() - keep].to_owned();
        self.text.drain(..self.text.len() - keep);
        ready
    }

    /// Llama 3.x: an answer that opens with `{` or `<|python_tag|>` is held whole; one that
    /// opens with anything else streams.
    fn take_start(&mut self, piece: String) -> String {
        if self.free {
            return piece;
        }
        self.text.push_str(&piece);
        if self.in_call {
            return String::new();
        }
        let start = self.text.trim_start();
        if start.is_empty() || (PYTHON_TAG.starts_with(start) && start != PYTHON_TAG) {
            return String::new();
        }
        if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
            self.in_call = true;
            return String::new();
        }
        self.free = true;
        std::mem::take(&mut self.text)
    }
}

/// How much of `text`'s end could be the start of `marker`, held back from a stream until the
/// next piece tells.
fn partial_marker(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// The calls of an assistant turn of the history, given in OpenAI's shape (`at` names the
/// field): `[{"id", "type": "function", "function": {"name", "arguments"}}]`, the arguments as
/// a string of JSON or as the object itself.
pub(crate) fn history_calls(at: &str, calls: &Value) -> Result<Vec<ToolCall>, ApiError> {
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid_param(
            at,
            format!("'{at}' must be an array, got {}", describe(calls)),
        ));
    };
    calls
        .iter()
        .enumerate()
        .map(|(j, c)| {
            let function = c.get("function");
            let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
            let Some(name) = name else {
                return Err(ApiError::invalid_param(
                    format!("{at}[{j}].function.name"),
                    format!("'{at}[{j}].function.name' must be a string"),
                ));
            };
            let arguments = match function.and_then(|f| f.get("arguments")) {
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
                None => "{}".to_owned(),
            };
            let id = match c.get("id") {
                Some(Value::String(id)) => id.clone(),
                _ => format!("call_{j}"),
            };
            Ok(ToolCall {
                id,
                name: name.to_owned(),
                arguments,
            })
        })
        .collect()
}

/// An assistant turn's earlier tool calls, written as the generic prompt asks the model to
/// write them.
fn write_calls(calls: &[ToolCall]) -> String {
    calls
        .iter()
        .map(|c| {
            // Arguments come as a string of JSON; written back as the object they stand for.
            let arguments = serde_json::from_str::<Value>(&c.arguments)
                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
            format!(
                "{CALL_OPEN}\n{}\n{CALL_CLOSE}",
                json!({"name": c.name, "arguments": arguments})
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `tool` message's result, as the user turn that carries it back.
fn write_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// Reads `response_format` (absent or null: `None`): `None` for text, else the grammar of the
/// JSON asked for.
pub(crate) fn response_format(
    format: Option<&Value>,
) -> Result<Option<OutputConstraint>, ApiError> {
    let Some(format) = format.filter(|v| !v.is_null()) else {
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
        parse(body.get("tools"), body.get("tool_choice"))
            .unwrap()
            .unwrap()
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
        assert_eq!(partial_marker("hello <tool_", CALL_OPEN), 6);
        assert_eq!(partial_marker("hello <", CALL_OPEN), 1);
        assert_eq!(partial_marker("hello", CALL_OPEN), 0);
        assert_eq!(partial_marker("é<t", CALL_OPEN), 2);
        assert_eq!(partial_marker("ok [TOOL_", MISTRAL_CALLS), 6);
    }

    #[test]
    fn tool_choice_is_checked_against_the_tools() {
        let body = json!({"tools": [], "tool_choice": "required"});
        assert!(parse(body.get("tools"), body.get("tool_choice")).is_err());
        let body = json!({
            "tools": [{"type": "function", "function": {"name": "a"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
        });
        let e = parse(body.get("tools"), body.get("tool_choice")).unwrap_err();
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
        assert_eq!(
            parse(body.get("tools"), body.get("tool_choice")).unwrap(),
            None
        );
        let body = json!({"tools": [{"type": "function", "function": {"name": "a b"}}]});
        let e = parse(body.get("tools"), body.get("tool_choice")).unwrap_err();
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
