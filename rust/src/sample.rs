//! Next-token sampling from f32 logits, in the order transformers applies its processors:
//! repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1), got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: Option<u64>) -> Result<Self> {
        params.validate()?;
        let rng = match seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Ok(Self { params, rng })
    }

    /// Whether every pick is the argmax of the logits as given (temperature 0, no penalty).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// Picks the next token. `history` is every token id in context (for the repetition penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if self.is_greedy() {
            return argmax(logits);
        }
        let mut logits = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[id as usize];
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, best first.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = logits[idx[0] as usize];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) / p.temperature).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (at least one token).
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, &x) in probs.iter().enumerate() {
                acc += x;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        if p.min_p > 0.0 {
            let cut = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&x| x >= cut).count().max(1);
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            r -= x;
            if r <= 0.0 {
                return idx[i];
            }
        }
        idx[probs.len() - 1]
    }
}

/// Index of the largest logit; the first one on ties (like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_and_penalty() {
        let mut s = Sampler::new(params(0.0), Some(0)).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..params(0.0)
            },
            Some(0),
        )
        .unwrap();
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut s = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            Some(3),
        )
        .unwrap();
        assert_eq!(s.sample(&logits, &[]), argmax(&logits));
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0), Some(seed)).unwrap();
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_p_and_min_p_restrict_support() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 keeps only the first.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.5,
                ..params(1.0)
            },
            Some(1),
        )
        .unwrap();
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 0));
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.3,
                ..params(1.0)
            },
            Some(1),
        )
        .unwrap();
        assert!((0..200).all(|_| s.sample(&logits, &[]) <= 1));
    }

    #[test]
    fn rejects_bad_params() {
        assert!(Sampler::new(
            SamplingParams {
                top_p: 0.0,
                ..params(1.0)
            },
            None
        )
        .is_err());
        assert!(Sampler::new(params(-1.0), None).is_err());
    }
}
