//! A GGUF whose layers mix formats as llama.cpp's Q4_K_M does (Q4_K for most matrices, Q6_K for
//! some layers' v and down projections and for the embedding) loads on the CPU kernels and
//! computes the logits of the f32 path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_model::testing::{tiny_config, write_gguf_typed};
use exo_model::{Checkpoint, DType, LayerPart, ModelConfig, ShardSpec, TensorId};
use exo_shard::{BackendKind, KvCache, LlamaShard, Weights, forward_tokens};

/// A small model whose matrices are whole K-quant super-blocks wide.
fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        ..tiny_config(3)
    }
}

/// Q4_K_M's choice, roughly: Q6_K for v and down in every other layer and for the embedding,
/// Q4_K elsewhere.
fn q4_k_m(id: TensorId) -> DType {
    match id {
        TensorId::Embedding | TensorId::Head => DType::Q6K,
        TensorId::Layer {
            layer,
            part: LayerPart::V | LayerPart::Down,
        } if layer % 2 == 0 => DType::Q6K,
        TensorId::Layer { .. } => DType::Q4K,
        _ => DType::F32,
    }
}

fn logits(shard: LlamaShard, prompt: &[u32], steps: &[u32]) -> Vec<Vec<f32>> {
    let stages = [shard];
    let mut caches: Vec<KvCache> = stages.iter().map(LlamaShard::new_cache).collect();
    let mut out = vec![forward_tokens(&stages, prompt, &mut caches).unwrap()];
    for &t in steps {
        out.push(forward_tokens(&stages, &[t], &mut caches).unwrap());
    }
    out
}

#[test]
fn a_q4_k_m_style_mix_loads_and_matches_the_f32_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.gguf");
    let config = config();
    write_gguf_typed(&path, &config, 5, &q4_k_m).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let whole = ShardSpec::whole(config.num_layers);
    let device = BackendKind::Flex.device().unwrap();
    let reference = LlamaShard::load_with(&checkpoint, &whole, &device, Weights::F32).unwrap();
    let native = LlamaShard::load_with(&checkpoint, &whole, &device, Weights::Stored).unwrap();
    assert!(native.is_native());
    // Kept in their own formats: about 4.6 bits per weight, not widened to 8.
    let params = config.num_layers
        * (config.hidden_size * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
            + config.num_heads * config.head_dim * config.hidden_size
            + 3 * config.hidden_size * config.intermediate_size)
        + config.vocab_size * config.hidden_size;
    let bytes = native.native_weight_bytes().unwrap();
    assert!(bytes * 8 < params * 6, "{bytes} bytes for {params} weights");
    let prompt = [1u32, 40, 41, 42, 7, 9, 11, 60];
    let steps = [3u32, 77, 5];
    let (want, got) = (
        logits(reference, &prompt, &steps),
        logits(native, &prompt, &steps),
    );
    // With 8-bit activations (the K-quants' default on AVX2) each input of a product moves by
    // up to half a step of its block of 32, about 1 % of these logits; f32 activations agree
    // to rounding.
    let q8 = exo_kernels::QuantMatrix::from_ggml(exo_kernels::WeightFormat::Q4K, 1, 256, &[0; 144])
        .is_ok_and(|m| m.uses_q8_activations());
    let tolerance = if q8 { 2e-2 } else { 1e-3 };
    for (step, (a, b)) in want.iter().zip(&got).enumerate() {
        let worst = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        let size = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            worst <= tolerance * size.max(1.0),
            "step {step}: max difference {worst} (largest logit {size})"
        );
    }
}
