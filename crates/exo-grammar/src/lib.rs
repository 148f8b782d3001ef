//! Constrained decoding: the output of a request follows a JSON Schema or a grammar because,
//! at every step, the tokens that would leave it are masked out before sampling.
//!
//! [`Grammars`] is built once per model from its vocabulary (the bytes of every token and its
//! end-of-sequence ids); [`Grammars::guide`] compiles one request's
//! [`OutputConstraint`] into a [`Guide`], which restricts each step's logits
//! ([`Guide::restrict`]) and follows the sampled tokens ([`Guide::accept`]). Once the
//! grammar is complete only end-of-sequence tokens remain, so the answer ends there.
//!
//! The grammar engine underneath is llguidance. This crate knows nothing of models, tensors,
//! the network or HTTP: it sees token ids, their bytes and logits.

use std::fmt;

use exo_core::OutputConstraint;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

/// Why a grammar could not be built or followed.
#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The vocabulary cannot carry a grammar (no end-of-sequence token, say).
    #[error("the model's vocabulary cannot be used for constrained decoding: {0}")]
    Vocabulary(String),
    /// The schema or grammar is not one the engine can compile; the message names the
    /// problem.
    #[error("{0}")]
    Compile(String),
    /// Following the grammar failed mid-generation (a token it did not allow, or a limit of
    /// the engine reached).
    #[error("constrained decoding stopped: {0}")]
    Step(String),
}

/// How JSON is written under a schema unless the schema says otherwise (`x-guidance`): no
/// free whitespace, one space after `:` and `,`. A small model given free whitespace may
/// write newlines until it runs out of tokens.
fn json_layout() -> Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// What grammars are compiled against: one model's vocabulary. Build it once per model
/// (it indexes every token) and share it.
pub struct Grammars {
    factory: ParserFactory,
    eos: Vec<u32>,
}

impl fmt::Debug for Grammars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.factory.tok_env().tok_trie().vocab_size())
            .field("eos", &self.eos)
            .finish()
    }
}

impl Grammars {
    /// The grammars of a vocabulary: `token_bytes[id]` is what token `id` writes (control
    /// tokens as `0xFF` followed by their name, ids without a token empty), `eos` the ids
    /// that end a generation (at least one).
    pub fn new(token_bytes: &[Vec<u8>], eos: &[u32]) -> Result<Self, GrammarError> {
        let vocab = token_bytes.len();
        let eos: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&id| (id as usize) < vocab)
            .collect();
        let Some(&first) = eos.first() else {
            return Err(GrammarError::Vocabulary(format!(
                "no end-of-sequence token among its {vocab} tokens"
            )));
        };
        let vocab_size = u32::try_from(vocab)
            .map_err(|_| GrammarError::Vocabulary(format!("{vocab} tokens is too many")))?;
        let info = TokRxInfo::new(vocab_size, first);
        let trie = TokTrie::from(&info, token_bytes).with_eos_tokens(&eos);
        let env: TokEnv = std::sync::Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory, eos })
    }

    /// Compiles `constraint` for one generation. A schema that is not JSON, or a schema or
    /// grammar the engine cannot compile, is an error whose message names the problem.
    pub fn guide(&self, constraint: &OutputConstraint) -> Result<Guide, GrammarError> {
        let grammar = match constraint {
            OutputConstraint::JsonSchema(text) => {
                let mut schema: Value = serde_json::from_str(text)
                    .map_err(|e| GrammarError::Compile(format!("the schema is not JSON: {e}")))?;
                match &mut schema {
                    Value::Object(map) => {
                        map.entry("x-guidance").or_insert_with(json_layout);
                    }
                    Value::Bool(_) => {}
                    other => {
                        return Err(GrammarError::Compile(format!(
                            "a JSON schema is an object or a boolean, not {}",
                            kind(other)
                        )));
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            OutputConstraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(clean(&e.to_string())))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(GrammarError::Compile(clean(&error)));
        }
        Ok(Guide {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// The engine's messages can carry the whole grammar and parser state; the first line says
/// what is wrong.
fn clean(message: &str) -> String {
    let line = message.lines().next().unwrap_or(message).trim();
    let mut line = line.to_owned();
    if line.len() > 500 {
        let mut end = 500;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push('…');
    }
    line
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const NOTHING_ALLOWED: &str = "the grammar allows no token of this model's vocabulary here: \
     what it needs next cannot be written with this model's tokens";

/// One generation's grammar, following the tokens sampled so far.
pub struct Guide {
    matcher: Matcher,
    eos: Vec<u32>,
}

impl fmt::Debug for Guide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guide")
            .field("finished", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// Sets to `-inf` the logit of every token the grammar does not allow next (and of ids
    /// past the vocabulary). Once the grammar is complete only end-of-sequence tokens stay.
    pub fn restrict(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let mask = self.matcher.compute_mask_or_eos().map_err(|e| {
            let message = e.to_string();
            // The engine's name for a mask with nothing in it.
            if message.contains("NoExtensionBias") {
                GrammarError::Step(NOTHING_ALLOWED.into())
            } else {
                GrammarError::Step(clean(&message))
            }
        })?;
        // The mask covers the tokenizer's ids; a model may have more rows (padding), which
        // no grammar allows.
        let vocab = mask.len();
        let mut allowed = 0usize;
        for (id, logit) in logits.iter_mut().enumerate() {
            if id < vocab && mask.is_allowed(id as u32) {
                allowed += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if allowed == 0 {
            return Err(GrammarError::Step(NOTHING_ALLOWED.into()));
        }
        Ok(())
    }

    /// Follows a sampled token. An end-of-sequence token ends the generation and is not
    /// followed.
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.eos.contains(&token) {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Step(clean(&e.to_string())))
    }

    /// Follows tokens sampled before (a request resumed on another plan).
    pub fn replay(&mut self, tokens: &[u32]) -> Result<(), GrammarError> {
        tokens.iter().try_for_each(|&t| self.accept(t))
    }

    /// Whether the grammar is complete: nothing but an end-of-sequence token may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests;
