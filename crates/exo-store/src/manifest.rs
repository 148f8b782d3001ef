//! A model's manifest: its GGUF file, or its Hugging Face folder's files, as hashed chunks, and
//! which chunks each tensor spans.

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
const FORMAT: &str = "exo-model-manifest-1";

/// The files of a Hugging Face folder the store keeps: what the checkpoint reader opens
/// (configuration, tokenizer, chat template, weights), not other formats' weights beside them.
pub(crate) fn kept_in_folder(name: &str) -> bool {
    !name.starts_with('.')
        && [".json", ".safetensors", ".jinja", ".txt", ".model"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

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

/// One file of the model: its bytes are `offset .. offset + bytes` of the model's bytes (its
/// files one after another, in order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpan {
    /// The file's name (in a folder, relative to it; a GGUF model is one file, `name`).
    pub name: String,
    /// Where it starts in the model's bytes.
    pub offset: u64,
    /// Its length.
    pub bytes: u64,
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

/// A model as chunks: a GGUF file's header, then each tensor's bytes; or a Hugging Face
/// folder's files one after another, the safetensors files' headers and the small files as
/// chunks of their own and each tensor's bytes cut the same way. Chunk and tensor offsets are
/// in the model's bytes (the files one after another); no chunk spans two files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// `exo-model-manifest-1`.
    pub format: String,
    /// The file's or folder's name (`SmolLM2-135M-Instruct.Q4_1.gguf`): what the cluster calls
    /// the model.
    pub name: String,
    /// Whether the model is a folder (else one GGUF file).
    pub folder: bool,
    /// The files, in order (one for a GGUF model).
    pub files: Vec<FileSpan>,
    /// The model's length: its files' lengths added.
    pub bytes: u64,
    /// The most bytes of one chunk.
    pub chunk_bytes: u64,
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
    /// Describes the model at `path` (a GGUF file, or a Hugging Face folder of safetensors),
    /// hashing every chunk (BLAKE3: about a second per GB on one core). `progress` is told the
    /// bytes hashed so far.
    pub fn of_model(path: &Path, progress: impl FnMut(u64, u64)) -> Result<Manifest> {
        Manifest::of_model_chunked(path, CHUNK_BYTES, progress)
    }

    /// [`Manifest::of_model`] with chunks of at most `chunk_bytes` (tests use small ones to
    /// have many chunks in a tiny model).
    pub fn of_model_chunked(
        path: &Path,
        chunk_bytes: u64,
        progress: impl FnMut(u64, u64),
    ) -> Result<Manifest> {
        let chunk_bytes = chunk_bytes.clamp(1, 64 << 20);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Unsupported {
                path: path.to_owned(),
                reason: "the name is not UTF-8".to_owned(),
            })?
            .to_owned();
        let folder = path.is_dir();
        // Each file's name, length, and its tensors.
        let mut files: Vec<(String, u64, Vec<TensorAt>)> = Vec::new();
        if folder {
            let read = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
            let mut names: Vec<String> = read
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| kept_in_folder(n))
                .collect();
            names.sort();
            for file in names {
                let at = path.join(&file);
                let bytes = std::fs::metadata(&at).map_err(|e| Error::io(&at, e))?.len();
                let tensors = if file.ends_with(".safetensors") {
                    safetensors_table(&at, bytes)?
                } else {
                    Vec::new()
                };
                files.push((file, bytes, tensors));
            }
        } else {
            let gguf = exo_model::gguf::GgufFile::open_index(path)?;
            let tensors = gguf
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), t.offset as u64, t.len as u64))
                .collect();
            drop(gguf);
            let bytes = std::fs::metadata(path)
                .map_err(|e| Error::io(path, e))?
                .len();
            files.push((name.clone(), bytes, tensors));
        }
        // Cut each file: the bytes before, between and after its tensors in chunks of their
        // own (headers, small files; GGUF's zero padding between tensors in none), each
        // tensor's bytes in chunks of at most `chunk_bytes`.
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
        let mut spans = Vec::with_capacity(files.len());
        let mut table = Vec::new();
        let mut base = 0u64;
        for (file, bytes, mut tensors) in files {
            tensors.sort_by_key(|t| t.1);
            let data_start = tensors.first().map_or(bytes, |t| t.1);
            cut(base, data_start, &mut ranges);
            let mut end = data_start;
            for (tensor, offset, len) in tensors {
                if offset < end || offset + len > bytes {
                    return Err(Error::Unsupported {
                        path: path.join(&file),
                        reason: format!("tensor {tensor} overlaps another or the file's end"),
                    });
                }
                if !folder && offset > end {
                    // GGUF's alignment padding: zeros, in no chunk.
                } else if offset > end {
                    cut(base + end, offset - end, &mut ranges);
                }
                let (first, count) = cut(base + offset, len, &mut ranges);
                end = offset + len;
                table.push(TensorChunks {
                    name: tensor,
                    offset: base + offset,
                    bytes: len,
                    first,
                    count,
                });
            }
            if folder && end < bytes {
                cut(base + end, bytes - end, &mut ranges);
            }
            spans.push(FileSpan {
                name: file,
                offset: base,
                bytes,
            });
            base += bytes;
        }
        let chunks = hash_ranges(path, folder, &spans, &ranges, progress, base)?;
        let manifest = Manifest {
            format: FORMAT.to_owned(),
            name,
            folder,
            files: spans,
            bytes: base,
            chunk_bytes,
            tensors: table,
            chunks,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// The file holding the model's byte `offset`: its index and the offset within it.
    pub fn file_of(&self, offset: u64) -> Option<(usize, u64)> {
        let i = self.files.partition_point(|f| f.offset + f.bytes <= offset);
        let file = self.files.get(i)?;
        (offset >= file.offset).then(|| (i, offset - file.offset))
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
        for name in std::iter::once(&self.name).chain(self.files.iter().map(|f| &f.name)) {
            if !plain_name(name) {
                return bad(format!("{name:?} is not a plain file name"));
            }
        }
        // One file for a GGUF model, named as the model; a folder's files in order, end to end.
        let single = !self.folder && self.files.len() == 1 && self.files[0].name == self.name;
        if !self.folder && !single {
            return bad("a GGUF model is one file of its own name".to_owned());
        }
        let mut at = 0u64;
        for f in &self.files {
            if f.offset != at || f.name.ends_with(".partial") {
                return bad(format!("file {} is out of place", f.name));
            }
            at = match at.checked_add(f.bytes) {
                Some(a) => a,
                None => return bad("the files' lengths overflow".to_owned()),
            };
        }
        let names: std::collections::HashSet<&str> =
            self.files.iter().map(|f| f.name.as_str()).collect();
        if at != self.bytes || names.len() != self.files.len() || self.files.len() > 4096 {
            return bad("the files do not add up to the model".to_owned());
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
            let within_one_file = self
                .file_of(c.offset)
                .is_some_and(|(f, at)| at + c.len <= self.files[f].bytes);
            if !within_one_file {
                return bad(format!("chunk {i} spans two files"));
            }
            end = c.offset + c.len;
        }
        for t in &self.tensors {
            let range = t.first as usize..t.first as usize + t.count as usize;
            let Some(chunks) = self.chunks.get(range.clone()) else {
                return bad(format!("tensor {} names chunks past the end", t.name));
            };
            let covered = chunks.first().is_none_or(|c| c.offset == t.offset)
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

    /// Whether `asked` names this model: its file's (or folder's) name, or that name without
    /// `.gguf`.
    pub fn answers_to(&self, asked: &str) -> bool {
        answers_to(&self.name, asked)
    }

    /// How many chunks the model has.
    pub fn chunk_count(&self) -> u32 {
        self.chunks.len() as u32
    }

    /// The chunks of no tensor: the GGUF header (metadata and tensor table), or a folder's
    /// configuration, tokenizer and safetensors headers. Every node needs them.
    pub fn header(&self) -> ChunkSet {
        let mut flags = vec![true; self.chunks.len()];
        for t in &self.tensors {
            for flag in &mut flags[t.first as usize..t.first as usize + t.count as usize] {
                *flag = false;
            }
        }
        ChunkSet::from_flags(&flags)
    }

    /// Bytes of the chunks in `set`.
    pub fn bytes_of(&self, set: &ChunkSet) -> u64 {
        set.iter()
            .filter_map(|i| self.chunks.get(i as usize))
            .map(|c| c.len)
            .sum()
    }

    /// The chunks a shard of `parts` reads, header included: its layers' tensors (GGUF's
    /// `blk.N.*`, Hugging Face's `model.layers.N.*`), the embedding (`token_embd.*`,
    /// `model.embed_tokens.*`) on the first stage and on the last when the head is tied to it,
    /// the final norm and head (`output_norm.*`, `output.*`; `model.norm.*`, `lm_head.*`) on
    /// the last, every other tensor that belongs to no layer (such as `rope_freqs.weight`),
    /// and every chunk of no tensor.
    pub fn chunks_for_shard(&self, parts: &ShardParts) -> ChunkSet {
        let tied = !self
            .tensors
            .iter()
            .any(|t| t.name == "output.weight" || t.name == "lm_head.weight");
        let header = self.header();
        let mut flags: Vec<bool> = (0..self.chunks.len())
            .map(|i| header.contains(i as u32))
            .collect();
        for t in &self.tensors {
            let layer = ["blk.", "model.layers."]
                .iter()
                .find_map(|p| t.name.strip_prefix(p))
                .map(|rest| rest.split('.').next().and_then(|n| n.parse::<usize>().ok()));
            let starts = |prefixes: &[&str]| prefixes.iter().any(|p| t.name.starts_with(p));
            let wanted = if let Some(layer) = layer {
                layer.is_some_and(|l| parts.layers.contains(&l))
            } else if starts(&["token_embd.", "model.embed_tokens."]) {
                parts.embedding || (parts.head && tied)
            } else if starts(&["output_norm.", "output.", "model.norm.", "lm_head."]) {
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

/// Whether `asked` names the model whose file (or folder) is `name`.
pub(crate) fn answers_to(name: &str, asked: &str) -> bool {
    asked == name || name.strip_suffix(".gguf") == Some(asked)
}

/// A tensor in a file: its name, offset in the file and length.
type TensorAt = (String, u64, u64);

/// Whether `name` is a plain file name: no separators, no parent, nothing hidden or odd.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && !name
            .chars()
            .any(|c| matches!(c, '/' | '\\' | ':' | '\0') || c.is_control())
}

/// A safetensors file's tensors as (name, offset in the file, length), from its header (an
/// 8-byte little-endian length, then JSON), every number checked against the file's `bytes`.
fn safetensors_table(path: &Path, bytes: u64) -> Result<Vec<TensorAt>> {
    let bad = |reason: String| Error::Unsupported {
        path: path.to_owned(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(length);
    if header_len > (100 << 20) || 8 + header_len > bytes {
        return Err(bad(format!("a safetensors header of {header_len} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("its header: {e}")))?;
    let serde_json::Value::Object(entries) = value else {
        return Err(bad("its header is not an object".to_owned()));
    };
    let data_start = 8 + header_len;
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let offsets = entry["data_offsets"]
            .as_array()
            .and_then(|a| Some((a.first()?.as_u64()?, a.get(1)?.as_u64()?)));
        let Some((begin, end)) = offsets.filter(|(b, e)| b <= e) else {
            return Err(bad(format!("tensor {name} has no data offsets")));
        };
        if data_start + end > bytes {
            return Err(bad(format!("tensor {name} runs past the end of the file")));
        }
        tensors.push((name, data_start + begin, end - begin));
    }
    Ok(tensors)
}

/// Hashes the chunks `ranges` of the model at `path` (its files `spans`, one after another),
/// reading each file in order in small pieces.
fn hash_ranges(
    path: &Path,
    folder: bool,
    spans: &[FileSpan],
    ranges: &[(u64, u64)],
    mut progress: impl FnMut(u64, u64),
    total: u64,
) -> Result<Vec<Chunk>> {
    // Read in small pieces: a buffer of a whole chunk (megabytes) would raise the allocator's
    // threshold for mapping large blocks, and the node would keep more of the memory its later
    // loads free.
    let mut buffer = vec![0u8; 64 << 10];
    let mut chunks = Vec::with_capacity(ranges.len());
    let mut open: Option<(usize, std::fs::File, u64)> = None;
    let mut done = 0u64;
    for &(offset, len) in ranges {
        let Some(index) = spans
            .iter()
            .position(|f| offset >= f.offset && offset + len <= f.offset + f.bytes)
        else {
            return Err(Error::Unsupported {
                path: path.to_owned(),
                reason: "a chunk spans two files".to_owned(),
            });
        };
        let file_path = if folder {
            path.join(&spans[index].name)
        } else {
            path.to_owned()
        };
        if open.as_ref().is_none_or(|(i, _, _)| *i != index) {
            let file = std::fs::File::open(&file_path).map_err(|e| Error::io(&file_path, e))?;
            open = Some((index, file, 0));
        }
        let Some((_, file, position)) = open.as_mut() else {
            continue;
        };
        let within = offset - spans[index].offset;
        // Skip what no chunk holds (GGUF's padding between tensors).
        if within > *position {
            std::io::copy(
                &mut (&mut *file).take(within - *position),
                &mut std::io::sink(),
            )
            .map_err(|e| Error::io(&file_path, e))?;
        }
        let mut hasher = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let piece = &mut buffer[..left.min(64 << 10) as usize];
            file.read_exact(piece)
                .map_err(|e| Error::io(&file_path, e))?;
            hasher.update(piece);
            left -= piece.len() as u64;
        }
        *position = within + len;
        chunks.push(Chunk {
            offset,
            len,
            hash: hasher.finalize().to_hex().to_string(),
        });
        done += len;
        progress(done, total);
    }
    Ok(chunks)
}
