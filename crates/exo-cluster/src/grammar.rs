//! The model's grammars for constrained decoding, built on first use: the origin compiles a
//! request's constraint to refuse one the engine cannot follow (a 400 naming the problem),
//! and the last stage compiles it again to mask each step's logits.

use std::sync::{Arc, OnceLock};

use exo_core::{GenerationError, OutputConstraint};
use exo_grammar::{Grammars, Guide};
use exo_model::Tokenizer;

/// A model's vocabulary, indexed for grammars the first time a request asks for one (it
/// takes a moment, and most requests never do).
#[derive(Debug)]
pub(crate) struct ModelGrammars {
    tokenizer: Tokenizer,
    eos: Vec<u32>,
    built: OnceLock<Result<Arc<Grammars>, String>>,
}

impl ModelGrammars {
    pub(crate) fn new(tokenizer: Tokenizer, eos: Vec<u32>) -> Self {
        ModelGrammars {
            tokenizer,
            eos,
            built: OnceLock::new(),
        }
    }

    fn grammars(&self) -> Result<Arc<Grammars>, String> {
        self.built
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let bytes = self.tokenizer.token_bytes().map_err(|e| e.to_string())?;
                let grammars = Grammars::new(&bytes, &self.eos).map_err(|e| e.to_string())?;
                tracing::info!(
                    tokens = bytes.len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "indexed the vocabulary for constrained decoding"
                );
                Ok(Arc::new(grammars))
            })
            .clone()
    }

    /// Compiles `constraint` for one generation. A constraint the engine cannot compile is
    /// the caller's error (`param` "constraint", which the API renames after the field it
    /// came from); a vocabulary that cannot carry grammars is this server's.
    pub(crate) fn guide(&self, constraint: &OutputConstraint) -> Result<Guide, GenerationError> {
        let grammars = self.grammars().map_err(GenerationError::Unavailable)?;
        grammars
            .guide(constraint)
            .map_err(|e| GenerationError::invalid("constraint", e.to_string()))
    }
}
