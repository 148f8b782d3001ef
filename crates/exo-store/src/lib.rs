//! The model store: models kept under `$EXO_HOME/store`, each named by the hash of its
//! [`Manifest`], so that a node holds exactly the part of a model it serves and gets the rest
//! from its peers.
//!
//! A manifest describes a GGUF file, or a Hugging Face folder's files one after another, as
//! chunks: what no tensor holds (a GGUF header with its metadata and tensor table; a folder's
//! configuration and tokenizer files and each safetensors file's header) and each tensor's
//! bytes, cut into pieces of at most [`CHUNK_BYTES`], every chunk with its BLAKE3 hash. The
//! manifest's own hash (BLAKE3 of its JSON bytes) names the model across the cluster. A store
//! [`Entry`] keeps the model as a sparse copy of the file (or of each file of the folder), full
//! length, into which verified chunks are written in place, and a record of which chunks it
//! holds: the checkpoint reader opens it like any checkpoint, and a shard reads only its own
//! tensors, which are the ones fetched. A model the user gave (`--model path`) is imported: its
//! manifest is computed once (cached by path, size and modification time) and its chunks are
//! read from the user's files; the store never copies, changes or deletes them.
//!
//! Every chunk written is checked against its hash first, the record of held chunks is replaced
//! atomically after the data reached the disk, so a process killed at any moment leaves a store
//! that resumes where it stopped; a manifest whose bytes do not hash to the name asked for is
//! refused. A limit ([`Store::make_room`]) evicts the least recently used models not in use.
//!
//! This crate knows files, hashes and GGUF's layout (through `exo-model`'s parser). It must NOT
//! know networking, peers, plans or tensors' meaning: which chunks a shard needs is a question
//! of tensor names ([`Manifest::chunks_for_shard`]), and moving chunks between nodes is the node
//! runtime's business.

mod chunks;
mod disk;
mod error;
mod manifest;
mod store;

pub use chunks::ChunkSet;
pub use error::{Error, Result};
pub use manifest::{CHUNK_BYTES, Chunk, FileSpan, Manifest, ShardParts, TensorChunks, hash_hex};
pub use store::{Entry, EntryInfo, Store, default_limit};
