//! Several requests in one batched step give what each gives alone: on the default model
//! (SmolLM2-135M-Instruct, Q4_1 on the CPU kernels), three prompts of different lengths
//! prefilled together and then decoded together, step by step, against each run on its own.
//!
//! Uses the real model: run with `--release` (the README's test command does).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exo_model::{Checkpoint, ShardSpec, ensure_default_model, exo_home};
use exo_shard::{BackendKind, KvCache, LlamaShard, Weights, argmax};

const PROMPTS: [&[u32]; 3] = [
    &[1, 504, 3458, 282, 4667, 314, 216, 1083, 30],
    &[1, 9690, 198, 2683, 314, 253],
    &[
        1, 504, 3458, 282, 5457, 30, 2, 198, 339, 6012, 314, 8270, 28, 2683,
    ],
];
const STEPS: usize = 12;

/// Greedy ids and each step's logits for one prompt alone.
fn alone(shard: &LlamaShard, prompt: &[u32]) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = shard.new_cache();
    let (mut ids, mut all) = (Vec::new(), Vec::new());
    let mut x = Vec::new();
    let mut logits = Vec::new();
    let mut input = prompt.to_vec();
    for _ in 0..STEPS {
        shard.embed_into(&input, &mut x).unwrap();
        shard.forward_in_place(&mut x, &mut cache).unwrap();
        shard.logits_into(&x, &mut cache, &mut logits).unwrap();
        let id = argmax(&logits);
        ids.push(id);
        all.push(logits.clone());
        input = vec![id];
    }
    (ids, all)
}

#[test]
fn a_batched_step_gives_what_each_request_gives_alone() {
    let path = ensure_default_model(&exo_home(), &mut |_| {}).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let spec = ShardSpec::whole(checkpoint.config().num_layers);
    let shard = LlamaShard::load_with(&checkpoint, &spec, &device, Weights::Stored).unwrap();
    let reference: Vec<_> = PROMPTS.iter().map(|p| alone(&shard, p)).collect();

    let hidden = shard.hidden_size();
    let mut caches: Vec<KvCache> = PROMPTS.iter().map(|_| shard.new_cache()).collect();
    let mut inputs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| p.to_vec()).collect();
    let mut ids = vec![Vec::new(); PROMPTS.len()];
    let mut worst = 0f32;
    let (mut x, mut last_rows, mut logits) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..STEPS {
        let tokens: Vec<u32> = inputs.concat();
        shard.embed_into(&tokens, &mut x).unwrap();
        {
            let mut batch: Vec<(&mut KvCache, usize)> = caches
                .iter_mut()
                .zip(&inputs)
                .map(|(c, i)| (c, i.len()))
                .collect();
            shard.forward_batch(&mut x, &mut batch).unwrap();
        }
        last_rows.clear();
        let mut row = 0;
        for input in &inputs {
            row += input.len();
            last_rows.extend_from_slice(&x[(row - 1) * hidden..row * hidden]);
        }
        shard
            .logits_rows(&last_rows, &mut caches[0], &mut logits)
            .unwrap();
        let vocab = logits.len() / PROMPTS.len();
        for (r, l) in logits.chunks_exact(vocab).enumerate() {
            let want = &reference[r].1[step];
            let diff = l
                .iter()
                .zip(want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            worst = worst.max(diff);
            ids[r].push(argmax(l));
            inputs[r] = vec![argmax(l)];
        }
    }
    eprintln!("largest logit difference, batched vs alone: {worst:e}");
    for (r, (want, _)) in reference.iter().enumerate() {
        assert_eq!(&ids[r], want, "request {r}");
    }
    assert!(worst < 1e-2, "logits moved by {worst} in a batch");
}

#[test]
fn a_cache_cut_from_another_goes_on_as_if_it_had_computed_the_prompt() {
    let path = ensure_default_model(&exo_home(), &mut |_| {}).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let device = BackendKind::Flex.device().unwrap();
    let spec = ShardSpec::whole(checkpoint.config().num_layers);
    let prompt = PROMPTS[2];
    for weights in [Weights::Stored, Weights::F32] {
        let shard = LlamaShard::load_with(&checkpoint, &spec, &device, weights).unwrap();
        let (want, want_logits) = alone(&shard, prompt);
        // A request that went on past its prompt (as the parent has, by the time a choice
        // forks from it) lends its first positions but the last prompt token's.
        let mut parent = shard.new_cache();
        let (mut x, mut logits) = (Vec::new(), Vec::new());
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(&want[..3]);
        shard.embed_into(&ids, &mut x).unwrap();
        shard.forward_in_place(&mut x, &mut parent).unwrap();
        assert!(parent.prefix(ids.len() + 1).is_none());
        let mut cache = parent.prefix(prompt.len() - 1).unwrap();
        assert_eq!(cache.len(), prompt.len() - 1);
        let mut input = vec![prompt[prompt.len() - 1]];
        for (step, want_id) in want.iter().enumerate() {
            shard.embed_into(&input, &mut x).unwrap();
            shard.forward_in_place(&mut x, &mut cache).unwrap();
            shard.logits_into(&x, &mut cache, &mut logits).unwrap();
            let diff = logits
                .iter()
                .zip(&want_logits[step])
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // The stored weights' first step decodes the last prompt token on its own, where
            // the reference computed it in the prompt: 8-bit activations (two planes) against
            // f32 ones on the CPUs where those differ, 1.2e-3 to 1.7e-3 measured.
            let limit = if weights == Weights::F32 { 1e-3 } else { 1e-2 };
            assert!(
                diff < limit,
                "{weights:?} step {step}: logits differ by {diff}"
            );
            assert_eq!(argmax(&logits), *want_id, "{weights:?} step {step}");
            input = vec![*want_id];
        }
    }
}
