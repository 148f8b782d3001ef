//! The planner's inputs: plain measured data about the model, the nodes, the links between
//! them and the requests to serve.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use crate::node::NodeId;

/// What the planner needs to know about a model: sizes and work per layer, not its weights.
///
/// Every transformer layer is assumed to have the same size and cost. Build one from a model
/// config with [`ModelProfile::llama`], or fill it in from measurements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    /// Number of transformer layers.
    pub layers: u32,
    /// Bytes of weights in one layer, as stored (after quantisation).
    pub layer_weight_bytes: u64,
    /// Bytes of the token embedding table (held by the first stage).
    pub embedding_bytes: u64,
    /// Bytes of the output head, the final norm and the vocabulary projection (held by the
    /// last stage). Counted even when the checkpoint ties it to the embedding, because the last
    /// stage needs its own copy unless it is also the first.
    pub head_bytes: u64,
    /// Floating-point operations one layer does per token (2 per matrix weight).
    pub layer_flops_per_token: u64,
    /// Width of the residual stream: the activation passed between stages has this many values.
    pub hidden_size: u32,
    /// Width of the MLP; tensor-parallel members split its columns.
    pub intermediate_size: u32,
    /// Number of query heads.
    pub attention_heads: u32,
    /// Number of key/value heads; tensor-parallel members split layers by whole KV heads.
    pub kv_heads: u32,
    /// KV-cache bytes one token adds to one layer (keys and values of every KV head).
    pub kv_bytes_per_token_per_layer: u64,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Bytes per activation value on the wire between stages (2 for f16).
    pub activation_bytes: u32,
}

/// The shape of a Llama-family checkpoint, from which [`ModelProfile::llama`] derives sizes and
/// work. The fields mirror `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaShape {
    /// `num_hidden_layers`.
    pub layers: u32,
    /// `hidden_size`.
    pub hidden_size: u32,
    /// `intermediate_size`.
    pub intermediate_size: u32,
    /// `num_attention_heads`.
    pub attention_heads: u32,
    /// `num_key_value_heads`.
    pub kv_heads: u32,
    /// `vocab_size`.
    pub vocab_size: u32,
    /// Average stored bits per weight: 16 for f16, 8.5 for Q8_0, 5 for Q4_1, 4.5 for Q4_0.
    pub bits_per_weight: f64,
    /// Bytes per cached key or value element (2 for an f16 cache).
    pub kv_bytes_per_element: u32,
    /// Bytes per activation value on the wire (2 for f16).
    pub activation_bytes: u32,
}

impl LlamaShape {
    /// SmolLM2-135M-Instruct, the project's default model.
    pub fn smollm2_135m(bits_per_weight: f64) -> Self {
        Self::new(30, 576, 1536, 9, 3, 49_152, bits_per_weight)
    }

    /// Llama 3 8B.
    pub fn llama3_8b(bits_per_weight: f64) -> Self {
        Self::new(32, 4096, 14_336, 32, 8, 128_256, bits_per_weight)
    }

    /// Llama 3 70B.
    pub fn llama3_70b(bits_per_weight: f64) -> Self {
        Self::new(80, 8192, 28_672, 64, 8, 128_256, bits_per_weight)
    }

    fn new(
        layers: u32,
        hidden_size: u32,
        intermediate_size: u32,
        attention_heads: u32,
        kv_heads: u32,
        vocab_size: u32,
        bits_per_weight: f64,
    ) -> Self {
        Self {
            layers,
            hidden_size,
            intermediate_size,
            attention_heads,
            kv_heads,
            vocab_size,
            bits_per_weight,
            kv_bytes_per_element: 2,
            activation_bytes: 2,
        }
    }
}

impl ModelProfile {
    /// Derives a profile from a Llama-family shape.
    ///
    /// Per layer: the q and o projections (`hidden²` each), k and v (`hidden × kv_dim` each,
    /// `kv_dim = kv_heads × hidden / heads`), three MLP matrices (`hidden × intermediate` each)
    /// and two norms; FLOPs are two per matrix weight; the KV cache adds `2 × kv_dim` elements
    /// per token. The embedding and the head are `vocab × hidden` weights each.
    pub fn llama(shape: &LlamaShape) -> Result<Self> {
        let invalid = |field, problem: &str| Error::InvalidModel {
            field,
            problem: problem.to_owned(),
        };
        if shape.hidden_size == 0 {
            return Err(invalid("hidden_size", "is zero"));
        }
        if shape.attention_heads == 0 || !shape.hidden_size.is_multiple_of(shape.attention_heads) {
            return Err(invalid(
                "attention_heads",
                "must be non-zero and divide hidden_size",
            ));
        }
        if !(shape.bits_per_weight.is_finite() && shape.bits_per_weight > 0.0) {
            return Err(invalid(
                "bits_per_weight",
                "must be a positive finite number",
            ));
        }
        let hidden = u64::from(shape.hidden_size);
        let head_dim = hidden / u64::from(shape.attention_heads);
        let kv_dim = u64::from(shape.kv_heads) * head_dim;
        let intermediate = u64::from(shape.intermediate_size);
        let matrix_weights = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * intermediate;
        let stored = |weights: u64| (weights as f64 * shape.bits_per_weight / 8.0).ceil() as u64;
        let table = u64::from(shape.vocab_size) * hidden;
        let profile = Self {
            layers: shape.layers,
            layer_weight_bytes: stored(matrix_weights + 2 * hidden),
            embedding_bytes: stored(table),
            head_bytes: stored(table + hidden),
            layer_flops_per_token: 2 * matrix_weights,
            hidden_size: shape.hidden_size,
            intermediate_size: shape.intermediate_size,
            attention_heads: shape.attention_heads,
            kv_heads: shape.kv_heads,
            kv_bytes_per_token_per_layer: 2 * kv_dim * u64::from(shape.kv_bytes_per_element),
            vocab_size: shape.vocab_size,
            activation_bytes: shape.activation_bytes,
        };
        profile.validate()?;
        Ok(profile)
    }

    /// Bytes of all weights: every layer, the embedding and the head.
    pub fn weight_bytes(&self) -> u64 {
        let layers = u128::from(self.layers) * u128::from(self.layer_weight_bytes);
        saturate(layers + u128::from(self.embedding_bytes) + u128::from(self.head_bytes))
    }

    /// KV-cache bytes one layer reserves for `request` (its context times its concurrency).
    pub fn kv_reserve_bytes_per_layer(&self, request: &RequestProfile) -> u64 {
        saturate(
            u128::from(self.kv_bytes_per_token_per_layer)
                * u128::from(request.context_len)
                * u128::from(request.concurrent_requests),
        )
    }

    /// KV-cache bytes the whole model reserves for `request`.
    pub fn kv_reserve_bytes(&self, request: &RequestProfile) -> u64 {
        saturate(u128::from(self.kv_reserve_bytes_per_layer(request)) * u128::from(self.layers))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let invalid = |field, problem: &str| Error::InvalidModel {
            field,
            problem: problem.to_owned(),
        };
        if self.layers == 0 {
            return Err(invalid("layers", "is zero"));
        }
        for (field, value) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("attention_heads", self.attention_heads),
            ("kv_heads", self.kv_heads),
            ("vocab_size", self.vocab_size),
            ("activation_bytes", self.activation_bytes),
        ] {
            if value == 0 {
                return Err(invalid(field, "is zero"));
            }
        }
        if !self.attention_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::InvalidModel {
                field: "kv_heads",
                problem: format!(
                    "{} does not divide attention_heads {}",
                    self.kv_heads, self.attention_heads
                ),
            });
        }
        Ok(())
    }
}

/// What a node offers and how fast it is, as measured on the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeProfile {
    /// The node's id.
    pub id: NodeId,
    /// Memory the node offers for weights and KV cache (after the OS and runtime).
    pub memory_bytes: u64,
    /// Measured matrix-multiply throughput, FLOP/s.
    pub flops_per_s: f64,
    /// Measured memory bandwidth, bytes/s.
    pub mem_bandwidth_bytes_per_s: f64,
    /// The compute backend it runs (`"ndarray"`, `"wgpu"`, ...). Reported, not used in costs.
    pub backend: String,
}

impl NodeProfile {
    /// A node profile from its measurements.
    pub fn new(
        id: impl Into<NodeId>,
        memory_bytes: u64,
        flops_per_s: f64,
        mem_bandwidth_bytes_per_s: f64,
        backend: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            memory_bytes,
            flops_per_s,
            mem_bandwidth_bytes_per_s,
            backend: backend.into(),
        }
    }
}

/// Latency and bandwidth of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkQuality {
    /// One-way latency of a small message, seconds.
    pub latency_s: f64,
    /// Sustained bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
}

impl LinkQuality {
    /// What the planner assumes for a pair of nodes with no measurement in either direction:
    /// 5 ms and 10 MB/s, a poor Wi-Fi link, so that an unmeasured link never looks better than
    /// a measured one.
    pub const UNMEASURED: Self = Self {
        latency_s: 5e-3,
        bandwidth_bytes_per_s: 10e6,
    };
}

impl Default for LinkQuality {
    fn default() -> Self {
        Self::UNMEASURED
    }
}

/// A measured link from one node to another. Links are directed; when only one direction was
/// measured, the planner uses it for both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkProfile {
    /// Sending node.
    pub from: NodeId,
    /// Receiving node.
    pub to: NodeId,
    /// One-way latency of a small message, seconds.
    pub latency_s: f64,
    /// Sustained bandwidth, bytes/s.
    pub bandwidth_bytes_per_s: f64,
}

impl LinkProfile {
    /// A link measurement.
    pub fn new(
        from: impl Into<NodeId>,
        to: impl Into<NodeId>,
        latency_s: f64,
        bandwidth_bytes_per_s: f64,
    ) -> Self {
        Self {
            from: from.into(),
            to: to.into(),
            latency_s,
            bandwidth_bytes_per_s,
        }
    }
}

/// A snapshot of the cluster: its nodes and the links measured between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterProfile {
    /// The nodes, in any order.
    pub nodes: Vec<NodeProfile>,
    /// Measured links, in any order; at most one per ordered pair.
    pub links: Vec<LinkProfile>,
    /// Used for a pair of nodes with no measurement in either direction.
    #[serde(default)]
    pub unmeasured_link: LinkQuality,
    /// Largest tensor-parallel group the runtime can run (1: pipeline stages only). Groups
    /// are never wider than four nodes whatever this says.
    #[serde(default = "default_max_group")]
    pub max_tensor_parallel: u32,
}

fn default_max_group() -> u32 {
    u32::MAX
}

impl ClusterProfile {
    /// A cluster snapshot that assumes [`LinkQuality::UNMEASURED`] for pairs it has no link for.
    pub fn new(nodes: Vec<NodeProfile>, links: Vec<LinkProfile>) -> Self {
        Self {
            nodes,
            links,
            unmeasured_link: LinkQuality::UNMEASURED,
            max_tensor_parallel: default_max_group(),
        }
    }
}

/// What the plan must serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestProfile {
    /// Tokens of KV cache to reserve per request, at least 1.
    pub context_len: u64,
    /// Requests to reserve KV cache for at once, at least 1.
    pub concurrent_requests: u32,
    /// Prompt length for the prefill and time-to-first-token prediction, from 1 to
    /// `context_len`. Decode is predicted at this position too (it sets the KV cache read).
    pub prompt_len: u64,
}

impl RequestProfile {
    /// One request with `context_len` tokens reserved and a `prompt_len`-token prompt.
    pub fn new(context_len: u64, prompt_len: u64) -> Self {
        Self {
            context_len,
            concurrent_requests: 1,
            prompt_len,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let problem = if self.context_len == 0 {
            "context_len is zero".to_owned()
        } else if self.concurrent_requests == 0 {
            "concurrent_requests is zero".to_owned()
        } else if self.prompt_len == 0 {
            "prompt_len is zero".to_owned()
        } else if self.prompt_len > self.context_len {
            format!(
                "prompt_len {} exceeds context_len {}",
                self.prompt_len, self.context_len
            )
        } else {
            return Ok(());
        };
        Err(Error::InvalidRequest { problem })
    }
}

impl Default for RequestProfile {
    /// A single request with a 4096-token context and a 512-token prompt.
    fn default() -> Self {
        Self::new(4096, 512)
    }
}

pub(crate) fn saturate(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn llama3_8b_profile_matches_known_sizes() {
        let model = ModelProfile::llama(&LlamaShape::llama3_8b(16.0)).unwrap();
        // 8.03 B parameters in f16 is about 16.1 GB.
        let total = model.weight_bytes() as f64;
        assert!((15.8e9..16.3e9).contains(&total), "{total}");
        // Keys and values of 8 heads of 128 dims in f16: 4 KiB per token per layer.
        assert_eq!(model.kv_bytes_per_token_per_layer, 4096);
        assert_eq!(model.layer_flops_per_token, 2 * 218_103_808);
    }

    #[test]
    fn llama_rejects_heads_that_do_not_divide_hidden() {
        let mut shape = LlamaShape::smollm2_135m(16.0);
        shape.attention_heads = 7;
        let err = ModelProfile::llama(&shape).unwrap_err();
        assert!(err.to_string().contains("attention_heads"), "{err}");
    }

    #[test]
    fn request_rejects_prompt_longer_than_context() {
        let err = RequestProfile::new(128, 256).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid request profile: prompt_len 256 exceeds context_len 128"
        );
    }

    #[test]
    fn kv_reserve_scales_with_context_and_concurrency() {
        let model = ModelProfile::llama(&LlamaShape::llama3_8b(4.5)).unwrap();
        let mut request = RequestProfile::new(1000, 10);
        request.concurrent_requests = 3;
        assert_eq!(model.kv_reserve_bytes_per_layer(&request), 4096 * 3000);
        assert_eq!(model.kv_reserve_bytes(&request), 4096 * 3000 * 32);
    }
}
