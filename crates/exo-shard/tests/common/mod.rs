//! What several of `exo-shard`'s test files share.

#![allow(dead_code)]

use exo_model::Checkpoint;
use exo_shard::{GenerateRequest, Generation, LlamaShard, SamplingParams, generate};

/// The indices of the five largest logits, largest first.
pub fn top5(logits: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.truncate(5);
    order
}

/// 32 greedy tokens after `prompt` (end of sequence ignored) through `stages`, with the
/// checkpoint's tokenizer and end tokens.
pub fn greedy_32(checkpoint: &Checkpoint, stages: &[LlamaShard], prompt: Vec<u32>) -> Generation {
    let request = GenerateRequest {
        prompt_ids: prompt,
        max_tokens: 32,
        sampling: SamplingParams::greedy(),
        stop: vec![],
        ignore_eos: true,
    };
    let tokenizer = checkpoint.tokenizer().unwrap();
    generate(
        stages,
        &tokenizer,
        &checkpoint.config().eos_token_ids,
        &request,
        &mut |_| {},
    )
    .unwrap()
}
