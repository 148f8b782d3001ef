//! What is asked of the model and what comes back.

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

use crate::error::GenerationError;

/// One chat message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool` (or whatever else the model's chat template
    /// accepts).
    pub role: String,
    /// The message text.
    pub content: String,
    /// The tools an `assistant` turn called (empty when it called none).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub tool_calls: Vec<ToolCall>,
    /// On a `tool` turn: the id of the call whose result it carries.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }
}

/// A call of a tool, as an assistant turn in a chat's history made it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ToolCall {
    /// The call's id, which the `tool` turn carrying its result names.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments, as the text of a JSON object.
    pub arguments: String,
}

/// A function a chat offers the model, handed to the chat template (which decides how the
/// model is told of it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct ToolSpec {
    /// The function's name.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON Schema of its arguments, as text.
    pub parameters: String,
}

/// How a model's chat template teaches it to call tools: the syntax its answers write calls
/// in, which the API reads them back out of and constrains them to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize, Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum ToolSyntax {
    /// Hermes' and Qwen's: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks.
    Hermes,
    /// Llama 3.x's: the answer is `{"name": ..., "parameters": {...}}` (after `<|python_tag|>`
    /// in some versions).
    Llama3,
    /// Mistral's: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
    Mistral,
}

impl ToolSyntax {
    /// The name written in logs and model listings (`hermes`, `llama3`, `mistral`).
    pub fn name(self) -> &'static str {
        match self {
            ToolSyntax::Hermes => "hermes",
            ToolSyntax::Llama3 => "llama3",
            ToolSyntax::Mistral => "mistral",
        }
    }

    /// The syntax of [`ToolSyntax::name`]; `None` for a name not known.
    pub fn from_name(name: &str) -> Option<Self> {
        [ToolSyntax::Hermes, ToolSyntax::Llama3, ToolSyntax::Mistral]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// What to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize, Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum Prompt {
    /// Messages, rendered with the model's chat template (which opens the assistant's turn).
    Chat(Vec<ChatMessage>),
    /// Text continued as is, without the chat template; special tokens written in it
    /// (`<|im_start|>`) are plain text, so a user cannot forge a turn.
    Text(String),
    /// Text continued as is, in which special tokens written out are the control tokens they
    /// name: for a caller that writes the model's own format (opted into per request).
    Raw(String),
    /// Token ids of the model's own vocabulary, continued as they are (a caller that
    /// tokenized the text itself, with the model's tokenizer).
    Tokens(Vec<u32>),
}

/// How the next token is picked from the logits.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); higher values flatten the distribution.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: u32,
    /// Seed of the random choice: the same seed and settings give the same text.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    /// Whether every choice is the most likely token (no randomness at all).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the ranges: temperature a finite number >= 0, top_p in (0, 1].
    pub fn validate(&self) -> Result<(), GenerationError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(GenerationError::invalid(
                "temperature",
                format!(
                    "temperature must be a number >= 0, got {}",
                    self.temperature
                ),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GenerationError::invalid(
                "top_p",
                format!("top_p must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

/// OpenAI's adjustments of the logits before sampling: penalties on tokens already generated
/// (not the prompt's) and fixed biases by token id.
#[derive(Clone, Debug, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Penalties {
    /// Subtracted once from the logit of every token generated at least once (-2 to 2).
    pub presence: f32,
    /// Subtracted from a token's logit for each time it was generated (-2 to 2).
    pub frequency: f32,
    /// Added to these tokens' logits (-100 to 100; -100 in effect bans a token).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Penalties {
    /// The most entries `logit_bias` may hold.
    pub const MAX_BIASES: usize = 1024;

    /// Whether these change nothing.
    pub fn is_none(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0 && self.logit_bias.is_empty()
    }

    /// Whether they depend on the tokens generated so far.
    pub fn uses_history(&self) -> bool {
        self.presence != 0.0 || self.frequency != 0.0
    }

    /// Checks the ranges (the vocabulary is checked where it is known).
    pub fn validate(&self) -> Result<(), GenerationError> {
        for (name, value) in [
            ("presence_penalty", self.presence),
            ("frequency_penalty", self.frequency),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(GenerationError::invalid(
                    name,
                    format!("{name} must be between -2 and 2, got {value}"),
                ));
            }
        }
        if self.logit_bias.len() > Self::MAX_BIASES {
            return Err(GenerationError::invalid(
                "logit_bias",
                format!(
                    "logit_bias may hold at most {} tokens, got {}",
                    Self::MAX_BIASES,
                    self.logit_bias.len()
                ),
            ));
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(GenerationError::invalid(
                "logit_bias",
                format!("the bias of token {token} must be between -100 and 100, got {bias}"),
            ));
        }
        Ok(())
    }
}

/// A grammar the output must follow, enforced while sampling (constrained decoding): every
/// token that would leave it is masked out, and the generation ends once it is complete.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize, Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum OutputConstraint {
    /// A JSON value valid against this JSON Schema (the schema's JSON text).
    /// `{"type": "object"}` asks for any JSON object.
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect (which embeds JSON schemas with `%json`): the
    /// tool calls of a request that must call a tool.
    Lark(String),
}

impl OutputConstraint {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        OutputConstraint::JsonSchema(r#"{"type":"object"}"#.to_owned())
    }
}

/// One generation asked of the cluster (or of a single process).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct GenerationRequest {
    /// The model id as the client gave it; empty for the one model being served.
    pub model: String,
    /// What to continue.
    pub prompt: Prompt,
    /// The most tokens to generate; `None` leaves it to the server's default, within the
    /// model's context.
    pub max_tokens: Option<u32>,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Generation stops before the first of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (benchmarks, parity tests).
    pub ignore_eos: bool,
    /// A grammar the output must follow; `None` leaves it free.
    pub constraint: Option<OutputConstraint>,
    /// Penalties and biases applied to the logits before sampling.
    pub penalties: Penalties,
    /// Report each generated token's log-probability, with this many of the most likely
    /// alternatives (at most [`GenerationRequest::MAX_TOP_LOGPROBS`]); `None`: do not.
    pub logprobs: Option<u32>,
    /// Instead of generating, compute the prompt's embedding: one
    /// [`GenerationEvent::Embedding`], then [`GenerationEvent::Finished`] with no tokens.
    pub embed: bool,
    /// Also report the prompt's tokens' log-probabilities (each under the tokens before it),
    /// with this many of the most likely alternatives (at most
    /// [`GenerationRequest::MAX_TOP_LOGPROBS`]): one [`GenerationEvent::PromptLogprobs`]
    /// before the first generated token. `None`: do not.
    pub prompt_logprobs: Option<u32>,
    /// The functions a chat prompt offers the model, written into the prompt by the model's
    /// chat template. Only for [`Prompt::Chat`] with a model whose template has a
    /// [`ToolSyntax`]; the API lowers tools to plain messages for any other model.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Vec::is_empty")
    )]
    pub tools: Vec<ToolSpec>,
    /// Requests with the same key and the same prompt are choices of one answer: the engine may
    /// compute the prompt once, for the first of them, and start the others from its keys and
    /// values.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub share_prefill: Option<u64>,
}

impl GenerationRequest {
    /// The most alternatives a token's log-probability may come with.
    pub const MAX_TOP_LOGPROBS: u32 = 20;

    /// A greedy request for `prompt` with the server's defaults.
    pub fn new(prompt: Prompt) -> Self {
        GenerationRequest {
            model: String::new(),
            prompt,
            max_tokens: None,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
            constraint: None,
            penalties: Penalties::default(),
            logprobs: None,
            embed: false,
            prompt_logprobs: None,
            tools: Vec::new(),
            share_prefill: None,
        }
    }

    /// A request for the embedding of `text` (taken as is, without the chat template).
    pub fn embedding(text: impl Into<String>) -> Self {
        GenerationRequest {
            embed: true,
            max_tokens: Some(0),
            ..GenerationRequest::new(Prompt::Text(text.into()))
        }
    }
}

/// Why a generation ended, in OpenAI's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize, Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason` value.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a generation.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Tokens in the prompt after templating.
    pub prompt_tokens: u32,
    /// Every generated id, in order (a final end-of-sequence token included).
    pub token_ids: Vec<u32>,
    /// Seconds from the start to the first generated token.
    pub time_to_first_token_s: f64,
    /// Seconds from the first generated token to the last.
    pub decode_s: f64,
}

impl Finished {
    /// Tokens generated.
    pub fn completion_tokens(&self) -> u32 {
        self.token_ids.len() as u32
    }

    /// Generated tokens per second after the first one (0 with fewer than two).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let steps = self.token_ids.len().saturating_sub(1);
        if steps == 0 || self.decode_s <= 0.0 {
            return 0.0;
        }
        steps as f64 / self.decode_s
    }
}

/// A token as text, for log-probabilities.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct TokenText {
    /// The token's text (lossy where its bytes are part of a character).
    pub token: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// One generated token's log-probability and the most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Logprob {
    /// The generated token.
    pub chosen: TokenText,
    /// The most likely tokens at its position, most likely first.
    pub top: Vec<TokenText>,
}

/// The prompt's tokens with their log-probabilities (completions' `echo` with `logprobs`).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct PromptLogprobs {
    /// The prompt's first token, which nothing before it predicts (its `logprob` is 0 and
    /// means nothing).
    pub first: TokenText,
    /// Every later prompt token, under the tokens before it, with the most likely
    /// alternatives at its position.
    pub rest: Vec<Logprob>,
}

/// What a generation streams: text pieces as they are decided, then exactly one
/// [`GenerationEvent::Finished`].
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(
    feature = "serde",
    derive(Serialize, Deserialize),
    serde(rename_all = "snake_case")
)]
pub enum GenerationEvent {
    /// The next piece of text (one token or several, or none of a character held back until
    /// it is complete).
    Text(String),
    /// A generated token's log-probability (when asked), before the text it completes.
    Logprob(Logprob),
    /// The prompt's embedding (a request with [`GenerationRequest::embed`]): the mean of its
    /// last hidden states after the final norm, L2-normalised.
    Embedding(Vec<f32>),
    /// The prompt's tokens' log-probabilities (a request with
    /// [`GenerationRequest::prompt_logprobs`]), before any text.
    PromptLogprobs(PromptLogprobs),
    /// The end; always the last event.
    Finished(Finished),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn sampling_ranges_are_checked_and_name_the_parameter() {
        assert!(SamplingParams::greedy().validate().is_ok());
        let hot = SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        };
        let e = hot.validate().unwrap_err();
        assert!(e.to_string().contains("temperature"), "{e}");
        let nan = SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::greedy()
        };
        assert!(matches!(
            nan.validate(),
            Err(GenerationError::Invalid { param: Some(p), .. }) if p == "top_p"
        ));
    }

    #[test]
    fn decode_speed_counts_steps_after_the_first_token() {
        let f = Finished {
            reason: FinishReason::Length,
            prompt_tokens: 3,
            token_ids: vec![1, 2, 3],
            time_to_first_token_s: 0.1,
            decode_s: 0.5,
        };
        assert_eq!(f.completion_tokens(), 3);
        assert!((f.decode_tokens_per_s() - 4.0).abs() < 1e-9);
    }
}
