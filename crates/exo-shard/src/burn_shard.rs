//! The burn implementation of a shard: every weight an f32 burn tensor on the shard's device.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use exo_model::{Checkpoint, HeadWeights, ModelConfig, ShardSpec, ShardWeights};

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::layers::{DecoderLayer, RmsNorm, Rope, tensor2};

/// A shard whose layers run as burn operations (any backend).
#[derive(Module, Debug)]
pub(crate) struct BurnShard {
    embedding: Option<Param<Tensor<2>>>,
    layers: Vec<DecoderLayer>,
    final_norm: Option<RmsNorm>,
    /// The head's own matrix, kept as `[hidden, vocab]`; `None` on a tied last stage.
    head: Option<Param<Tensor<2>>>,
    /// The last stage's head is the embedding table.
    tied_head: bool,
    rope: Rope,
    /// Rotary tables of the sliding-window layers where their base differs (Gemma 3).
    local_rope: Option<Rope>,
    /// Factor applied to embedding rows (Gemma).
    embedding_scale: Option<f64>,
    /// Final logits soft-capped as `cap * tanh(logit / cap)`.
    logit_softcap: Option<f64>,
    first_layer: usize,
    vocab_size: usize,
    hidden_size: usize,
    /// Bytes of keys and values one position takes in a cache of this shard (f32).
    kv_bytes_per_position: usize,
}

impl BurnShard {
    /// Reads the shard's tensors from `checkpoint` (and only those) onto `device`.
    pub(crate) fn load(checkpoint: &Checkpoint, spec: &ShardSpec, device: &Device) -> Result<Self> {
        let weights = checkpoint.load_shard(spec)?;
        Self::from_weights(checkpoint.config(), &weights, device)
    }

    /// Builds the shard from weights already in host memory.
    pub(crate) fn from_weights(
        config: &ModelConfig,
        weights: &ShardWeights,
        device: &Device,
    ) -> Result<Self> {
        let embedding = weights
            .embedding
            .as_ref()
            .map(|e| Param::from_tensor(tensor2(e, false, device)));
        let first = weights.spec.layers.start;
        let layers = weights
            .layers
            .iter()
            .enumerate()
            .map(|(i, w)| DecoderLayer::load(w, first + i, config, device))
            .collect();
        let v = &config.variant;
        let local_rope = config
            .local_rope_theta()
            .map(|theta| Rope::new(config, theta, None, device));
        let final_norm = weights
            .final_norm
            .as_ref()
            .map(|n| RmsNorm::load(n, config.rms_norm_eps, device));
        let (head, tied_head) = match &weights.head {
            None => (None, false),
            Some(HeadWeights::SharedWithEmbedding) if embedding.is_some() => (None, true),
            Some(HeadWeights::SharedWithEmbedding) => {
                return Err(Error::NotHeld {
                    part: "embedding that the tied head needs",
                    layers: format!("{:?}", weights.spec.layers),
                });
            }
            Some(HeadWeights::Separate(h)) => {
                (Some(Param::from_tensor(tensor2(h, true, device))), false)
            }
        };
        Ok(BurnShard {
            embedding,
            layers,
            final_norm,
            head,
            tied_head,
            rope: Rope::new(config, config.rope_theta, v.rope_linear_factor, device),
            local_rope,
            embedding_scale: v.embedding_scale,
            logit_softcap: v.final_logit_softcap,
            first_layer: weights.spec.layers.start,
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            kv_bytes_per_position: weights.layers.len()
                * 2
                * config.num_kv_heads
                * config.head_dim
                * 4,
        })
    }

    /// Positions a request may hold in all.
    pub(crate) fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// Bytes of keys and values one position takes in a cache of this shard.
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        self.kv_bytes_per_position
    }

    /// The layers this shard holds, as a model-wide range.
    pub(crate) fn layer_range(&self) -> std::ops::Range<usize> {
        self.first_layer..self.first_layer + self.layers.len()
    }

    /// Whether this shard embeds tokens (it is the first stage).
    pub(crate) fn has_embedding(&self) -> bool {
        self.embedding.is_some()
    }

    /// Whether this shard computes logits (it is the last stage).
    pub(crate) fn has_head(&self) -> bool {
        self.head.is_some() || self.tied_head
    }

    /// Width of the activations this shard takes and returns.
    pub(crate) fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// A fresh KV cache for one request on this shard.
    pub(crate) fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    fn not_held(&self, part: &'static str) -> Error {
        Error::NotHeld {
            part,
            layers: format!("{:?}", self.layer_range()),
        }
    }

    /// Looks up token embeddings (first stage only).
    ///
    /// Shapes: tokens [seq] -> [1, seq, hidden]
    pub(crate) fn embed(&self, tokens: &[u32]) -> Result<Tensor<3>> {
        let table = self
            .embedding
            .as_ref()
            .ok_or_else(|| self.not_held("embedding"))?;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange {
                id,
                vocab: self.vocab_size,
            });
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let device = table.val().device();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device);
        let rows = burn::tensor::module::embedding(table.val(), ids);
        Ok(match self.embedding_scale {
            Some(scale) => rows * scale,
            None => rows,
        })
    }

    /// Runs this shard's layers on activations for the positions after those already in `cache`.
    ///
    /// Shapes: x [1, seq, hidden] -> [1, seq, hidden]
    pub(crate) fn forward(&self, x: Tensor<3>, cache: &mut KvCache) -> Result<Tensor<3>> {
        let [batch, seq, hidden] = x.dims();
        if batch != 1 || hidden != self.hidden_size || seq == 0 {
            return Err(Error::Shape {
                what: "activations".into(),
                expected: vec![1, seq.max(1), self.hidden_size],
                actual: vec![batch, seq, hidden],
            });
        }
        if cache.layers.len() != self.layers.len() {
            return Err(Error::CacheMismatch {
                expected: self.layers.len(),
                actual: cache.layers.len(),
            });
        }
        let start = cache.len;
        let needed = start + seq;
        if needed > self.rope.max_positions() {
            return Err(Error::ContextFull {
                needed,
                max: self.rope.max_positions(),
            });
        }
        let mut x = x;
        for (layer, layer_cache) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let rope = match (&self.local_rope, layer.local_rope) {
                (Some(local), true) => local,
                _ => &self.rope,
            };
            x = layer.forward(x, rope, layer_cache, start);
        }
        cache.len = needed;
        Ok(x)
    }

    /// Final norm and head on the last position (last stage only).
    ///
    /// Shapes: x [1, seq, hidden] -> logits [1, vocab]
    pub(crate) fn logits(&self, x: Tensor<3>) -> Result<Tensor<2>> {
        let norm = self
            .final_norm
            .as_ref()
            .ok_or_else(|| self.not_held("final norm"))?;
        let [_, seq, hidden] = x.dims();
        let last = x.narrow(1, seq - 1, 1);
        let last = norm.forward(last).reshape([1, hidden]);
        let logits = match (&self.head, &self.embedding) {
            (Some(w), _) => last.matmul(w.val()),
            (None, Some(table)) if self.tied_head => last.matmul(table.val().transpose()),
            _ => return Err(self.not_held("head")),
        };
        Ok(match self.logit_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        })
    }

    /// Every row through the final norm (last stage only).
    ///
    /// Shapes: x [1, seq, hidden] -> [1, seq, hidden]
    pub(crate) fn final_norm(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        let norm = self
            .final_norm
            .as_ref()
            .ok_or_else(|| self.not_held("final norm"))?;
        Ok(norm.forward(x))
    }

    /// [`LlamaShard::logits`] read back to the host.
    pub(crate) fn logits_vec(&self, x: Tensor<3>) -> Result<Vec<f32>> {
        self.logits(x)?
            .into_data()
            .try_into_vec::<f32>()
            .map_err(|e| Error::Backend(format!("reading logits: {e:?}")))
    }
}
