//! The tokenizer: loaded from `tokenizer.json`, or built from a GGUF file's `tokenizer.ggml.*`
//! metadata, and an incremental decoder for streaming text.

use std::path::{Path, PathBuf};

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
        Ok(Tokenizer {
            inner,
            source: path.to_path_buf(),
            bos_token: None,
            add_bos: false,
        })
    }

    /// Builds the tokenizer that a GGUF file describes (the gpt2-style byte-level BPE with merges).
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
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer model `{model}` is not supported yet (only the byte-level BPE `gpt2` is); \
                 use a Hugging Face folder with tokenizer.json instead"
            )));
        }
        let tokens = string_array(file, "tokenizer.ggml.tokens").map_err(&bad)?;
        let merges = string_array(file, "tokenizer.ggml.merges").map_err(&bad)?;
        let types: Vec<u64> = match file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
        {
            Some(items) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            vocab.entry(token.to_string()).or_insert(id as u32);
        }
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        bad(format!(
                            "merge `{m}` is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("building the BPE model: {e}")))?;
        let pre = file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let pre_tokenizer = pre_tokenizer_for(pre).map_err(&bad)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), false))
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
        Ok(Tokenizer {
            inner,
            source: path,
            bos_token,
            add_bos,
        })
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
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                message: format!("encoding: {e}"),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        if let (true, Some(bos)) = (self.add_bos, self.bos_token)
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
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
