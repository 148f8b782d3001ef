//! A model's manifest: its GGUF file as hashed chunks, and which chunks each tensor spans.

use std::io::Read;
use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::chunks::ChunkSet;
use crate::error::{Error, Result};

/// The most bytes one chunk holds: small enough that a shard's tensors are fetched from several
/// peers at once and an interrupted fetch loses little, large enough that a 8B model has a few
/// thousand chunks.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// The format tag of the manifests this version writes and reads.
const FORMAT: &str = "exo-gguf-manifest-1";

/// The most chunks a manifest may list (16 TiB of 4 MiB chunks).
const MAX_CHUNKS: usize = 1 << 22;

/// One chunk: a byte range of the file and its BLAKE3 hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Offset in the file.
    pub offset: u64,
    /// Length in bytes (at most the manifest's `chunk_bytes`).
    pub len: u64,
    /// BLAKE3 of the bytes, 64 lowercase hex digits.
    pub hash: String,
}

/// Where one tensor's bytes are: its chunks are `first .. first + count`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorChunks {
    /// The tensor's GGUF name (`blk.3.attn_q.weight`).
    pub name: String,
    /// Offset of its data in the file.
    pub offset: u64,
    /// Length of its data.
    pub bytes: u64,
    /// Its first chunk.
    pub first: u32,
    /// How many chunks it spans.
    pub count: u32,
}

/// What part of the model a shard holds, for [`Manifest::chunks_for_shard`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardParts {
    /// Decoder layers.
    pub layers: Range<usize>,
    /// Whether it embeds tokens (the first stage).
    pub embedding: bool,
    /// Whether it holds the final norm and the head (the last stage).
    pub head: bool,
}

/// A GGUF model file as chunks: the header's, then each tensor's, in file order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `exo-gguf-manifest-1`.
    pub format: String,
    /// The file's name (`SmolLM2-135M-Instruct.Q4_1.gguf`): what the cluster calls the model.
    pub name: String,
    /// The file's length.
    pub bytes: u64,
    /// The most bytes of one chunk.
    pub chunk_bytes: u64,
    /// Chunks `0 .. header_chunks` hold the header (metadata and tensor table), which every
    /// node needs.
    pub header_chunks: u32,
    /// Every tensor and the chunks it spans.
    pub tensors: Vec<TensorChunks>,
    /// Every chunk.
    pub chunks: Vec<Chunk>,
}

/// BLAKE3 of `bytes` as 64 lowercase hex digits.
pub fn hash_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

impl Manifest {
    /// Describes the GGUF file at `path`, hashing every chunk (BLAKE3: about a second per GB on
    /// one core). `progress` is told the bytes hashed so far.
    pub fn of_gguf(path: &Path, progress: impl FnMut(u64, u64)) -> Result<Manifest> {
        Manifest::of_gguf_chunked(path, CHUNK_BYTES, progress)
    }

    /// [`Manifest::of_gguf`] with chunks of at most `chunk_bytes` (tests use small ones to
    /// have many chunks in a tiny model).
    pub fn of_gguf_chunked(
        path: &Path,
        chunk_bytes: u64,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Manifest> {
        let chunk_bytes = chunk_bytes.clamp(1, 64 << 20);
        let gguf = exo_model::gguf::GgufFile::open_index(path)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Unsupported {
                path: path.to_owned(),
                reason: "the file's name is not UTF-8".to_owned(),
            })?
            .to_owned();
        let bytes = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        let mut tensors: Vec<(String, u64, u64)> = gguf
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.offset as u64, t.len as u64))
            .collect();
        tensors.sort_by_key(|t| t.1);
        drop(gguf);
        let data_start = tensors.first().map_or(bytes, |t| t.1);
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let cut = |start: u64, len: u64, ranges: &mut Vec<(u64, u64)>| {
            let first = ranges.len() as u32;
            let mut at = start;
            while at < start + len {
                let piece = chunk_bytes.min(start + len - at);
                ranges.push((at, piece));
                at += piece;
            }
            (first, ranges.len() as u32 - first)
        };
        let (_, header_chunks) = cut(0, data_start, &mut ranges);
        let mut table = Vec::with_capacity(tensors.len());
        let mut end = data_start;
        for (name, offset, len) in tensors {
            if offset < end {
                return Err(Error::Unsupported {
                    path: path.to_owned(),
                    reason: format!("tensor {name} overlaps the tensor before it"),
                });
            }
            let (first, count) = cut(offset, len, &mut ranges);
            end = offset + len;
            table.push(TensorChunks {
                name,
                offset,
                bytes: len,
                first,
                count,
            });
        }
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut chunks = Vec::with_capacity(ranges.len());
        let mut position = 0u64;
        // Read in small pieces: a buffer of a whole chunk (megabytes) would raise the
        // allocator's threshold for mapping large blocks, and the node would keep more of the
        // memory its later loads free.
        let mut buffer = vec![0u8; 64 << 10];
        let mut done = 0u64;
        for (offset, len) in ranges {
            // Skip the padding between tensors (GGUF aligns each tensor's data).
            if offset > position {
                std::io::copy(
                    &mut (&mut file).take(offset - position),
                    &mut std::io::sink(),
                )
                .map_err(|e| Error::io(path, e))?;
            }
            let mut hasher = blake3::Hasher::new();
            let mut left = len;
            while left > 0 {
                let piece = &mut buffer[..left.min(64 << 10) as usize];
                file.read_exact(piece).map_err(|e| Error::io(path, e))?;
                hasher.update(piece);
                left -= piece.len() as u64;
            }
            position = offset + len;
            chunks.push(Chunk {
                offset,
                len,
                hash: hasher.finalize().to_hex().to_string(),
            });
            done += len;
            progress(done, bytes);
        }
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            name,
            bytes,
            chunk_bytes,
            header_chunks,
            tensors: table,
            chunks,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// The manifest as the JSON bytes its hash is taken over.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks manifest bytes that must hash to `expected` (from a peer, or read back
    /// from the store): every offset, length and index is checked before anything is sized by
    /// it.
    pub fn from_bytes(bytes: &[u8], expected: &str) -> Result<Manifest> {
        let actual = hash_hex(bytes);
        if actual != expected {
            return Err(Error::ManifestHash {
                expected: expected.to_owned(),
                actual,
            });
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| Error::BadManifest {
            name: expected.to_owned(),
            reason: e.to_string(),
        })?;
        manifest.check()?;
        Ok(manifest)
    }

    /// The manifest's hash: BLAKE3 of [`Manifest::to_bytes`].
    pub fn hash(&self) -> String {
        hash_hex(&self.to_bytes())
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::BadManifest {
                name: self.name.clone(),
                reason,
            })
        };
        if self.format != FORMAT {
            return bad(format!("format {:?}, expected {FORMAT:?}", self.format));
        }
        let plain_name = !self.name.is_empty()
            && self.name.len() <= 255
            && !self.name.starts_with('.')
            && !self
                .name
                .chars()
                .any(|c| matches!(c, '/' | '\\' | ':' | '\0') || c.is_control());
        if !plain_name {
            return bad(format!("{:?} is not a plain file name", self.name));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes > 64 << 20 {
            return bad(format!("chunk size {} out of range", self.chunk_bytes));
        }
        if self.chunks.len() > MAX_CHUNKS || self.tensors.len() > MAX_CHUNKS {
            return bad("too many chunks or tensors".to_owned());
        }
        let mut end = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            let fits = c.len > 0
                && c.len <= self.chunk_bytes
                && c.offset >= end
                && c.offset.checked_add(c.len).is_some_and(|e| e <= self.bytes);
            if !fits {
                return bad(format!("chunk {i} is out of order or out of the file"));
            }
            if c.hash.len() != 64 || !c.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return bad(format!("chunk {i}'s hash is not 64 hex digits"));
            }
            end = c.offset + c.len;
        }
        let header = self.header_chunks as usize;
        if header > self.chunks.len() || (header > 0 && self.chunks[0].offset != 0) {
            return bad("the header chunks do not start the file".to_owned());
        }
        for t in &self.tensors {
            let range = t.first as usize..t.first as usize + t.count as usize;
            let Some(chunks) = self.chunks.get(range.clone()) else {
                return bad(format!("tensor {} names chunks past the end", t.name));
            };
            let covered = range.start >= header
                && chunks.first().is_none_or(|c| c.offset == t.offset)
                && chunks
                    .windows(2)
                    .all(|w| w[0].offset + w[0].len == w[1].offset)
                && chunks.iter().map(|c| c.len).sum::<u64>() == t.bytes;
            if !covered {
                return bad(format!("tensor {}'s chunks do not cover its bytes", t.name));
            }
        }
        Ok(())
    }

    /// How many chunks the model has.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// The header's chunks.
    pub fn header(&self) -> ChunkSet {
        ChunkSet::all(self.header_chunks)
    }

    /// Bytes of the chunks in `set`.
    pub fn bytes_of(&self, set: &ChunkSet) -> u64 {
        set.iter()
            .filter_map(|i| self.chunks.get(i as usize))
            .map(|c| c.len)
            .sum()
    }

    /// The chunks a shard of `parts` reads, header included: its layers' tensors (`blk.N.*`),
    /// the embedding (`token_embd.*`) on the first stage, the final norm and head
    /// (`output_norm.*`, `output.*`, or the embedding when the head is tied to it) on the last,
    /// and every other tensor that belongs to no layer (such as `rope_freqs.weight`).
    pub fn chunks_for_shard(&self, parts: &ShardParts) -> ChunkSet {
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        let mut flags = vec![false; self.chunks.len()];
        for flag in flags.iter_mut().take(self.header_chunks as usize) {
            *flag = true;
        }
        for t in &self.tensors {
            let wanted = if let Some(rest) = t.name.strip_prefix("blk.") {
                rest.split('.')
                    .next()
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|layer| parts.layers.contains(&layer))
            } else if t.name.starts_with("token_embd.") {
                parts.embedding || (parts.head && tied)
            } else if t.name.starts_with("output_norm.") || t.name.starts_with("output.") {
                parts.head
            } else {
                true
            };
            if wanted {
                for flag in &mut flags[t.first as usize..t.first as usize + t.count as usize] {
                    *flag = true;
                }
            }
        }
        ChunkSet::from_flags(&flags)
    }
}
