//! The one error type of this crate.

/// Everything that can go wrong building or running a shard.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Model(#[from] exo_model::Error),
    /// A tensor handed to the shard has the wrong shape.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which input.
        what: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Actual shape.
        actual: Vec<usize>,
    },
    /// A token id beyond the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// The request would run past the context the model supports.
    #[error("context full: {needed} positions needed, the model supports {max}")]
    ContextFull {
        /// Positions the request needs.
        needed: usize,
        /// Positions the model supports.
        max: usize,
    },
    /// An entry point was called on a shard that does not hold that part of the model.
    #[error("this shard (layers {layers}) does not hold the {part}")]
    NotHeld {
        /// `embedding` or `head`.
        part: &'static str,
        /// The shard's layer range, for the message.
        layers: String,
    },
    /// A KV cache that belongs to another shard.
    #[error("kv cache has {actual} layers but this shard has {expected}")]
    CacheMismatch {
        /// Layers of this shard.
        expected: usize,
        /// Layers of the cache.
        actual: usize,
    },
    /// Sampling could not pick a token: invalid parameters, no logits, or no possible token.
    #[error("sampling: {0}")]
    Sampling(String),
    /// The logits hold NaN: the model's arithmetic broke down (overflow in a layer, corrupt
    /// weights), so no token can be trusted.
    #[error(
        "the model produced NaN logits at {nan} of {vocab} vocabulary entries (the first at token {first})"
    )]
    NanLogits {
        /// How many logits are NaN.
        nan: usize,
        /// The vocabulary size (logits per position).
        vocab: usize,
        /// The first token id whose logit is NaN.
        first: usize,
    },
    /// The backend failed (reading a tensor back, an unavailable device).
    #[error("backend: {0}")]
    Backend(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
