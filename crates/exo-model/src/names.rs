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
}

impl LayerPart {
    /// Every part, biases included (a checkpoint without attention bias skips the bias parts).
    pub const ALL: [LayerPart; 12] = [
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
    ];

    /// Whether this part exists only in checkpoints with attention bias (Qwen2 style).
    pub fn is_bias(self) -> bool {
        matches!(self, LayerPart::QBias | LayerPart::KBias | LayerPart::VBias)
    }
}

impl TensorId {
    /// The tensor's name in a Hugging Face safetensors checkpoint.
    pub fn hf_name(self) -> String {
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
                };
                format!("model.layers.{layer}.{suffix}")
            }
        }
    }

    /// The tensor's name in a GGUF file (llama.cpp's naming).
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
        for part in LayerPart::ALL {
            let id = TensorId::Layer { layer: 3, part };
            assert!(hf.insert(id.hf_name()));
            assert!(gguf.insert(id.gguf_name()));
        }
    }
}
