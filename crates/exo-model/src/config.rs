//! Model configuration: the serde mirror of a Hugging Face `config.json`, and the resolved
//! runtime configuration every other crate uses.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest context a configuration may claim: 2^24 positions, beyond every released model
/// (the longest train for about 10 million). A larger value is a corrupt file, not a model, and
/// is refused rather than sized into tables.
pub(crate) const MAX_CONTEXT: usize = 1 << 24;

/// The longest context the runtime prepares for: 2^20 positions. The shards precompute rotary
/// tables for every position (head_dim * 4 bytes per position: 256 MiB at head_dim 64 here) and
/// a full KV cache grows with it, so a longer (but plausible) claim is capped with a warning
/// instead of refused: the model still runs, on contexts up to the cap.
pub(crate) const RUNTIME_CONTEXT: usize = 1 << 20;

/// The Llama-family configuration with every default filled in and derived sizes computed.
///
/// Built from a `config.json` ([`ModelConfig::from_hf_json`]) or from GGUF metadata; both paths
/// end here so that the model code has one source of truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `model_type` as the checkpoint names it (`llama`, `qwen2`, ...).
    pub model_type: String,
    /// Rows of the embedding table and of the head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    pub rope_theta: f64,
    /// Llama 3 style frequency scaling, if the checkpoint uses it.
    pub rope_scaling: Option<RopeScaling>,
    /// Longest context the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Whether the head reuses the embedding table.
    pub tie_word_embeddings: bool,
    /// Whether the q/k/v projections have biases (Qwen2 style).
    pub attention_bias: bool,
    /// Beginning-of-sequence token, if any.
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// What the model's family changes in the Llama layer (nothing for Llama and Qwen2).
    #[serde(default)]
    pub variant: Variant,
}

/// What a family changes in the Llama decoder layer. Every field off (the default) is Llama;
/// Qwen2 differs only by `attention_bias`. The model code implements each field once, so a new
/// family is a new way of filling this in (from GGUF metadata or `config.json`), not new layers.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Variant {
    /// RMSNorm of each query and key head (weights `[head_dim]`) before the rotary embedding
    /// (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMSNorm of the attention and MLP outputs before they join the residual stream
    /// (Gemma 2 and 3).
    pub sandwich_norms: bool,
    /// The activation of the MLP's gate.
    pub activation: Activation,
    /// Factor applied to every embedding row (Gemma: the square root of the hidden size).
    pub embedding_scale: Option<f64>,
    /// Scale of attention scores; `None` is `1 / sqrt(head_dim)`.
    pub attention_scale: Option<f64>,
    /// Sliding-window attention: how many positions a query sees, itself included.
    pub sliding_window: Option<usize>,
    /// With a window, every `n`-th layer (`n - 1`, `2n - 1`, ...) attends to the whole context
    /// instead (Gemma 3: 6); `None` slides in every layer.
    pub global_every: Option<usize>,
    /// Rotary base of the sliding-window layers (Gemma 3: 10 000); `None` uses `rope_theta`.
    pub rope_local_theta: Option<f64>,
    /// Linear rotary scaling of the global layers: positions divided by this factor.
    pub rope_linear_factor: Option<f64>,
    /// Final logits soft-capped as `cap * tanh(logit / cap)`.
    pub final_logit_softcap: Option<f64>,
    /// The file stores q, k and v as one matrix, and gate and up as one (Phi-3); the loader
    /// cuts them apart by rows.
    pub fused_projections: bool,
    /// Per-frequency divisors of the rotary frequencies (`head_dim / 2` of them), as Llama 3.x
    /// GGUF files store their rope scaling (`rope_freqs.weight`).
    pub rope_freq_factors: Option<Vec<f64>>,
    /// A mixture of experts in place of every layer's MLP (Qwen3-MoE, Mixtral).
    pub moe: Option<Moe>,
}

/// A sparse mixture-of-experts block: a router scores every expert for each token, and only
/// the `experts_per_token` best are computed, their outputs summed with the router's softmax
/// weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moe {
    /// Experts per layer.
    pub experts: usize,
    /// Experts computed for each token.
    pub experts_per_token: usize,
    /// Width of one expert's hidden layer.
    pub intermediate_size: usize,
    /// Whether the chosen experts' weights are rescaled to sum to one (Qwen3-MoE and Mixtral
    /// do; Qwen3-MoE's `norm_topk_prob`).
    pub normalize: bool,
}

/// The activation of an MLP's gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Activation {
    /// SiLU (`x * sigmoid(x)`): Llama, Qwen, Mistral.
    #[default]
    Silu,
    /// GELU with the tanh approximation: Gemma.
    GeluTanh,
}

impl Activation {
    /// The activation of one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
            }
        }
    }
}

/// Llama 3 rotary-frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// How much the context was stretched.
    pub factor: f64,
    /// Wavelengths longer than `original / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original / high_freq_factor` are left alone.
    pub high_freq_factor: f64,
    /// The context length before scaling.
    pub original_max_position_embeddings: usize,
}

/// `config.json` as Hugging Face writes it; only the fields we use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default = "default_model_type")]
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<HfRopeScaling>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    sliding_window: Option<usize>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f64>,
    final_logit_softcapping: Option<f64>,
    num_experts: Option<usize>,
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Vec<usize>,
    shared_expert_intermediate_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: String,
    #[serde(default = "one")]
    factor: f64,
    #[serde(default = "one")]
    low_freq_factor: f64,
    #[serde(default = "four")]
    high_freq_factor: f64,
    #[serde(default = "default_original_max")]
    original_max_position_embeddings: usize,
}

/// `eos_token_id` is an integer or a list of integers depending on the checkpoint.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(untagged)]
pub(crate) enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            OneOrMany::One(id) => vec![id],
            OneOrMany::Many(ids) => ids,
        }
    }
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn one() -> f64 {
    1.0
}
fn four() -> f64 {
    4.0
}
fn default_original_max() -> usize {
    8192
}

/// The families whose `config.json` this reader understands.
const HF_FAMILIES: &str = "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe, phi3, gemma3_text";

/// What a `config.json`'s family changes in the Llama layer.
fn hf_variant(raw: &HfConfig, head_dim: usize, path: &Path) -> Result<Variant> {
    let bad = |message: String| Error::Config {
        path: path.to_path_buf(),
        message,
    };
    let activation = match raw
        .hidden_activation
        .as_deref()
        .or(raw.hidden_act.as_deref())
        .unwrap_or("silu")
    {
        "silu" | "swish" => Activation::Silu,
        "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
        other => {
            return Err(bad(format!(
                "activation `{other}` is not supported (silu and gelu_pytorch_tanh are)"
            )));
        }
    };
    let linear = raw
        .rope_scaling
        .as_ref()
        .filter(|s| s.rope_type == "linear")
        .map(|s| s.factor);
    Ok(match raw.model_type.as_str() {
        "llama" | "qwen2" => Variant {
            activation,
            rope_linear_factor: linear,
            ..Variant::default()
        },
        "mistral" => Variant {
            activation,
            sliding_window: raw.sliding_window,
            rope_linear_factor: linear,
            ..Variant::default()
        },
        "qwen3" => Variant {
            qk_norm: true,
            activation,
            rope_linear_factor: linear,
            ..Variant::default()
        },
        "qwen3_moe" => {
            if raw.shared_expert_intermediate_size.is_some_and(|s| s > 0) {
                return Err(bad(
                    "shared experts (`shared_expert_intermediate_size`, Qwen2-MoE style) are not \
                     supported"
                        .into(),
                ));
            }
            if raw.decoder_sparse_step.unwrap_or(1) != 1 || !raw.mlp_only_layers.is_empty() {
                return Err(bad(
                    "dense layers among the expert layers (`decoder_sparse_step` other than 1 or \
                     a non-empty `mlp_only_layers`) are not supported: every layer must be a \
                     mixture of experts"
                        .into(),
                ));
            }
            Variant {
                qk_norm: true,
                activation,
                rope_linear_factor: linear,
                moe: Some(Moe {
                    experts: raw.num_experts.unwrap_or(0),
                    experts_per_token: raw.num_experts_per_tok.unwrap_or(0),
                    intermediate_size: raw.moe_intermediate_size.unwrap_or(raw.intermediate_size),
                    normalize: raw.norm_topk_prob.unwrap_or(false),
                }),
                ..Variant::default()
            }
        }
        "mixtral" => Variant {
            activation,
            sliding_window: raw.sliding_window,
            rope_linear_factor: linear,
            moe: Some(Moe {
                experts: raw.num_local_experts.unwrap_or(0),
                experts_per_token: raw.num_experts_per_tok.unwrap_or(0),
                intermediate_size: raw.intermediate_size,
                normalize: true,
            }),
            ..Variant::default()
        },
        "phi3" => Variant {
            activation,
            sliding_window: raw.sliding_window,
            rope_linear_factor: linear,
            fused_projections: true,
            ..Variant::default()
        },
        "gemma3_text" | "gemma3" => {
            let global_every = match &raw.layer_types {
                // Newer configs list each layer's kind; the pattern is where the first global
                // layer is.
                Some(kinds) => kinds
                    .iter()
                    .position(|k| k == "full_attention")
                    .map(|i| i + 1),
                None => Some(raw.sliding_window_pattern.unwrap_or(6)),
            };
            Variant {
                qk_norm: true,
                sandwich_norms: true,
                activation,
                embedding_scale: Some((raw.hidden_size as f64).sqrt()),
                attention_scale: Some(
                    1.0 / raw.query_pre_attn_scalar.unwrap_or(head_dim as f64).sqrt(),
                ),
                sliding_window: raw.sliding_window,
                global_every,
                rope_local_theta: Some(raw.rope_local_base_freq.unwrap_or(10_000.0)),
                rope_linear_factor: linear,
                final_logit_softcap: raw.final_logit_softcapping,
                ..Variant::default()
            }
        }
        other => {
            return Err(bad(format!(
                "model_type `{other}` is not supported (supported: {HF_FAMILIES})"
            )));
        }
    })
}

impl ModelConfig {
    /// Whether layer `layer` attends through a sliding window, and how wide.
    pub fn window_of(&self, layer: usize) -> Option<usize> {
        let window = self.variant.sliding_window?;
        match self.variant.global_every {
            Some(n) if n > 0 && (layer + 1).is_multiple_of(n) => None,
            _ => Some(window),
        }
    }

    /// The rotary base of the sliding-window layers where it differs from `rope_theta`
    /// (Gemma 3): those layers take tables of their own.
    pub fn local_rope_theta(&self) -> Option<f64> {
        let v = &self.variant;
        v.rope_local_theta.filter(|_| v.sliding_window.is_some())
    }

    /// Whether layer `layer` takes the local rotary tables ([`ModelConfig::local_rope_theta`]).
    pub fn uses_local_rope(&self, layer: usize) -> bool {
        self.window_of(layer).is_some() && self.local_rope_theta().is_some()
    }

    /// Whether a checkpoint of this configuration has the layer tensor `part`.
    pub fn has_part(&self, part: crate::LayerPart) -> bool {
        use crate::LayerPart as P;
        let moe = self.variant.moe;
        match part {
            P::QBias | P::KBias | P::VBias => self.attention_bias,
            P::QNorm | P::KNorm => self.variant.qk_norm,
            P::PostAttnNorm | P::PostMlpNorm => self.variant.sandwich_norms,
            P::Gate | P::Up | P::Down => moe.is_none(),
            P::Router => moe.is_some(),
            P::ExpertGate(e) | P::ExpertUp(e) | P::ExpertDown(e) => {
                moe.is_some_and(|m| (e as usize) < m.experts)
            }
            _ => true,
        }
    }

    /// Every tensor of one decoder layer, in the order a loader reads them: the dense parts
    /// the family has, then the router and each expert's gate, up and down.
    pub fn layer_parts(&self) -> Vec<crate::LayerPart> {
        use crate::LayerPart as P;
        let mut parts: Vec<P> = P::ALL.into_iter().filter(|&p| self.has_part(p)).collect();
        if let Some(moe) = self.variant.moe {
            parts.push(P::Router);
            for e in 0..moe.experts as u32 {
                parts.extend([P::ExpertGate(e), P::ExpertUp(e), P::ExpertDown(e)]);
            }
        }
        parts
    }

    /// Weights of one layer a token multiplies by: with a mixture of experts, only the router
    /// and the experts it picks (what compute per token scales with).
    pub fn active_layer_params(&self) -> usize {
        let all = self.layer_params();
        match self.variant.moe {
            Some(m) => {
                let expert = 3 * self.hidden_size * m.intermediate_size;
                all - (m.experts - m.experts_per_token.min(m.experts)) * expert
            }
            None => all,
        }
    }

    /// Parses a Hugging Face `config.json`; `path` is only used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let rope_scaling = match &raw.rope_scaling {
            None => None,
            Some(s) if s.rope_type == "llama3" => Some(RopeScaling {
                factor: s.factor,
                low_freq_factor: s.low_freq_factor,
                high_freq_factor: s.high_freq_factor,
                original_max_position_embeddings: s.original_max_position_embeddings,
            }),
            Some(s) if s.rope_type == "default" || s.rope_type == "linear" => None,
            Some(s) => {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "rope_scaling type `{}` is not supported (supported: llama3, linear)",
                        s.rope_type
                    ),
                });
            }
        };
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.num_attention_heads > 0 => raw.hidden_size / raw.num_attention_heads,
            None => 0,
        };
        let attention_bias = raw.attention_bias.unwrap_or(raw.model_type == "qwen2");
        let variant = hf_variant(&raw, head_dim, path)?;
        let config = ModelConfig {
            model_type: raw.model_type,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta: raw.rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings,
            attention_bias,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw
                .eos_token_id
                .map(OneOrMany::into_vec)
                .unwrap_or_default(),
            variant,
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks the relations between sizes that the model code relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| Error::Config {
            path: path.to_path_buf(),
            message,
        };
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if value == 0 {
                return Err(bad(format!("`{name}` must be positive")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if self.max_position_embeddings > MAX_CONTEXT {
            return Err(bad(format!(
                "max_position_embeddings ({}) is beyond {MAX_CONTEXT} positions, longer than any \
                 model is trained for",
                self.max_position_embeddings
            )));
        }
        // Every size the model code multiplies must fit, or a corrupt count would overflow
        // there instead of being refused here.
        if self.checked_layer_params().is_none()
            || self.vocab_size.checked_mul(self.hidden_size).is_none()
        {
            return Err(bad(format!(
                "sizes overflow: hidden_size {}, intermediate_size {}, {} heads and {} kv heads \
                 of {}, vocab_size {}",
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.vocab_size
            )));
        }
        let v = &self.variant;
        let positive = |x: Option<f64>| x.is_none_or(|x| x.is_finite() && x > 0.0);
        if !(positive(v.embedding_scale)
            && positive(v.attention_scale)
            && positive(v.rope_local_theta)
            && positive(v.rope_linear_factor)
            && positive(v.final_logit_softcap))
        {
            return Err(bad(format!(
                "the family's scales must be finite and positive: {v:?}"
            )));
        }
        if let Some(factors) = &v.rope_freq_factors
            && (factors.len() != self.head_dim / 2
                || !factors.iter().all(|f| f.is_finite() && *f > 0.0))
        {
            return Err(bad(format!(
                "rope_freqs.weight must hold {} finite positive factors (head_dim / 2), got {}",
                self.head_dim / 2,
                factors.len()
            )));
        }
        if let Some(m) = v.moe
            && (m.experts == 0
                || m.intermediate_size == 0
                || m.experts_per_token == 0
                || m.experts_per_token > m.experts
                || m.experts > u32::MAX as usize)
        {
            return Err(bad(format!(
                "the mixture of experts needs at least one expert, a positive expert width and \
                 between 1 and {} experts per token: got {} experts of width {}, {} per token",
                m.experts, m.experts, m.intermediate_size, m.experts_per_token
            )));
        }
        if v.sliding_window == Some(0) {
            return Err(bad("sliding_window must be positive".into()));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0)
        {
            return Err(bad(
                "rms_norm_eps and rope_theta must be finite, rope_theta positive".into(),
            ));
        }
        Ok(())
    }

    /// The `model_type` of this model's Hugging Face folder (`qwen3_moe` for a GGUF file's
    /// `qwen3moe`, `mixtral` for a Llama with experts): what its tensors are named after.
    pub fn hf_model_type(&self) -> &'static str {
        self.hf_architecture().1
    }

    /// The `general.architecture` of this model's GGUF file: llama.cpp names Gemma 3 and
    /// Qwen3-MoE its own way, and reads Mistral and Mixtral as Llama (with experts).
    pub fn gguf_architecture(&self) -> &str {
        match self.model_type.as_str() {
            "gemma3_text" => "gemma3",
            "qwen3_moe" => "qwen3moe",
            "mixtral" | "mistral" => "llama",
            other => other,
        }
    }

    /// The Hugging Face class and `model_type` of this model.
    fn hf_architecture(&self) -> (&'static str, &'static str) {
        match self.model_type.as_str() {
            "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
            "qwen3" => ("Qwen3ForCausalLM", "qwen3"),
            "qwen3moe" | "qwen3_moe" => ("Qwen3MoeForCausalLM", "qwen3_moe"),
            "mixtral" => ("MixtralForCausalLM", "mixtral"),
            "llama" if self.variant.moe.is_some() => ("MixtralForCausalLM", "mixtral"),
            "mistral" => ("MistralForCausalLM", "mistral"),
            "phi3" => ("Phi3ForCausalLM", "phi3"),
            "gemma3" | "gemma3_text" => ("Gemma3ForCausalLM", "gemma3_text"),
            _ => ("LlamaForCausalLM", "llama"),
        }
    }

    /// The `config.json` a Hugging Face loader expects for this configuration.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (architecture, model_type) = self.hf_architecture();
        let v = &self.variant;
        let activation = match v.activation {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        };
        let mut value = serde_json::json!({
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "hidden_act": activation,
            "hidden_activation": activation,
            "torch_dtype": "float32",
        });
        if let Some(map) = value.as_object_mut() {
            if let Some(bos) = self.bos_token_id {
                map.insert("bos_token_id".into(), bos.into());
            }
            match self.eos_token_ids.as_slice() {
                [] => {}
                [one] => {
                    map.insert("eos_token_id".into(), (*one).into());
                }
                many => {
                    map.insert("eos_token_id".into(), many.to_vec().into());
                }
            }
            if let Some(scale) = v.attention_scale {
                map.insert(
                    "query_pre_attn_scalar".into(),
                    (1.0 / (scale * scale)).into(),
                );
            }
            if let Some(window) = v.sliding_window {
                map.insert("sliding_window".into(), window.into());
                let kinds: Vec<&str> = (0..self.num_layers)
                    .map(|l| match self.window_of(l) {
                        Some(_) => "sliding_attention",
                        None => "full_attention",
                    })
                    .collect();
                map.insert("layer_types".into(), kinds.into());
            }
            if let Some(m) = v.moe {
                map.insert("num_experts".into(), m.experts.into());
                map.insert("num_local_experts".into(), m.experts.into());
                map.insert("num_experts_per_tok".into(), m.experts_per_token.into());
                map.insert("moe_intermediate_size".into(), m.intermediate_size.into());
                map.insert("norm_topk_prob".into(), m.normalize.into());
                if model_type == "mixtral" {
                    // Mixtral's experts are as wide as its `intermediate_size`.
                    map.insert("intermediate_size".into(), m.intermediate_size.into());
                }
            }
            if let Some(theta) = v.rope_local_theta {
                map.insert("rope_local_base_freq".into(), theta.into());
            }
            if let Some(cap) = v.final_logit_softcap {
                map.insert("final_logit_softcapping".into(), cap.into());
            }
            if let Some(factor) = v.rope_linear_factor {
                map.insert(
                    "rope_scaling".into(),
                    serde_json::json!({"rope_type": "linear", "factor": factor}),
                );
            }
            if let Some(s) = &self.rope_scaling {
                map.insert(
                    "rope_scaling".into(),
                    serde_json::json!({
                        "rope_type": "llama3",
                        "factor": s.factor,
                        "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings,
                    }),
                );
            }
        }
        value
    }

    /// Caps the context at what the runtime prepares for ([`RUNTIME_CONTEXT`]), with a warning
    /// naming the file; `validate` has already refused absurd values.
    pub(crate) fn cap_context(&mut self, path: &Path) {
        if self.max_position_embeddings > RUNTIME_CONTEXT {
            tracing::warn!(
                "{}: the context length {} is capped at {RUNTIME_CONTEXT} positions, the most \
                 the runtime prepares rotary tables and caches for",
                path.display(),
                self.max_position_embeddings
            );
            self.max_position_embeddings = RUNTIME_CONTEXT;
        }
    }

    /// Number of weights (parameters) of one layer, for memory estimates.
    pub fn layer_params(&self) -> usize {
        // `validate` refused configurations whose sizes overflow.
        self.checked_layer_params().unwrap_or(usize::MAX)
    }

    fn checked_layer_params(&self) -> Option<usize> {
        let h = self.hidden_size;
        let q = self.num_heads.checked_mul(self.head_dim)?;
        let kv = self.num_kv_heads.checked_mul(self.head_dim)?;
        let bias = if self.attention_bias {
            q.checked_add(kv.checked_mul(2)?)?
        } else {
            0
        };
        let attention = h.checked_mul(q.checked_mul(2)?.checked_add(kv.checked_mul(2)?)?)?;
        let mlp = match self.variant.moe {
            Some(m) => h
                .checked_mul(m.intermediate_size)?
                .checked_mul(3)?
                .checked_add(h)?
                .checked_mul(m.experts)?,
            None => h.checked_mul(self.intermediate_size)?.checked_mul(3)?,
        };
        h.checked_mul(2)?
            .checked_add(attention)?
            .checked_add(bias)?
            .checked_add(mlp)
    }

    /// The shape (rows first) a tensor must have under this configuration.
    pub fn expected_shape(&self, id: crate::TensorId) -> Vec<usize> {
        use crate::{LayerPart as P, TensorId as T};
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let i = self.intermediate_size;
        match id {
            T::Embedding | T::Head => vec![self.vocab_size, h],
            T::FinalNorm => vec![h],
            T::Layer { part, .. } => match part {
                P::AttnNorm | P::MlpNorm | P::PostAttnNorm | P::PostMlpNorm => vec![h],
                P::QNorm | P::KNorm => vec![self.head_dim],
                P::Q => vec![q, h],
                P::K | P::V => vec![kv, h],
                P::QBias => vec![q],
                P::KBias | P::VBias => vec![kv],
                P::O => vec![h, q],
                P::Gate | P::Up => vec![i, h],
                P::Down => vec![h, i],
                P::Router => vec![self.variant.moe.map_or(0, |m| m.experts), h],
                P::ExpertGate(_) | P::ExpertUp(_) => {
                    vec![self.variant.moe.map_or(0, |m| m.intermediate_size), h]
                }
                P::ExpertDown(_) => vec![h, self.variant.moe.map_or(0, |m| m.intermediate_size)],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error parsing `text` (read from `path`) gives, as the user sees it; empty if none.
    fn refusal(text: &str, path: &str) -> String {
        ModelConfig::from_hf_json(text, Path::new(path))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    const SMOL: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,
      "hidden_size":576,"intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
      "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000,"tie_word_embeddings":true,
      "max_position_embeddings":8192,"bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn parses_a_llama_config_and_derives_head_dim() -> Result<()> {
        let c = ModelConfig::from_hf_json(SMOL, Path::new("config.json"))?;
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.num_kv_heads, 3);
        assert!(c.tie_word_embeddings);
        assert!(!c.attention_bias);
        assert_eq!(c.eos_token_ids, vec![2]);
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string(), Path::new("x"))?;
        assert_eq!(back, c);
        Ok(())
    }

    #[test]
    fn llama3_rope_scaling_and_eos_lists() -> Result<()> {
        let text = SMOL.replace(
            r#""eos_token_id":2"#,
            r#""eos_token_id":[2,7],"rope_scaling":{"rope_type":"llama3","factor":8.0,
               "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = ModelConfig::from_hf_json(&text, Path::new("config.json"))?;
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        assert_eq!(c.rope_scaling.as_ref().map(|s| s.factor), Some(8.0));
        Ok(())
    }

    #[test]
    fn qwen2_defaults_to_attention_bias() -> Result<()> {
        let text = SMOL.replace(r#""model_type":"llama""#, r#""model_type":"qwen2""#);
        let c = ModelConfig::from_hf_json(&text, Path::new("config.json"))?;
        assert!(c.attention_bias);
        Ok(())
    }

    #[test]
    fn a_missing_field_is_named_with_the_file() {
        let text = SMOL.replace(r#""hidden_size":576,"#, "");
        let err = refusal(&text, "/m/config.json");
        assert!(err.contains("/m/config.json"), "{err}");
        assert!(err.contains("hidden_size"), "{err}");
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let text = SMOL.replace(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#);
        let err = refusal(&text, "config.json");
        assert!(err.contains("not a multiple"), "{err}");
    }

    /// Qwen3-30B-A3B's `config.json` (the fields that matter).
    const QWEN3_MOE: &str = r#"{"architectures":["Qwen3MoeForCausalLM"],"model_type":"qwen3_moe",
      "vocab_size":151936,"hidden_size":2048,"intermediate_size":6144,"num_hidden_layers":48,
      "num_attention_heads":32,"num_key_value_heads":4,"head_dim":128,"rms_norm_eps":1e-6,
      "rope_theta":1000000.0,"max_position_embeddings":40960,"tie_word_embeddings":false,
      "num_experts":128,"num_experts_per_tok":8,"moe_intermediate_size":768,
      "norm_topk_prob":true,"decoder_sparse_step":1,"mlp_only_layers":[],
      "bos_token_id":151643,"eos_token_id":151645}"#;

    #[test]
    fn parses_qwen3_moe_and_mixtral_configs() -> Result<()> {
        let c = ModelConfig::from_hf_json(QWEN3_MOE, Path::new("config.json"))?;
        let moe = c.variant.moe.unwrap_or(Moe {
            experts: 0,
            experts_per_token: 0,
            intermediate_size: 0,
            normalize: false,
        });
        assert_eq!(
            (moe.experts, moe.experts_per_token, moe.intermediate_size),
            (128, 8, 768)
        );
        assert!(moe.normalize && c.variant.qk_norm);
        let parts = c.layer_parts();
        // Norms, attention and query/key norms, then the router and 128 experts of 3.
        assert_eq!(parts.len(), 8 + 1 + 128 * 3);
        assert!(!parts.contains(&crate::LayerPart::Gate));
        // About 3B of 30B parameters are active per token (2.7B of them in the layers).
        let (all, active) = (c.layer_params() * 48, c.active_layer_params() * 48);
        assert!((28e9..30e9).contains(&(all as f64)), "{all}");
        assert!((2.6e9..2.9e9).contains(&(active as f64)), "{active}");
        assert_eq!(c.to_hf_json()["model_type"], "qwen3_moe");

        let mixtral = r#"{"model_type":"mixtral","vocab_size":32000,"hidden_size":4096,
          "intermediate_size":14336,"num_hidden_layers":32,"num_attention_heads":32,
          "num_key_value_heads":8,"num_local_experts":8,"num_experts_per_tok":2,
          "sliding_window":null}"#;
        let c = ModelConfig::from_hf_json(mixtral, Path::new("config.json"))?;
        assert_eq!(
            c.variant
                .moe
                .map(|m| (m.experts, m.experts_per_token, m.intermediate_size)),
            Some((8, 2, 14336))
        );
        assert_eq!(c.variant.sliding_window, None);
        Ok(())
    }

    #[test]
    fn dense_layers_among_experts_and_shared_experts_are_refused_by_name() {
        let dense = QWEN3_MOE.replace(r#""mlp_only_layers":[]"#, r#""mlp_only_layers":[0]"#);
        let err = refusal(&dense, "config.json");
        assert!(err.contains("mlp_only_layers"), "{err}");
        let shared = QWEN3_MOE.replace(
            r#""num_experts":128"#,
            r#""num_experts":128,"shared_expert_intermediate_size":5632"#,
        );
        let err = refusal(&shared, "config.json");
        assert!(err.contains("shared experts"), "{err}");
        let too_many =
            QWEN3_MOE.replace(r#""num_experts_per_tok":8"#, r#""num_experts_per_tok":200"#);
        let err = refusal(&too_many, "config.json");
        assert!(err.contains("experts per token"), "{err}");
    }
}
