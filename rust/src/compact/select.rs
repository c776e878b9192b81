//! Which keys a head keeps. Every rule keeps the first `sink` and the last `recent` keys
//! exact and fills the rest of the budget from the middle.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

/// Query-free baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// StreamingLLM: the sink and the most recent keys, nothing from the middle.
    Streaming,
    /// Evenly spaced middle keys.
    Uniform,
    /// Middle keys drawn at random (seeded).
    Random(u64),
}

/// Sorted indices of the keys a head of `n` keys keeps under `budget` (>= sink + recent).
pub fn baseline(n: usize, budget: usize, sink: usize, recent: usize, rule: Baseline) -> Vec<u32> {
    if budget >= n {
        return (0..n as u32).collect();
    }
    let (lo, hi) = (sink.min(n), n.saturating_sub(recent).max(sink.min(n)));
    let mid = hi - lo;
    let take = budget.saturating_sub(sink + recent).min(mid);
    let mut picked: Vec<usize> = match rule {
        Baseline::Streaming => Vec::new(),
        Baseline::Uniform => (0..take)
            .map(|i| lo + (2 * i + 1) * mid / (2 * take))
            .collect(),
        Baseline::Random(seed) => {
            let mut rng = StdRng::seed_from_u64(seed);
            sample(&mut rng, mid, take)
                .into_iter()
                .map(|i| lo + i)
                .collect()
        }
    };
    picked.extend(0..lo);
    picked.extend(hi..n);
    picked.sort_unstable();
    picked.dedup();
    picked.into_iter().map(|i| i as u32).collect()
}

/// Sorted indices of the `k` largest `scores` (ties: lower index first).
pub fn top_k(scores: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..scores.len() as u32).collect();
    let k = k.min(idx.len());
    if k < idx.len() {
        idx.select_nth_unstable_by(k, |&a, &b| {
            scores[b as usize]
                .total_cmp(&scores[a as usize])
                .then(a.cmp(&b))
        });
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_keep_the_window_and_fill_the_budget() {
        for rule in [Baseline::Uniform, Baseline::Random(7)] {
            let keep = baseline(100, 20, 4, 8, rule);
            assert_eq!(keep.len(), 20, "{rule:?}");
            assert!(keep.windows(2).all(|w| w[0] < w[1]));
            assert!((0..4).all(|i| keep.contains(&i)) && (92..100).all(|i| keep.contains(&i)));
        }
        let s = baseline(100, 20, 4, 8, Baseline::Streaming);
        assert_eq!(
            s,
            [(0..4).collect::<Vec<u32>>(), (92..100).collect()].concat()
        );
        assert_eq!(
            baseline(10, 12, 4, 8, Baseline::Uniform),
            (0..10).collect::<Vec<u32>>()
        );
        assert_eq!(
            baseline(100, 20, 4, 8, Baseline::Random(7)),
            baseline(100, 20, 4, 8, Baseline::Random(7))
        );
        assert_ne!(
            baseline(100, 20, 4, 8, Baseline::Random(7)),
            baseline(100, 20, 4, 8, Baseline::Random(8))
        );
        // Evenly spaced: the 8 middle picks of 88 keys are 11 apart.
        let u = baseline(100, 20, 4, 8, Baseline::Uniform);
        let mid: Vec<u32> = u.into_iter().filter(|&i| (4..92).contains(&i)).collect();
        assert!(mid.windows(2).all(|w| w[1] - w[0] == 11), "{mid:?}");
    }

    #[test]
    fn top_k_picks_the_largest() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 5.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![0, 1]);
    }
}
