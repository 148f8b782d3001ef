//! Generation in one process: a prompt is prefilled in one forward pass through every stage,
//! then tokens are decoded one at a time until EOS, a stop string or the token limit.

use std::time::{Duration, Instant};

use exo_core::FinishReason;
use exo_model::{Detokenizer, Tokenizer};

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::sampling::{Sampler, SamplingParams};
use crate::shard::LlamaShard;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, already tokenized (with the chat template applied, if any).
    pub prompt_ids: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past EOS tokens (used by parity tests and benchmarks).
    pub ignore_eos: bool,
}

/// Timings and counts of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (including a final EOS).
    pub generated_tokens: usize,
    /// From the start until the first generated token was known (prefill + first sample).
    pub time_to_first_token: Duration,
    /// From the first generated token to the last.
    pub decode_time: Duration,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

impl GenerationStats {
    /// Prompt tokens per second of the prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.time_to_first_token.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first one.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let steps = self.generated_tokens.saturating_sub(1);
        if steps == 0 {
            return 0.0;
        }
        steps as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

/// The result of [`generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids (including a final EOS, excluding nothing else).
    pub ids: Vec<u32>,
    /// Generated text, cut before a stop string, without EOS text.
    pub text: String,
    /// Counts and timings.
    pub stats: GenerationStats,
}

/// Runs `tokens` through every stage in order, returning the last position's logits.
///
/// `stages` must together hold the whole model: the first embeds, the last has the head, and
/// their layer ranges follow each other.
pub fn forward_tokens(
    stages: &[LlamaShard],
    tokens: &[u32],
    caches: &mut [KvCache],
) -> Result<Vec<f32>> {
    let mut step = Step::default();
    step.run(stages, tokens, caches)?;
    Ok(step.logits)
}

/// Host buffers of one step through every stage, reused from step to step so that decoding on
/// the CPU kernels allocates nothing per token.
#[derive(Debug, Default)]
struct Step {
    hidden: Vec<f32>,
    logits: Vec<f32>,
}

impl Step {
    /// [`forward_tokens`] into `self.logits`.
    fn run(&mut self, stages: &[LlamaShard], tokens: &[u32], caches: &mut [KvCache]) -> Result<()> {
        let (first, last) = match (stages.first(), stages.last()) {
            (Some(f), Some(l)) => (f, l),
            _ => return Err(Error::Backend("no stages to run".into())),
        };
        if caches.len() != stages.len() {
            return Err(Error::CacheMismatch {
                expected: stages.len(),
                actual: caches.len(),
            });
        }
        first.embed_into(tokens, &mut self.hidden)?;
        for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
            stage.forward_in_place(&mut self.hidden, cache)?;
        }
        // As many caches as stages, and at least one stage: there is a last cache.
        let cache = caches
            .last_mut()
            .ok_or_else(|| Error::Backend("no stages to run".into()))?;
        last.logits_into(&self.hidden, cache, &mut self.logits)
    }
}

/// Generates text for `request`, calling `on_text` with each new piece as soon as it is final.
pub fn generate(
    stages: &[LlamaShard],
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    request: &GenerateRequest,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    if request.prompt_ids.is_empty() {
        return Err(Error::Shape {
            what: "prompt".into(),
            expected: vec![1],
            actual: vec![0],
        });
    }
    let mut sampler = Sampler::new(request.sampling)?;
    let mut caches: Vec<KvCache> = stages.iter().map(LlamaShard::new_cache).collect();
    // Keys and values for the whole answer, reserved now rather than grown while decoding.
    let positions = request.prompt_ids.len() + request.max_tokens;
    for (stage, cache) in stages.iter().zip(caches.iter_mut()) {
        stage.reserve(cache, positions);
    }
    let mut step = Step::default();
    let mut text = Detokenizer::new(
        tokenizer,
        eos_ids,
        &request.stop,
        request.ignore_eos,
        request.max_tokens,
    );
    let start = Instant::now();
    let mut first_token_at = None;
    let mut ids = Vec::new();
    let mut input = request.prompt_ids.clone();
    let finish = loop {
        if let Some(reason) = text.finished() {
            break reason;
        }
        match step.run(stages, &input, &mut caches) {
            Ok(()) => {}
            // Running out of context ends the answer the way max_tokens does.
            Err(Error::ContextFull { .. }) if !ids.is_empty() => {
                on_text(&text.context_full().text);
                break FinishReason::Length;
            }
            Err(e) => return Err(e),
        };
        let id = sampler.sample(&step.logits)?;
        first_token_at.get_or_insert_with(Instant::now);
        ids.push(id);
        let decoded = text.push(id)?;
        if !decoded.text.is_empty() {
            on_text(&decoded.text);
        }
        input.clear();
        input.push(id);
    };
    let first = first_token_at.unwrap_or_else(Instant::now);
    Ok(Generation {
        text: text.emitted().to_owned(),
        stats: GenerationStats {
            prompt_tokens: request.prompt_ids.len(),
            generated_tokens: ids.len(),
            time_to_first_token: first.duration_since(start),
            decode_time: first.elapsed(),
            finish_reason: finish,
        },
        ids,
    })
}
