//! The store's errors: each names the file, model or chunk at fault.

use std::path::{Path, PathBuf};

/// What went wrong in the model store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The disk holding the store is full.
    #[error(
        "no space left on the disk holding the model store ({}): free some space, or lower \
         --store-limit so that older models are evicted first",
        path.display()
    )]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// A manifest's bytes do not hash to the name it was asked by.
    #[error("the manifest received for model {expected} hashes to {actual}: refused")]
    ManifestHash {
        /// The hash asked for.
        expected: String,
        /// The hash of what came.
        actual: String,
    },
    /// A manifest that is not well formed.
    #[error("manifest of {name}: {reason}")]
    BadManifest {
        /// The model (or the manifest's file).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A chunk's bytes do not match the manifest.
    #[error("chunk {index} of {model}: {reason}")]
    BadChunk {
        /// The model's manifest hash.
        model: String,
        /// The chunk.
        index: u32,
        /// Length or hash mismatch.
        reason: String,
    },
    /// A chunk asked for that this store does not hold.
    #[error("chunk {index} of {model} is not held here")]
    NotHeld {
        /// The model's manifest hash.
        model: String,
        /// The chunk.
        index: u32,
    },
    /// A file the store cannot describe (not GGUF, or a layout it refuses).
    #[error("{}: {reason}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The store's limit leaves no room for what must be kept.
    #[error(
        "the model store's limit ({limit_mib} MiB) leaves no room for {needed_mib} MiB more of \
         {model}: raise --store-limit, or remove models with `exo-node models rm`"
    )]
    Full {
        /// The model being fetched.
        model: String,
        /// The limit.
        limit_mib: u64,
        /// What is needed on top of what is held.
        needed_mib: u64,
    },
    /// The checkpoint reader refused the file.
    #[error(transparent)]
    Model(#[from] exo_model::Error),
}

impl Error {
    /// An IO error on `path`; a full disk is named as such.
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return Error::DiskFull {
                path: path.to_owned(),
            };
        }
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// The store's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
