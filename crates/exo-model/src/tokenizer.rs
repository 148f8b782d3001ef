//! The tokenizer: loaded from `tokenizer.json`, or built from a GGUF file's `tokenizer.ggml.*`
//! metadata, and an incremental decoder for streaming text.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::gguf::{GgufFile, Value};

/// Token types of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: u64 = 1;
const TOKEN_TYPE_UNKNOWN: u64 = 2;
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Llama 3's pre-tokenizer pattern (also used by several newer BPE models).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer pattern: like Llama 3's but single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A model's tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` with special tokens read as plain text, made on first use.
    plain: OnceLock<tokenizers::Tokenizer>,
    /// The special (control) tokens: id to text.
    special: HashMap<u32, String>,
    source: PathBuf,
    bos_token: Option<u32>,
    add_bos: bool,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer::with_inner(
            inner,
            path.to_path_buf(),
            None,
            false,
        ))
    }

    /// Builds the tokenizer that a GGUF file describes: the gpt2-style byte-level BPE with merges,
    /// SentencePiece's BPE with scores and byte fallback (`llama`, as Gemma and Llama 2 store
    /// it), or SentencePiece's Unigram (`t5`).
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path().to_path_buf();
        let bad = |message: String| Error::Tokenizer {
            path: path.clone(),
            message,
        };
        let model = file
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `tokenizer.ggml.model` metadata".into()))?;
        if !matches!(model, "gpt2" | "llama" | "t5") {
            return Err(bad(format!(
                "tokenizer model `{model}` is not supported yet (the byte-level BPE `gpt2`, \
                 SentencePiece BPE `llama` and SentencePiece Unigram `t5` are); use a Hugging \
                 Face folder with tokenizer.json instead"
            )));
        }
        let tokens = string_array(file, "tokenizer.ggml.tokens").map_err(&bad)?;
        let types: Vec<u64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            Some(items) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(bad(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let mut inner = match model {
            "llama" => sentencepiece(file, &tokens, &types).map_err(&bad)?,
            "t5" => unigram(file, &tokens, &types).map_err(&bad)?,
            _ => byte_level_bpe(file, &tokens).map_err(&bad)?,
        };
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        // llama.cpp splits a Unigram text at its user-defined tokens before normalizing each
        // piece on its own (so each gets its own leading `▁`).
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), false).normalized(model != "t5"))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
        let bos_token = file
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32);
        let add_bos = file
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(Tokenizer::with_inner(inner, path, bos_token, add_bos))
    }

    fn with_inner(
        inner: tokenizers::Tokenizer,
        source: PathBuf,
        bos_token: Option<u32>,
        add_bos: bool,
    ) -> Self {
        let special = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (id, t.content))
            .collect();
        Tokenizer {
            inner,
            plain: OnceLock::new(),
            special,
            source,
            bos_token,
            add_bos,
        }
    }

    /// Sets whether [`Tokenizer::encode`] prepends the BOS token (from `tokenizer_config.json`).
    pub fn set_add_bos(&mut self, bos_token: Option<u32>, add_bos: bool) {
        self.bos_token = bos_token;
        self.add_bos = add_bos;
    }

    /// Where this tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) become their ids, as chat
    /// templates need; BOS is prepended when the checkpoint asks for it and the text lacks it.
    ///
    /// Only for text this server wrote or a client asked to have parsed: in text a user typed,
    /// special tokens forge control tokens (a new turn, an end of text). Encode that with
    /// [`Tokenizer::encode_plain`], and chats with [`crate::encode_chat`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.ids(&self.inner, text)?;
        Ok(self.with_bos(ids))
    }

    /// Encodes text as plain text: special tokens written in it (`<|im_start|>`) are spelled
    /// with ordinary tokens, never their control ids. BOS is prepended as [`Tokenizer::encode`]
    /// does.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let ids = self.ids(self.plain(), text)?;
        Ok(self.with_bos(ids))
    }

    /// Encodes `text` in which the byte ranges `plain` are user-supplied: special tokens are
    /// parsed outside them and spelled out inside them. BOS as [`Tokenizer::encode`] does.
    ///
    /// Text with no special token inside a range encodes exactly as `encode` encodes it. Otherwise
    /// the text between the special tokens that stay (which the tokenizer encodes as separate
    /// pieces anyway) is encoded piece by piece as plain text, so the pieces split where
    /// `encode` splits them.
    pub(crate) fn encode_with_plain_spans(
        &self,
        text: &str,
        plain: &[Range<usize>],
    ) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| self.encoding_error(e))?;
        let ids = encoding.get_ids();
        let offsets = encoding.get_offsets();
        let forged: Vec<bool> = ids
            .iter()
            .zip(offsets)
            .map(|(id, &(start, end))| {
                let Some(content) = self.special.get(id) else {
                    return false;
                };
                // A special token with lstrip or rstrip also covers the spaces beside it, which
                // may be a message's; the token itself is what must lie outside.
                let core = text
                    .get(start..end)
                    .and_then(|t| t.find(content.as_str()))
                    .map_or(start..end, |at| start + at..start + at + content.len());
                plain
                    .iter()
                    .any(|span| core.start < span.end && span.start < core.end)
            })
            .collect();
        if !forged.contains(&true) {
            return Ok(self.with_bos(ids.to_vec()));
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut from = 0;
        for ((id, &(start, end)), forged) in ids.iter().zip(offsets).zip(forged) {
            if forged || !self.special.contains_key(id) {
                continue;
            }
            if start > from {
                out.extend(self.ids(self.plain(), self.slice(text, from..start)?)?);
            }
            out.push(*id);
            from = from.max(end);
        }
        if from < text.len() {
            out.extend(self.ids(self.plain(), self.slice(text, from..text.len())?)?);
        }
        Ok(self.with_bos(out))
    }

    fn ids(&self, tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
        let encoding = tokenizer
            .encode(text, false)
            .map_err(|e| self.encoding_error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.add_bos, self.bos_token)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        ids
    }

    fn plain(&self) -> &tokenizers::Tokenizer {
        self.plain.get_or_init(|| {
            let mut plain = self.inner.clone();
            plain.set_encode_special_tokens(true);
            plain
        })
    }

    fn slice<'t>(&self, text: &'t str, range: Range<usize>) -> Result<&'t str> {
        text.get(range.clone()).ok_or_else(|| Error::Tokenizer {
            path: self.source.clone(),
            message: format!(
                "encoding: token offsets {range:?} are not character boundaries of the text"
            ),
        })
    }

    fn encoding_error(&self, e: tokenizers::Error) -> Error {
        Error::Tokenizer {
            path: self.source.clone(),
            message: format!("encoding: {e}"),
        }
    }

    /// Decodes ids to text, keeping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| Error::Tokenizer {
            path: self.source.clone(),
            message: format!("decoding: {e}"),
        })
    }

    /// The number of ids the tokenizer can produce (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// An upper bound on the bytes of text one token covers: the longest entry of the
    /// vocabulary, in bytes as stored (a byte-level entry stores each byte as one character of
    /// one or two bytes, so this is never less than what it stands for). Text of `n` bytes
    /// takes at least `n / longest_token_bytes()` tokens, which refuses a prompt far too long
    /// without tokenizing it.
    pub fn longest_token_bytes(&self) -> usize {
        self.inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1)
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of a token id, if any.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The bytes each token id stands for, indexed by id: what a grammar engine needs to know
    /// which tokens may come next. Control tokens are their text after a `0xFF` byte (a byte
    /// no UTF-8 text holds, so no grammar over text can match them); ids without a token are
    /// empty.
    ///
    /// Byte-level vocabularies (GPT-2's, Llama 3's, Qwen's, SmolLM's) map each character back
    /// to its byte; SentencePiece vocabularies read `▁` as a space and `<0xAB>` as the byte
    /// 0xAB.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        let decoder = match self.inner.get_decoder() {
            Some(decoder) => serde_json::to_value(decoder).map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                message: format!("reading the decoder: {e}"),
            })?,
            None => serde_json::Value::Null,
        };
        let kind = |d: &serde_json::Value| d["type"].as_str().unwrap_or_default().to_owned();
        let mut parts = vec![decoder.clone()];
        if let Some(list) = decoder["decoders"].as_array() {
            parts.extend(list.iter().cloned());
        }
        let byte_level = parts.iter().any(|d| kind(d) == "ByteLevel");
        // The character SentencePiece writes for a space: a Replace decoder's pattern, or a
        // Metaspace decoder's replacement; `▁` when neither says.
        let space = parts
            .iter()
            .find_map(|d| match kind(d).as_str() {
                "Replace" if d["content"].as_str() == Some(" ") => d["pattern"]["String"]
                    .as_str()
                    .and_then(|p| p.chars().next()),
                "Metaspace" => d["replacement"].as_str().and_then(|p| p.chars().next()),
                _ => None,
            })
            .unwrap_or('\u{2581}');
        let unicode_to_byte: HashMap<char, u8> = byte_level_chars()
            .into_iter()
            .enumerate()
            .map(|(byte, c)| (c, byte as u8))
            .collect();
        let mut bytes = vec![Vec::new(); self.vocab_size()];
        for (token, id) in self.inner.get_vocab(true) {
            let Some(slot) = bytes.get_mut(id as usize) else {
                continue;
            };
            *slot = if let Some(text) = self.special.get(&id) {
                let mut b = vec![0xFF];
                b.extend_from_slice(text.as_bytes());
                b
            } else if let Some(byte) = token
                .strip_prefix("<0x")
                .and_then(|t| t.strip_suffix('>'))
                .filter(|hex| hex.len() == 2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            {
                vec![byte]
            } else if byte_level {
                // A character outside the byte map (an added token written as text) stands
                // for itself.
                let mut b = Vec::with_capacity(token.len());
                for c in token.chars() {
                    match unicode_to_byte.get(&c) {
                        Some(&byte) => b.push(byte),
                        None => b.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                    }
                }
                b
            } else {
                token.replace(space, " ").into_bytes()
            };
        }
        Ok(bytes)
    }

    /// Checks that every id this tokenizer produces has a row in a model of `vocab_size`.
    pub fn check_fits(&self, vocab_size: usize, model: &Path) -> Result<()> {
        let ours = self.vocab_size();
        if ours > vocab_size {
            return Err(Error::Tokenizer {
                path: self.source.clone(),
                message: format!(
                    "has {ours} tokens but the model {} has only {vocab_size} embedding rows: \
                     the tokenizer does not belong to this model",
                    model.display()
                ),
            });
        }
        Ok(())
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Tokenizer {
            path: self.source.clone(),
            message: format!("serializing: {e}"),
        })
    }

    /// A decoder that turns generated ids into text pieces as they arrive.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Turns ids into text one at a time, holding back incomplete UTF-8 sequences.
///
/// Each step decodes only a short window (the ids since the last piece, after a few ids of
/// context so that word-initial spaces come out right), so a long answer costs linear time,
/// not quadratic.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the context window.
    prefix: usize,
    /// End of what has been emitted.
    read: usize,
}

impl TextStream<'_> {
    /// Adds one id and returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let after = self.tokenizer.decode(&self.ids[self.prefix..])?;
        // A byte-level token can end in the middle of a character; wait for the rest.
        if after.len() <= before.len() || after.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        let Some(piece) = after.get(before.len()..) else {
            return Ok(String::new());
        };
        let piece = piece.to_owned();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Everything decoded so far.
    pub fn text(&self) -> Result<String> {
        self.tokenizer.decode(&self.ids)
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// The byte-level BPE (`tokenizer.ggml.model = gpt2`): the vocabulary with its merges, and the
/// pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_bpe(file: &GgufFile, tokens: &[&str]) -> Result<tokenizers::Tokenizer, String> {
    let merges = string_array(file, "tokenizer.ggml.merges")?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id as u32);
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("merge `{m}` is not two tokens separated by a space"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("building the BPE model: {e}"))?;
    let pre = file
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer_for(pre)?));
    inner.with_decoder(Some(ByteLevel::default()));
    Ok(inner)
}

/// SentencePiece's BPE as llama.cpp runs it for `tokenizer.ggml.model = llama` (Llama 2,
/// Gemma, Mistral's older files): spaces become `▁` (with one in front when
/// `tokenizer.ggml.add_space_prefix` says so), then the adjacent pair whose joined text is the
/// best-scored vocabulary entry merges first, until no pair joins; text no entry covers falls
/// back to the `<0xXX>` byte tokens.
///
/// GGUF files store scores, not merges, so the merges are derived: every way of splitting a
/// normal vocabulary entry into two entries is a merge, ranked by the entry's score. A BPE over
/// those ranks makes the same choices as the score-driven loop.
fn sentencepiece(
    file: &GgufFile,
    tokens: &[&str],
    types: &[u64],
) -> Result<tokenizers::Tokenizer, String> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as Decoders;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::{Prepend, Replace, Sequence as Normalizers};

    let scores = scores(file, tokens.len())?;
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        vocab.entry(token.to_string()).or_insert(id as u32);
    }
    let mut ranked: Vec<(f64, u32, &str, &str)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if types[id] != TOKEN_TYPE_NORMAL {
            continue;
        }
        for (at, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                ranked.push((scores[id], id as u32, left, right));
            }
        }
    }
    // Best score first; equal scores in vocabulary order.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = ranked
        .into_iter()
        .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let unk = file
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|id| tokens.get(id as usize))
        .map(|t| t.to_string());
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| format!("building the SentencePiece model: {e}"))?;
    let space_prefix = file
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| format!("SentencePiece normalizer: {e}"))
    };
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let spaces = replace(" ", "\u{2581}")?;
    if space_prefix {
        inner.with_normalizer(Some(Normalizers::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            spaces.into(),
        ])));
    } else {
        inner.with_normalizer(Some(spaces));
    }
    let mut decoders = vec![
        replace("\u{2581}", " ")?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Decoders::new(decoders)));
    Ok(inner)
}

/// A control or unknown token's entry in the Unigram model: text no input can contain (a NUL
/// and the id), so the model never picks it for text; its own text is an added token.
fn unmatchable(id: usize) -> String {
    format!("\u{0}{id}")
}

/// SentencePiece's Unigram (`t5` in GGUF), as llama.cpp runs it: the text normalized (the
/// `precompiled_charsmap` if the file has one; spaces escaped as `▁`; a `▁` before the text,
/// or with `remove_extra_whitespaces` before every run of non-spaces, other spaces dropped),
/// then the segmentation with the highest sum of scores (Viterbi), user-defined tokens scoring
/// 0; a character no entry covers is the unknown token (`min score - 10`), and consecutive
/// unknowns are one. No byte fallback.
fn unigram(
    file: &GgufFile,
    tokens: &[&str],
    types: &[u64],
) -> Result<tokenizers::Tokenizer, String> {
    use tokenizers::decoders::sequence::Sequence as Decoders;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::models::unigram::Unigram;
    use tokenizers::normalizers::precompiled::Precompiled;
    use tokenizers::normalizers::replace::{Replace, ReplacePattern};
    use tokenizers::normalizers::{NormalizerWrapper, Prepend, Sequence as Normalizers};

    let scores = scores(file, tokens.len())?;
    // The unknown score is the lowest normal token's less 10 (in llama.cpp and in the
    // `tokenizers` model, which takes the lowest of all entries): no other entry goes lower.
    let floor = scores
        .iter()
        .zip(types)
        .filter(|(_, t)| **t == TOKEN_TYPE_NORMAL)
        .map(|(s, _)| *s)
        .fold(f64::INFINITY, f64::min);
    let floor = if floor.is_finite() { floor } else { 0.0 };
    let vocab: Vec<(String, f64)> = tokens
        .iter()
        .zip(types)
        .zip(&scores)
        .enumerate()
        .map(|(id, ((token, &kind), &score))| match kind {
            TOKEN_TYPE_CONTROL | TOKEN_TYPE_UNKNOWN => (unmatchable(id), floor),
            TOKEN_TYPE_USER_DEFINED => (token.to_string(), 0.0),
            _ => (token.to_string(), score.max(floor)),
        })
        .collect();
    let unk = file
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .map(|id| id as usize)
        .or_else(|| types.iter().position(|&t| t == TOKEN_TYPE_UNKNOWN))
        .filter(|&id| id < tokens.len())
        .ok_or("the Unigram vocabulary names no unknown token")?;
    let model = Unigram::from(vocab, Some(unk), false)
        .map_err(|e| format!("building the Unigram model: {e}"))?;
    let flag = |key: &str, default: bool| file.get(key).and_then(Value::as_bool).unwrap_or(default);
    // llama.cpp's defaults for Unigram files that do not say.
    let space_prefix = flag("tokenizer.ggml.add_space_prefix", false);
    let merge_spaces = flag("tokenizer.ggml.remove_extra_whitespaces", false);
    let replace = |pattern: ReplacePattern, to: &str| -> Result<NormalizerWrapper, String> {
        Replace::new(pattern, to)
            .map(Into::into)
            .map_err(|e| format!("Unigram normalizer: {e}"))
    };
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if let Some(items) = file
        .get("tokenizer.ggml.precompiled_charsmap")
        .and_then(Value::as_array)
    {
        let bytes: Vec<u8> = items
            .iter()
            .map(|v| match *v {
                Value::I8(b) => b as u8,
                Value::U8(b) => b,
                _ => 0,
            })
            .collect();
        let charsmap = Precompiled::from(&bytes)
            .map_err(|e| format!("tokenizer.ggml.precompiled_charsmap: {e}"))?;
        normalizers.push(charsmap.into());
    }
    if merge_spaces {
        // Only the space character counts, as in llama.cpp (not tabs or newlines).
        normalizers.push(replace(ReplacePattern::Regex("^ +| +$".into()), "")?);
        normalizers.push(replace(ReplacePattern::Regex(" +".into()), " ")?);
    }
    if merge_spaces || space_prefix {
        normalizers.push(Prepend::new("\u{2581}".into()).into());
    }
    normalizers.push(replace(ReplacePattern::String(" ".into()), "\u{2581}")?);
    let mut inner = tokenizers::Tokenizer::new(model);
    inner.with_normalizer(Some(Normalizers::new(normalizers)));
    let mut decoders: Vec<tokenizers::DecoderWrapper> = vec![
        tokenizers::decoders::metaspace::Metaspace::new(
            '\u{2581}',
            tokenizers::decoders::metaspace::PrependScheme::Never,
            false,
        )
        .into(),
    ];
    if merge_spaces || space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    inner.with_decoder(Some(Decoders::new(decoders)));
    Ok(inner)
}

/// The SentencePiece scores of the file's `tokens` tokens, one each.
fn scores(file: &GgufFile, tokens: usize) -> Result<Vec<f64>, String> {
    let scores: Vec<f64> = match file.get("tokenizer.ggml.scores").and_then(Value::as_array) {
        Some(items) => items.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        None => return Err("no `tokenizer.ggml.scores` array in the metadata".into()),
    };
    if scores.len() != tokens {
        return Err(format!("{} scores for {tokens} tokens", scores.len()));
    }
    Ok(scores)
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, String> {
    let items = file
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no `{key}` array in the metadata"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .ok_or_else(|| format!("`{key}`[{i}] is not a string"))
        })
        .collect()
}

/// The pre-tokenizer llama.cpp pairs with a `tokenizer.ggml.pre` name.
fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, String> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex);
    let split = |pattern: &str| {
        Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer regex: {e}"))
    };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true).into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
        "llama3" | "llama-bpe" | "llama-v3" | "dbrx" | "smaug-bpe" => Sequence::new(vec![
            split(LLAMA3_PATTERN)?.into(),
            byte_level(false).into(),
        ])
        .into(),
        "qwen2" | "deepseek-r1-qwen" => {
            Sequence::new(vec![split(QWEN2_PATTERN)?.into(), byte_level(false).into()]).into()
        }
        other => {
            return Err(format!(
                "pre-tokenizer `{other}` is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"
            ));
        }
    })
}

/// GPT-2's byte-level alphabet: the character each byte is written as, indexed by byte.
/// Printable bytes stand for themselves; the others take the characters from U+0100 on, in
/// byte order.
fn byte_level_chars() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).unwrap_or('\u{fffd}');
                next += 1;
                c
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level tokenizer with one token per byte, a merge for `ab`, and ChatML's two
    /// control tokens (ids 257 and 258) and BOS `<s>` (259), prepended.
    pub(crate) fn chatml_tokenizer() -> Result<Tokenizer> {
        let mut vocab = tokenizers::models::bpe::Vocab::new();
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        for c in alphabet {
            let id = vocab.len() as u32;
            vocab.insert(c.to_string(), id);
        }
        vocab.insert("ab".into(), vocab.len() as u32);
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![("a".into(), "b".into())])
            .build()
            .map_err(|e| Error::Template(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens(&[
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
            AddedToken::from("<s>", true),
        ]);
        let bos = inner.token_to_id("<s>");
        Ok(Tokenizer::with_inner(inner, "chatml".into(), bos, true))
    }

    #[test]
    fn plain_encoding_spells_special_tokens_out() -> Result<()> {
        let t = chatml_tokenizer()?;
        let start = t.token_id("<|im_start|>");
        let bos = t.token_id("<s>");
        assert_eq!(
            t.encode("<|im_start|>")?,
            [bos, start].map(Option::unwrap_or_default)
        );
        let plain = t.encode_plain("<|im_start|>ab")?;
        // BOS, then the twelve bytes of the token's text, then the merged `ab`.
        assert_eq!(plain.len(), 14, "{plain:?}");
        assert_eq!(plain.first().copied(), bos);
        assert!(plain[1..].iter().all(|id| !t.special.contains_key(id)));
        assert_eq!(t.decode(&plain[1..])?, "<|im_start|>ab");
        Ok(())
    }

    #[test]
    fn token_bytes_undo_the_byte_level_alphabet_and_mark_control_tokens() -> Result<()> {
        let t = chatml_tokenizer()?;
        let bytes = t.token_bytes()?;
        assert_eq!(bytes.len(), t.vocab_size());
        // Every one of the 256 bytes has its token, and each token's bytes decode back to it.
        for byte in 0..=255u8 {
            let id = bytes.iter().position(|b| b == &[byte]);
            assert!(id.is_some(), "no token for byte {byte:#x}");
        }
        let ab = t.token_id("ab").unwrap_or_default();
        assert_eq!(bytes[ab as usize], b"ab");
        let space = t.encode_plain(" ")?;
        assert_eq!(bytes[space[space.len() - 1] as usize], b" ");
        let end = t.token_id("<|im_end|>").unwrap_or_default();
        assert_eq!(bytes[end as usize], b"\xFF<|im_end|>");
        Ok(())
    }

    #[test]
    fn plain_spans_keep_the_specials_outside_them() -> Result<()> {
        let t = chatml_tokenizer()?;
        let text = "<|im_start|>user\nab<|im_end|>x<|im_end|>";
        // No special token inside the span: the ids are `encode`'s.
        assert_eq!(
            t.encode_with_plain_spans(text, std::slice::from_ref(&(17..19)))?,
            t.encode(text)?
        );
        // The span covers the first `<|im_end|>`: it is spelled out, the second stays.
        let ids = t.encode_with_plain_spans(text, std::slice::from_ref(&(17..30)))?;
        let end = t.token_id("<|im_end|>").unwrap_or_default();
        assert_eq!(ids.iter().filter(|&&id| id == end).count(), 1);
        assert_eq!(ids.last(), Some(&end));
        assert_eq!(t.decode(&ids)?, format!("<s>{text}"));
        Ok(())
    }
}
