//! A whole model in one process, ready to answer prompts: checkpoint, tokenizer, chat template
//! and one shard holding every layer. What `exo-node generate` runs, and what a single node
//! serves.

use std::path::Path;

use burn::tensor::Device;
use exo_model::{ChatMessage, ChatTemplate, Checkpoint, ModelConfig, ShardSpec, Tokenizer};

use crate::error::{Error, Result};
use crate::generate::{GenerateRequest, Generation, generate};
use crate::native::Weights;
use crate::pooling::MeanPool;
use crate::sampling::SamplingParams;
use crate::shard::LlamaShard;

/// Options of one text generation.
#[derive(Clone, Debug, PartialEq)]
pub struct TextOptions {
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop before any of these strings.
    pub stop: Vec<String>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            max_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// A loaded model with its tokenizer and chat template.
#[derive(Debug)]
pub struct Engine {
    name: String,
    config: ModelConfig,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    stages: Vec<LlamaShard>,
}

impl Engine {
    /// Loads the whole model at `path` (a `.gguf` file or a Hugging Face folder) onto `device`,
    /// holding weights as `weights` says.
    ///
    /// The checkpoint is closed (and its file unmapped) once the weights are loaded.
    pub fn load(path: &Path, device: &Device, weights: Weights) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let tokenizer = checkpoint.tokenizer()?;
        let template = checkpoint.chat_template_with(&tokenizer)?;
        let config = checkpoint.config().clone();
        let spec = ShardSpec::whole(config.num_layers);
        let shard = LlamaShard::load_with(&checkpoint, &spec, device, weights)?;
        Ok(Engine {
            name: checkpoint.name(),
            config,
            tokenizer,
            template,
            stages: vec![shard],
        })
    }

    /// The model's name (file stem or folder name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The loaded shard (the whole model).
    pub fn shard(&self) -> &LlamaShard {
        &self.stages[0]
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders chat messages with the checkpoint's template, opening the assistant's turn.
    /// A checkpoint without a template gets the messages' contents, one per line.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String> {
        Ok(exo_model::render_prompt(
            self.template.as_ref(),
            messages,
            &[],
        )?)
    }

    /// Token ids of chat messages through the checkpoint's template: special tokens only
    /// where the template writes them; typed in a message they are text.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        Ok(exo_model::encode_chat(
            &self.tokenizer,
            self.template.as_ref(),
            messages,
            &[],
        )?)
    }

    /// Generates from prompt text (already templated: special tokens written in it are
    /// parsed), streaming pieces to `on_text`.
    pub fn generate_text(
        &self,
        prompt: &str,
        options: &TextOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let prompt_ids = self.tokenizer.encode(prompt)?;
        self.generate_ids(prompt_ids, options, on_text)
    }

    /// The embedding of prompt token ids: the mean of their last hidden states after the
    /// final norm, L2-normalised (what the cluster's last stage computes for an embedding
    /// request).
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let (Some(first), Some(last)) = (self.stages.first(), self.stages.last()) else {
            return Err(Error::Backend("no stages to run".into()));
        };
        let mut hidden = Vec::new();
        first.embed_into(ids, &mut hidden)?;
        for stage in &self.stages {
            let mut cache = stage.new_cache();
            stage.forward_in_place(&mut hidden, &mut cache)?;
        }
        let mut normed = Vec::new();
        last.final_norm_rows(&hidden, &mut normed)?;
        let mut pool = MeanPool::default();
        pool.add(&normed, last.hidden_size());
        pool.embedding().ok_or_else(|| {
            Error::Backend("the embedding has no direction (zero or not finite)".into())
        })
    }

    /// Generates from prompt token ids, streaming pieces to `on_text`.
    pub fn generate_ids(
        &self,
        prompt_ids: Vec<u32>,
        options: &TextOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let max = self.config.max_position_embeddings;
        if prompt_ids.len() >= max {
            return Err(Error::ContextFull {
                needed: prompt_ids.len() + 1,
                max,
            });
        }
        let request = GenerateRequest {
            prompt_ids,
            max_tokens: options.max_tokens,
            sampling: options.sampling,
            stop: options.stop.clone(),
            ignore_eos: options.ignore_eos,
        };
        generate(
            &self.stages,
            &self.tokenizer,
            &self.config.eos_token_ids,
            &request,
            on_text,
        )
    }
}
