//! Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

pub use exo_core::SamplingParams;

/// A sampler with its own random state (one per request).
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler for `params`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params
            .validate()
            .map_err(|e| Error::Sampling(e.to_string()))?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler { params, rng })
    }

    /// Makes the random draws of `tokens` samples without sampling: a request replayed on
    /// another plan continues as if it had never stopped (each sample draws once, greedy
    /// sampling never).
    pub fn skip(&mut self, tokens: u32) {
        if self.params.temperature != 0.0 {
            for _ in 0..tokens {
                let _: f32 = self.rng.random();
            }
        }
    }

    /// Picks a token id from one position's logits.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::Sampling("no logits to sample from".into()));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / self.params.temperature))
            .collect();
        if candidates.is_empty() {
            return Err(Error::Sampling("every logit is NaN or infinite".into()));
        }
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            candidates.truncate(self.params.top_k as usize);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
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
        Ok(candidates[probs.len() - 1].0)
    }
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
