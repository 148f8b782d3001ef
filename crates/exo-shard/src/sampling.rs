//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

pub use exo_core::{Penalties, SamplingParams};

/// Temperatures below this sample greedily. Dividing logits by a smaller temperature overflows
/// (1e-40 turns every logit into an infinity) and leaves nothing to draw between anyway: at
/// 1e-5 a logit gap of 0.001 already weighs e^-100. vLLM draws the same line (`_SAMPLING_EPS`).
pub(crate) const GREEDY_TEMPERATURE: f32 = 1e-5;

/// A sampler with its own random state (one per request).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    penalties: Penalties,
    /// How often each token was generated, while penalties need it.
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params
            .validate()
            .map_err(|e| Error::Sampling(format!("invalid parameters: {e}")))?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            penalties: Penalties::default(),
            counts: HashMap::new(),
        })
    }

    /// Applies OpenAI's penalties and biases from now on; `history` is what was generated
    /// before (a resumed request), counted as if this sampler had sampled it.
    pub fn with_penalties(mut self, penalties: Penalties, history: &[u32]) -> Result<Self> {
        penalties
            .validate()
            .map_err(|e| Error::Sampling(format!("invalid parameters: {e}")))?;
        self.penalties = penalties;
        if self.penalties.uses_history() {
            for &token in history {
                *self.counts.entry(token).or_default() += 1;
            }
        }
        Ok(self)
    }

    /// Adjusts one position's logits by the penalties (tokens generated so far) and the
    /// biases; ids past the logits are ignored. Call before [`Sampler::sample`].
    pub fn penalize(&self, logits: &mut [f32]) {
        for (&token, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= self.penalties.presence + self.penalties.frequency * count as f32;
            }
        }
        for &(token, bias) in &self.penalties.logit_bias {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit += bias;
            }
        }
    }

    /// Counts a token that was chosen, for the penalties.
    fn chose(&mut self, token: u32) -> u32 {
        if self.penalties.uses_history() {
            *self.counts.entry(token).or_default() += 1;
        }
        token
    }

    /// Whether this sampler takes the most likely token (temperature 0, or one below 1e-5) and
    /// so never draws: [`Sampler::sample`] and [`Sampler::skip`] both ask this.
    pub fn is_greedy(&self) -> bool {
        // A NaN temperature (refused by `new`) would be greedy too.
        let t = self.params.temperature;
        t.is_nan() || t < GREEDY_TEMPERATURE
    }

    /// Makes the random draws of `tokens` samples without sampling: a request replayed on
    /// another plan continues as if it had never stopped (each sample draws once, greedy
    /// sampling never).
    pub fn skip(&mut self, tokens: u32) {
        if !self.is_greedy() {
            for _ in 0..tokens {
                let _: f32 = self.rng.random();
            }
        }
    }

    /// Picks a token id from one position's logits.
    ///
    /// NaN logits are an error in every mode ([`Error::NanLogits`]): a model that produces them
    /// has broken down, and whichever token came out would be noise. `-inf` marks a token as
    /// impossible; `+inf` is read as the limit it stands for, all of the probability shared by
    /// the infinite logits (greedy takes the first of them).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let token = self.draw(logits)?;
        Ok(self.chose(token))
    }

    fn draw(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Sampling("no logits to sample from".into()));
        }
        if let Some(first) = logits.iter().position(|l| l.is_nan()) {
            return Err(Error::NanLogits {
                nan: logits.iter().filter(|l| l.is_nan()).count(),
                vocab: logits.len(),
                first,
            });
        }
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            return Err(Error::Sampling(format!(
                "every one of the {} logits is -inf: no token is possible",
                logits.len()
            )));
        }
        if self.is_greedy() {
            return Ok(argmax(logits));
        }
        let t = self.params.temperature;
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| **l > f32::NEG_INFINITY)
            .map(|(i, &l)| (i as u32, l))
            .collect();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k as usize);
        }
        // Weights relative to the largest logit, so none exceeds 1 and the largest is exactly 1:
        // the total is at least 1 and the normalisation never divides by zero or makes NaN.
        let max = candidates[0].1;
        let top = max / t;
        let weight = |l: f32| -> f32 {
            if max == f32::INFINITY {
                if l == f32::INFINITY { 1.0 } else { 0.0 }
            } else if top.is_finite() {
                // The ordinary case, computed as it always was so that seeded runs repeat.
                (l / t - top).exp()
            } else {
                // Huge logits whose quotient overflows: subtract first.
                ((l - max) / t).exp()
            }
        };
        let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| weight(l)).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let r: f32 = self.rng.random();
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if r < cumulative {
                return Ok(candidates[i].0);
            }
        }
        // Rounding left the draw past the last sum: take the last token that had any weight.
        let last = probs.iter().rposition(|p| *p > 0.0).unwrap_or(0);
        Ok(candidates[last].0)
    }
}

/// Log-probabilities from one position's logits: their log-sum-exp (a token's log-probability
/// is its logit minus it) and the `top` likeliest tokens with their log-probabilities, most
/// likely first (ties by id). Non-finite logits count as impossible.
pub fn log_probabilities(logits: &[f32], top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return (f32::INFINITY, Vec::new());
    }
    let sum: f32 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| (l - max).exp())
        .sum();
    let lse = max + sum.ln();
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() || (best.len() == top && l <= best[top - 1].1) {
                continue;
            }
            let at = best.partition_point(|&(_, b)| b >= l);
            best.insert(at, (i as u32, l));
            best.truncate(top);
        }
    }
    for entry in &mut best {
        entry.1 -= lse;
    }
    (lse, best)
}

/// Index of the largest logit (the first one on ties, NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f32) -> Result<Sampler> {
        Sampler::new(SamplingParams {
            temperature,
            seed: 7,
            ..Default::default()
        })
    }

    #[test]
    fn penalties_push_generated_tokens_down_and_biases_move_any() -> Result<()> {
        let penalties = Penalties {
            presence: 0.5,
            frequency: 1.0,
            logit_bias: vec![(3, -100.0), (0, 0.25)],
        };
        // Token 1 came twice before (a resumed request's history), token 2 once.
        let mut s = sampler(0.0)?.with_penalties(penalties.clone(), &[1, 2, 1])?;
        let mut logits = vec![1.0, 4.0, 3.1, 9.0, 0.0];
        s.penalize(&mut logits);
        assert_eq!(
            logits,
            vec![1.25, 4.0 - (0.5 + 2.0), 3.1 - (0.5 + 1.0), -91.0, 0.0]
        );
        // Greedy now picks token 2; picking it counts it.
        assert_eq!(s.sample(&logits)?, 2);
        let mut again = vec![1.0, 4.0, 3.1, 9.0, 0.0];
        s.penalize(&mut again);
        assert_eq!(again[2], 3.1 - (0.5 + 2.0));
        // Out-of-range ids and penalties are refused or ignored, never a panic.
        let mut short = vec![0.0; 2];
        s.penalize(&mut short);
        assert!(
            sampler(0.0)?
                .with_penalties(
                    Penalties {
                        presence: 3.0,
                        ..Penalties::default()
                    },
                    &[]
                )
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn log_probabilities_normalise_and_rank() {
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 2.0, 3.0];
        let (lse, top) = log_probabilities(&logits, 3);
        let total: f32 = logits
            .iter()
            .filter(|l| l.is_finite())
            .map(|l| (l - lse).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 4, 3]);
        assert!((top[0].1 - (3.0 - lse)).abs() < 1e-6);
        assert!(log_probabilities(&logits, 0).1.is_empty());
        assert!(log_probabilities(&[f32::NEG_INFINITY], 2).1.is_empty());
    }

    #[test]
    fn a_tiny_temperature_is_greedy() -> Result<()> {
        // Token 2 is the most likely but not by much: at temperature 1 it would often lose.
        let logits = [2.9, 0.1, 3.0, -1.0, 2.95];
        for t in [
            1e-40,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 4.0, // subnormal
            f32::from_bits(1),       // the smallest subnormal
            1e-30,
            1e-6,
        ] {
            let mut s = sampler(t)?;
            assert!(s.is_greedy(), "temperature {t:e}");
            for _ in 0..20 {
                assert_eq!(s.sample(&logits)?, 2, "temperature {t:e}");
            }
        }
        assert!(!sampler(1e-5)?.is_greedy());
        assert!(!sampler(0.7)?.is_greedy());
        Ok(())
    }

    #[test]
    fn a_greedy_temperature_draws_nothing_and_skip_agrees() -> Result<()> {
        // A greedy sampler's skip leaves the random state alone, like its samples do: a
        // request replayed after some tokens goes on exactly as the original did.
        let logits: Vec<f32> = (0..10).map(|i| (i % 3) as f32).collect();
        let mut a = sampler(1e-40)?;
        let mut b = sampler(1e-40)?;
        for _ in 0..5 {
            a.sample(&logits)?;
        }
        b.skip(5);
        let x: f32 = a.rng.random();
        let y: f32 = b.rng.random();
        assert_eq!(x, y);
        Ok(())
    }

    #[test]
    fn a_small_ordinary_temperature_stays_finite() -> Result<()> {
        // Just above the greedy line, with logits far apart: weights underflow to zero instead
        // of overflowing, and the draw still lands on a possible token.
        let mut s = sampler(1e-5)?;
        for _ in 0..20 {
            assert_eq!(s.sample(&[-3e38, 1.0, 3e38, 0.0])?, 2);
        }
        Ok(())
    }

    #[test]
    fn nan_logits_are_an_error_in_every_mode() -> Result<()> {
        for t in [0.0, 1e-40, 0.8] {
            let mut s = sampler(t)?;
            let all = s.sample(&[f32::NAN; 8]).err().map(|e| e.to_string());
            assert_eq!(
                all.as_deref(),
                Some(
                    "the model produced NaN logits at 8 of 8 vocabulary entries (the first at token 0)"
                ),
                "temperature {t}"
            );
            let one = s.sample(&[1.0, 5.0, f32::NAN, 0.0]);
            assert!(
                matches!(
                    one,
                    Err(Error::NanLogits {
                        nan: 1,
                        vocab: 4,
                        first: 2
                    })
                ),
                "temperature {t}: {one:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn infinite_logits_take_all_the_mass() -> Result<()> {
        for t in [0.0, 1.0] {
            let mut s = sampler(t)?;
            for _ in 0..20 {
                assert_eq!(s.sample(&[1.0, f32::NEG_INFINITY, f32::INFINITY, 3e38])?, 2);
            }
            assert!(
                s.sample(&[f32::NEG_INFINITY; 3]).is_err(),
                "temperature {t}"
            );
        }
        // -inf masks a token out; the rest are drawn as usual.
        let mut s = sampler(1.0)?;
        for _ in 0..50 {
            assert_ne!(s.sample(&[0.0, f32::NEG_INFINITY, 0.0])?, 1);
        }
        Ok(())
    }

    #[test]
    fn greedy_takes_the_largest() -> Result<()> {
        let mut s = Sampler::new(SamplingParams::greedy())?;
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9])?, 1);
        Ok(())
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() -> Result<()> {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(params)?;
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9])?, 1);
        }
        Ok(())
    }

    #[test]
    fn the_same_seed_gives_the_same_choices() -> Result<()> {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = || -> Result<Vec<u32>> {
            let mut s = Sampler::new(params)?;
            (0..30).map(|_| s.sample(&logits)).collect()
        };
        let a = run()?;
        assert_eq!(a, run()?);
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 1);
        // A sampler that skips the draws of the first 12 samples goes on like the first.
        let mut resumed = Sampler::new(params)?;
        resumed.skip(12);
        let rest: Vec<u32> = (12..30)
            .map(|_| resumed.sample(&logits))
            .collect::<Result<_>>()?;
        assert_eq!(rest, a[12..]);
        Ok(())
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() -> Result<()> {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(params)?;
        // Token 0 alone holds ~88% of the mass.
        for _ in 0..50 {
            assert_eq!(s.sample(&[4.0, 2.0, 0.0, 0.0])?, 0);
        }
        Ok(())
    }

    #[test]
    fn bad_parameters_are_refused() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(Sampler::new(bad).is_err());
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(Sampler::new(bad).is_err());
    }
}
