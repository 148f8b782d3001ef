//! Engine parity on the default model (SmolLM2-135M-Instruct, GGUF dequantized to f32) against
//! the reference outputs of transformers and llama.cpp in `../shared/golden/smollm2-135m.json`:
//! loading the GGUF, and loading the Hugging Face folder exported from it.
//!
//! Uses the real model: run with `--release` (the README's test command does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

mod common;
use common::top5;

use exo_model::{Checkpoint, ExportDtype, ShardSpec, ensure_default_model, exo_home, export_hf};
use exo_shard::{BackendKind, LlamaShard, forward_tokens};

fn golden() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden/smollm2-135m.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn check_parity(path: &Path) {
    let golden = golden();
    let checkpoint = Checkpoint::open(path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let whole = ShardSpec::whole(checkpoint.config().num_layers);
    let shard = LlamaShard::load(&checkpoint, &whole, &device).unwrap();
    let prompt = ids(&golden["input_ids"]);

    // First generated position: top-5 ids and logits.
    let mut caches = vec![shard.new_cache()];
    let stages = [shard];
    let logits = forward_tokens(&stages, &prompt, &mut caches).unwrap();
    let order = top5(&logits);
    let top5: Vec<u32> = order.iter().map(|&i| i as u32).collect();
    assert_eq!(
        top5,
        ids(&golden["first_pos_top5_ids"]),
        "{}",
        path.display()
    );
    let expected: Vec<f32> =
        serde_json::from_value(golden["first_pos_top5_logits"].clone()).unwrap();
    for (i, want) in order[..5].iter().zip(&expected) {
        let got = logits[*i];
        assert!(
            (got - want).abs() < 0.05,
            "token {i}: logit {got}, reference {want}"
        );
    }

    // 32 greedy tokens, EOS ignored.
    let out = common::greedy_32(&checkpoint, &stages, prompt);
    assert_eq!(
        out.ids,
        ids(&golden["greedy_f32_ids"]),
        "{}",
        path.display()
    );
    assert_eq!(out.text, golden["greedy_f32_text"].as_str().unwrap());
}

fn default_model() -> PathBuf {
    ensure_default_model(&exo_home(), &mut |line| eprintln!("{line}")).unwrap()
}

#[test]
fn gguf_matches_the_reference_engines() {
    check_parity(&default_model());
}

#[test]
fn exported_hugging_face_folder_matches_the_reference_engines() {
    let gguf = Checkpoint::open(&default_model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2-hf");
    let summary = export_hf(&gguf, &out, ExportDtype::F32).unwrap();
    assert_eq!(summary.tensors, 2 + 30 * 9);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    check_parity(&out);
}

/// First-position logits of the default model with weights held as `weights`.
fn first_logits(weights: exo_shard::Weights) -> Vec<f32> {
    let checkpoint = Checkpoint::open(&default_model()).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let whole = ShardSpec::whole(checkpoint.config().num_layers);
    let shard = LlamaShard::load_with(&checkpoint, &whole, &device, weights).unwrap();
    let mut caches = vec![shard.new_cache()];
    forward_tokens(&[shard], &ids(&golden()["input_ids"]), &mut caches).unwrap()
}

#[test]
fn quantized_cpu_path_stays_within_half_a_logit_of_f32() {
    let reference = first_logits(exo_shard::Weights::F32);
    let quantized = first_logits(exo_shard::Weights::Stored);
    for i in top5(&reference) {
        let (a, b) = (reference[i], quantized[i]);
        eprintln!(
            "token {i}: f32 {a:.3}, quantized {b:.3}; quantized top5 {:?}",
            top5(&quantized)
                .iter()
                .map(|&j| (j, quantized[j]))
                .collect::<Vec<_>>()
        );
        assert!((a - b).abs() < 0.5, "token {i}: f32 {a}, quantized {b}");
    }
}

#[test]
fn cpu_kernels_on_dequantized_weights_match_the_reference() {
    let f32_kernels = first_logits(exo_shard::Weights::Quantize(exo_shard::WeightFormat::F32));
    let golden = golden();
    let expected: Vec<f32> =
        serde_json::from_value(golden["first_pos_top5_logits"].clone()).unwrap();
    let top = top5(&f32_kernels);
    assert_eq!(
        top.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        ids(&golden["first_pos_top5_ids"])
    );
    for (i, want) in top.iter().zip(&expected) {
        assert!(
            (f32_kernels[*i] - want).abs() < 0.05,
            "token {i}: {} vs {want}",
            f32_kernels[*i]
        );
    }
}
