//! Shards compose: running a tiny random model's layers as 1 to 4 consecutive shards, one after
//! another, gives the same logits as the whole model, for prefill and for decode steps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_model::testing::{tiny_config, write_gguf, write_hf_folder};
use exo_model::{Checkpoint, ShardSpec};
use exo_shard::{BackendKind, KvCache, LlamaShard, forward_tokens};
use proptest::prelude::*;

const LAYERS: usize = 6;

/// Loads shards for the stage boundaries `cuts` (sorted, inside `1..LAYERS`).
fn stages(checkpoint: &Checkpoint, cuts: &[usize]) -> Vec<LlamaShard> {
    let device = BackendKind::Flex.device().unwrap();
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(LAYERS);
    bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            let spec = ShardSpec {
                layers: w[0]..w[1],
                embedding: i == 0,
                head: w[1] == LAYERS,
            };
            LlamaShard::load(checkpoint, &spec, &device).unwrap()
        })
        .collect()
}

/// Logits after the prompt and after each of `steps` decode tokens.
fn run(stages: &[LlamaShard], prompt: &[u32], steps: &[u32]) -> Vec<Vec<f32>> {
    let mut caches: Vec<KvCache> = stages.iter().map(LlamaShard::new_cache).collect();
    let mut out = vec![forward_tokens(stages, prompt, &mut caches).unwrap()];
    for &t in steps {
        out.push(forward_tokens(stages, &[t], &mut caches).unwrap());
    }
    out
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
    for (step, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.len(), y.len());
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "step {step}: max difference {worst}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_split_gives_the_whole_models_logits(
        cuts in proptest::collection::btree_set(1..LAYERS, 0..=3),
        prompt in proptest::collection::vec(0u32..96, 1..12),
        steps in proptest::collection::vec(0u32..96, 0..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("tiny");
        write_hf_folder(&folder, &tiny_config(LAYERS), 42, 1).unwrap();
        let checkpoint = Checkpoint::open(&folder).unwrap();
        let whole = run(&stages(&checkpoint, &[]), &prompt, &steps);
        let cuts: Vec<usize> = cuts.into_iter().collect();
        let split = run(&stages(&checkpoint, &cuts), &prompt, &steps);
        assert_close(&whole, &split, 1e-4);
    }
}

#[test]
fn prefill_then_decode_equals_prefill_of_everything() {
    // The KV cache is exact: feeding tokens one by one gives the logits of one long prefill.
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny");
    write_hf_folder(&folder, &tiny_config(LAYERS), 9, 1).unwrap();
    let checkpoint = Checkpoint::open(&folder).unwrap();
    let model = stages(&checkpoint, &[2, 4]);
    let tokens = [5u32, 17, 33, 2, 90, 64];
    let stepwise = run(&model, &tokens[..1], &tokens[1..]);
    let full = run(&model, &tokens, &[]);
    assert_close(&stepwise[stepwise.len() - 1..], &full, 1e-4);
}

#[test]
fn the_gguf_path_computes_the_same_logits_as_safetensors() {
    // Proves the q/k un-permutation on a model the test made itself.
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(LAYERS);
    write_hf_folder(&dir.path().join("m"), &config, 5, 1).unwrap();
    write_gguf(&dir.path().join("m.gguf"), &config, 5).unwrap();
    let hf = Checkpoint::open(&dir.path().join("m")).unwrap();
    let gguf = Checkpoint::open(&dir.path().join("m.gguf")).unwrap();
    let prompt = [1u32, 40, 41, 42];
    assert_close(
        &run(&stages(&hf, &[3]), &prompt, &[7]),
        &run(&stages(&gguf, &[3]), &prompt, &[7]),
        1e-5,
    );
}

#[test]
fn bad_inputs_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny");
    write_hf_folder(&folder, &tiny_config(LAYERS), 1, 1).unwrap();
    let checkpoint = Checkpoint::open(&folder).unwrap();
    let model = stages(&checkpoint, &[3]);
    // A token beyond the vocabulary.
    let e = model[0]
        .embed(&[5, 96])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("96") && e.contains("vocabulary"), "{e}");
    // The second stage has no embedding; the first has no head.
    assert!(model[1].embed(&[1]).is_err());
    let x = model[0].embed(&[1, 2]).unwrap();
    assert!(model[0].logits(x.clone()).is_err());
    // Activations of the wrong width.
    let wrong = exo_shard::Tensor::<3>::zeros([1, 2, 31], &model[1].device());
    let mut cache = model[1].new_cache();
    let e = model[1]
        .forward(wrong, &mut cache)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("[1, 2, 32]") && e.contains("[1, 2, 31]"), "{e}");
    // A cache from another shard.
    let mut other = KvCache::new(1);
    assert!(model[1].forward(x.clone(), &mut other).is_err());
    // Running past the context.
    let mut cache = model[0].new_cache();
    let long: Vec<u32> = (0..257).map(|i| i % 96).collect();
    let x = model[0].embed(&long).unwrap();
    let e = model[0]
        .forward(x, &mut cache)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("context"), "{e}");
}

#[test]
fn the_cpu_kernel_path_computes_the_burn_paths_logits() {
    // With f32 weights the kernels must agree with burn to rounding; the same for any split.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_gguf(&path, &tiny_config(LAYERS), 21).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let native: Vec<LlamaShard> = [(0, 2, true, false), (2, LAYERS, false, true)]
        .into_iter()
        .map(|(a, b, embedding, head)| {
            let spec = ShardSpec {
                layers: a..b,
                embedding,
                head,
            };
            LlamaShard::load_with(&checkpoint, &spec, &device, exo_shard::Weights::Stored).unwrap()
        })
        .collect();
    assert!(native.iter().all(LlamaShard::is_native));
    let prompt = [1u32, 40, 41, 42, 7, 9];
    let steps = [3u32, 77, 5];
    assert_close(
        &run(&stages(&checkpoint, &[]), &prompt, &steps),
        &run(&native, &prompt, &steps),
        1e-4,
    );
}
