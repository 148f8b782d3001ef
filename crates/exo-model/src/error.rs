//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong reading a checkpoint, a tokenizer or a chat template.
///
/// Each variant names the file (or tensor) at fault so that a user can act on the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, mapped, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A GGUF file is not valid: bad magic, an unsupported version, a truncated header, a tensor
    /// that points past the end of the file.
    #[error("{path}: invalid gguf file: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What was wrong, and where.
        message: String,
    },
    /// A safetensors file (or its index) is not valid.
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors {
        /// The safetensors file or `model.safetensors.index.json`.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// `config.json` (or the GGUF metadata standing in for it) is missing a field or has a bad one.
    #[error("{path}: invalid model config: {message}")]
    Config {
        /// The file the configuration came from.
        path: PathBuf,
        /// The missing or bad field.
        message: String,
    },
    /// A tensor the model needs is absent from the checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name in the checkpoint's own naming.
        name: String,
    },
    /// A tensor has a shape other than the configuration implies.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The shape the configuration implies (rows first).
        expected: Vec<usize>,
        /// The shape the file declares (rows first).
        actual: Vec<usize>,
    },
    /// A tensor is stored in an element type this crate cannot decode.
    #[error("{path}: tensor `{name}` has unsupported type {dtype}")]
    UnsupportedDtype {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// The type as the file names it.
        dtype: String,
    },
    /// A tensor holds a NaN or an infinity where the format needs a finite number (a float
    /// value, or a quantized block's scale or minimum): the file is corrupt.
    #[error("{path}: tensor `{name}` holds a NaN or infinite {field} {index}: the file is corrupt")]
    NonFinite {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor's name.
        name: String,
        /// What was not finite: `value of element`, `scale of block` or `minimum of block`.
        field: &'static str,
        /// Which element or block.
        index: usize,
    },
    /// The tokenizer could not be built or used.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer {
        /// Where the tokenizer came from (`tokenizer.json` or the GGUF file).
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The chat template could not be parsed or rendered.
    #[error("chat template: {0}")]
    Template(String),
    /// A layer range that the model does not have.
    #[error("layer range {start}..{end} is not within the model's {layers} layers")]
    LayerRange {
        /// First layer asked for.
        start: usize,
        /// One past the last layer asked for.
        end: usize,
        /// How many layers the model has.
        layers: usize,
    },
    /// The default model could not be fetched.
    #[error("fetching the default model: {0}")]
    Fetch(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
