//! The mapping between our names for a model's tensors and each checkpoint format's names.
//!
//! It lives in one place so that the two formats cannot drift apart: the loader, the exporter and
//! the tests all ask [`TensorId::hf_name`] and [`TensorId::gguf_name`].

use serde::{Deserialize, Serialize};

/// One tensor of a Llama-family model, independent of how a file names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TensorId {
    /// Token embedding table, `[vocab, hidden]`.
    Embedding,
    /// A tensor of decoder layer `layer`.
    Layer {
        /// Index of the decoder layer.
        layer: usize,
        /// Which of its tensors.
        part: LayerPart,
    },
    /// The RMSNorm weight applied before the head, `[hidden]`.
    FinalNorm,
    /// The output projection (language-model head), `[vocab, hidden]`; absent when tied.
    Head,
}

/// Where a part of a fused matrix lives (see [`TensorId::fused_source`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedSource {
    /// The fused tensor's name in a Hugging Face checkpoint.
    pub hf_name: String,
    /// The fused tensor's name in a GGUF file.
    pub gguf_name: String,
    /// This part's rows of the fused tensor.
    pub rows: std::ops::Range<usize>,
    /// Rows of the whole fused tensor.
    pub total_rows: usize,
}

/// The tensors of one decoder layer. Matrices are `[out, in]`, as in Hugging Face checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum LayerPart {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    MlpNorm,
    Gate,
    Up,
    Down,
    /// RMSNorm of each query head (Qwen3, Gemma 3), `[head_dim]`.
    QNorm,
    /// RMSNorm of each key head (Qwen3, Gemma 3), `[head_dim]`.
    KNorm,
    /// RMSNorm of the attention output before the residual (Gemma), `[hidden]`.
    PostAttnNorm,
    /// RMSNorm of the MLP output before the residual (Gemma), `[hidden]`.
    PostMlpNorm,
    /// A mixture of experts' router: one row of logits weights per expert, `[experts, hidden]`.
    Router,
    /// Expert `n`'s gate projection, `[expert_intermediate, hidden]`.
    ExpertGate(u32),
    /// Expert `n`'s up projection, `[expert_intermediate, hidden]`.
    ExpertUp(u32),
    /// Expert `n`'s down projection, `[hidden, expert_intermediate]`.
    ExpertDown(u32),
}

impl LayerPart {
    /// Every part of every dense family (a checkpoint has those its configuration's
    /// `ModelConfig::has_part` names; `ModelConfig::layer_parts` lists a layer's parts with its
    /// experts).
    pub const ALL: [LayerPart; 16] = [
        LayerPart::AttnNorm,
        LayerPart::Q,
        LayerPart::K,
        LayerPart::V,
        LayerPart::QBias,
        LayerPart::KBias,
        LayerPart::VBias,
        LayerPart::O,
        LayerPart::MlpNorm,
        LayerPart::Gate,
        LayerPart::Up,
        LayerPart::Down,
        LayerPart::QNorm,
        LayerPart::KNorm,
        LayerPart::PostAttnNorm,
        LayerPart::PostMlpNorm,
    ];

    /// Whether this part exists only in checkpoints with attention bias (Qwen2 style).
    pub fn is_bias(self) -> bool {
        matches!(self, LayerPart::QBias | LayerPart::KBias | LayerPart::VBias)
    }

    /// The expert this part belongs to, for an expert's matrix.
    pub fn expert(self) -> Option<usize> {
        match self {
            LayerPart::ExpertGate(e) | LayerPart::ExpertUp(e) | LayerPart::ExpertDown(e) => {
                Some(e as usize)
            }
            _ => None,
        }
    }
}

impl TensorId {
    /// Where a family that fuses its projections (Phi-3) stores this tensor: the fused
    /// tensor's Hugging Face and GGUF names, which of its parts this is, and how many parts of
    /// what sizes it has (`sizes` are the rows of q, k, v or of gate, up); `None` for tensors
    /// stored on their own.
    pub fn fused_source(self, q: usize, kv: usize, i: usize) -> Option<FusedSource> {
        let TensorId::Layer { layer, part } = self else {
            return None;
        };
        let (hf, gguf, rows, total) = match part {
            LayerPart::Q => (
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                0..q,
                q + 2 * kv,
            ),
            LayerPart::K => (
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                q..q + kv,
                q + 2 * kv,
            ),
            LayerPart::V => (
                "self_attn.qkv_proj.weight",
                "attn_qkv.weight",
                q + kv..q + 2 * kv,
                q + 2 * kv,
            ),
            LayerPart::Gate => ("mlp.gate_up_proj.weight", "ffn_up.weight", 0..i, 2 * i),
            LayerPart::Up => ("mlp.gate_up_proj.weight", "ffn_up.weight", i..2 * i, 2 * i),
            _ => return None,
        };
        Some(FusedSource {
            hf_name: format!("model.layers.{layer}.{hf}"),
            gguf_name: format!("blk.{layer}.{gguf}"),
            rows,
            total_rows: total,
        })
    }

    /// The tensor's name in a Hugging Face safetensors checkpoint of a Llama-layout family.
    pub fn hf_name(self) -> String {
        self.hf_name_in("llama")
    }

    /// The tensor's name in a Hugging Face checkpoint whose `model_type` is `model_type`: Gemma
    /// names its four norms differently (its `post_attention_layernorm` is the attention
    /// output's norm, where Llama's is the MLP's input norm).
    pub fn hf_name_in(self, model_type: &str) -> String {
        if model_type.starts_with("gemma")
            && let TensorId::Layer { layer, part } = self
        {
            let suffix = match part {
                LayerPart::MlpNorm => Some("pre_feedforward_layernorm.weight"),
                LayerPart::PostAttnNorm => Some("post_attention_layernorm.weight"),
                LayerPart::PostMlpNorm => Some("post_feedforward_layernorm.weight"),
                _ => None,
            };
            if let Some(suffix) = suffix {
                return format!("model.layers.{layer}.{suffix}");
            }
        }
        if let TensorId::Layer { layer, part } = self {
            // Mixtral's experts are `w1` (gate), `w3` (up) and `w2` (down) in its own block;
            // Qwen's (and the default) are named like a dense MLP's.
            let (block, [gate, up, down]) = if model_type == "mixtral" {
                ("block_sparse_moe", ["w1", "w3", "w2"])
            } else {
                ("mlp", ["gate_proj", "up_proj", "down_proj"])
            };
            let expert =
                |e: u32, m: &str| format!("model.layers.{layer}.{block}.experts.{e}.{m}.weight");
            match part {
                LayerPart::Router => return format!("model.layers.{layer}.{block}.gate.weight"),
                LayerPart::ExpertGate(e) => return expert(e, gate),
                LayerPart::ExpertUp(e) => return expert(e, up),
                LayerPart::ExpertDown(e) => return expert(e, down),
                _ => {}
            }
        }
        match self {
            TensorId::Embedding => "model.embed_tokens.weight".into(),
            TensorId::FinalNorm => "model.norm.weight".into(),
            TensorId::Head => "lm_head.weight".into(),
            TensorId::Layer { layer, part } => {
                let suffix = match part {
                    LayerPart::AttnNorm => "input_layernorm.weight",
                    LayerPart::Q => "self_attn.q_proj.weight",
                    LayerPart::K => "self_attn.k_proj.weight",
                    LayerPart::V => "self_attn.v_proj.weight",
                    LayerPart::QBias => "self_attn.q_proj.bias",
                    LayerPart::KBias => "self_attn.k_proj.bias",
                    LayerPart::VBias => "self_attn.v_proj.bias",
                    LayerPart::O => "self_attn.o_proj.weight",
                    LayerPart::MlpNorm => "post_attention_layernorm.weight",
                    LayerPart::Gate => "mlp.gate_proj.weight",
                    LayerPart::Up => "mlp.up_proj.weight",
                    LayerPart::Down => "mlp.down_proj.weight",
                    LayerPart::QNorm => "self_attn.q_norm.weight",
                    LayerPart::KNorm => "self_attn.k_norm.weight",
                    LayerPart::PostAttnNorm => "post_attention_norm.weight",
                    LayerPart::PostMlpNorm => "post_feedforward_layernorm.weight",
                    // Named above.
                    LayerPart::Router
                    | LayerPart::ExpertGate(_)
                    | LayerPart::ExpertUp(_)
                    | LayerPart::ExpertDown(_) => "",
                };
                format!("model.layers.{layer}.{suffix}")
            }
        }
    }

    /// The tensor's name in a GGUF file (llama.cpp's naming). All experts of a layer share one
    /// tensor per projection (`[experts, rows, cols]`), so an expert's matrix is named by the
    /// stack that holds it.
    pub fn gguf_name(self) -> String {
        match self {
            TensorId::Embedding => "token_embd.weight".into(),
            TensorId::FinalNorm => "output_norm.weight".into(),
            TensorId::Head => "output.weight".into(),
            TensorId::Layer { layer, part } => {
                let suffix = match part {
                    LayerPart::AttnNorm => "attn_norm.weight",
                    LayerPart::Q => "attn_q.weight",
                    LayerPart::K => "attn_k.weight",
                    LayerPart::V => "attn_v.weight",
                    LayerPart::QBias => "attn_q.bias",
                    LayerPart::KBias => "attn_k.bias",
                    LayerPart::VBias => "attn_v.bias",
                    LayerPart::O => "attn_output.weight",
                    LayerPart::MlpNorm => "ffn_norm.weight",
                    LayerPart::Gate => "ffn_gate.weight",
                    LayerPart::Up => "ffn_up.weight",
                    LayerPart::Down => "ffn_down.weight",
                    LayerPart::QNorm => "attn_q_norm.weight",
                    LayerPart::KNorm => "attn_k_norm.weight",
                    LayerPart::PostAttnNorm => "post_attention_norm.weight",
                    LayerPart::PostMlpNorm => "post_ffw_norm.weight",
                    LayerPart::Router => "ffn_gate_inp.weight",
                    LayerPart::ExpertGate(_) => "ffn_gate_exps.weight",
                    LayerPart::ExpertUp(_) => "ffn_up_exps.weight",
                    LayerPart::ExpertDown(_) => "ffn_down_exps.weight",
                };
                format!("blk.{layer}.{suffix}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_each_format() {
        let q = TensorId::Layer {
            layer: 7,
            part: LayerPart::Q,
        };
        assert_eq!(q.hf_name(), "model.layers.7.self_attn.q_proj.weight");
        assert_eq!(q.gguf_name(), "blk.7.attn_q.weight");
        assert_eq!(TensorId::Embedding.gguf_name(), "token_embd.weight");
        assert_eq!(TensorId::Head.hf_name(), "lm_head.weight");
        let down = TensorId::Layer {
            layer: 0,
            part: LayerPart::Down,
        };
        assert_eq!(down.hf_name(), "model.layers.0.mlp.down_proj.weight");
        assert_eq!(down.gguf_name(), "blk.0.ffn_down.weight");
    }

    #[test]
    fn every_part_has_distinct_names() {
        let mut hf = std::collections::HashSet::new();
        let mut gguf = std::collections::HashSet::new();
        let mut gemma = std::collections::HashSet::new();
        for part in LayerPart::ALL {
            let id = TensorId::Layer { layer: 3, part };
            assert!(hf.insert(id.hf_name()));
            assert!(gemma.insert(id.hf_name_in("gemma3_text")));
            assert!(gguf.insert(id.gguf_name()));
        }
    }

    #[test]
    fn experts_follow_each_family() {
        let id = |part| TensorId::Layer { layer: 2, part };
        assert_eq!(
            id(LayerPart::ExpertDown(5)).hf_name_in("qwen3_moe"),
            "model.layers.2.mlp.experts.5.down_proj.weight"
        );
        assert_eq!(
            id(LayerPart::ExpertUp(5)).hf_name_in("mixtral"),
            "model.layers.2.block_sparse_moe.experts.5.w3.weight"
        );
        assert_eq!(
            id(LayerPart::Router).hf_name_in("mixtral"),
            "model.layers.2.block_sparse_moe.gate.weight"
        );
        assert_eq!(
            id(LayerPart::Router).gguf_name(),
            "blk.2.ffn_gate_inp.weight"
        );
        // Every expert of a layer lives in one stacked GGUF tensor per projection.
        assert_eq!(
            id(LayerPart::ExpertGate(0)).gguf_name(),
            id(LayerPart::ExpertGate(7)).gguf_name()
        );
    }
}
