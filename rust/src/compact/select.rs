//! Which keys a head keeps. Every rule keeps the first `sink` and the last `recent` keys
//! exact and fills the rest of the budget from the middle.

use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;

use crate::compact::exp::{softmax_fold, Fold, NOTHING_OUTSIDE};

/// Query-free baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// StreamingLLM: the sink and the most recent keys that fit the budget.
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
        Baseline::Streaming => (hi - take..hi).collect(),
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

/// How a key's attention from many reference queries is pooled into one score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// Root mean square of the softmax weights (Attention Matching's default).
    Rms,
    /// Largest weight any query gives the key (KVzip; AM's `score="max"`).
    Max,
    /// Sum of the weights (H2O's accumulated attention).
    Sum,
    /// Mean of the weights (SnapKV's window, TOVA's last query).
    Mean,
}

/// Per-key scores from transposed logits `[n, m]` (column r: query r over all n keys of the
/// head). Each column is softmaxed over its visible keys; `visible[r]` (causal sources) limits
/// query r to keys `0..visible[r]`.
pub fn key_scores(logits_t: faer::MatRef<f32>, pool: Pool, visible: Option<&[usize]>) -> Vec<f32> {
    let mut acc = ScoreAcc::new(logits_t.nrows(), pool);
    acc.add(logits_t.to_owned().as_mut(), visible, None);
    acc.finish()
}

/// [`key_scores`] accumulated over several blocks of queries.
pub struct ScoreAcc {
    acc: Vec<f64>,
    /// One block's folds in f32 (at most a block of queries each), flushed into `acc`.
    block: Vec<f32>,
    pool: Pool,
    queries: usize,
    /// Sum over queries of each softmax row's entropy (nats), when tracked.
    entropy: Option<f64>,
}

impl ScoreAcc {
    pub fn new(n: usize, pool: Pool) -> Self {
        Self {
            acc: vec![0.0; n],
            block: vec![0.0; n],
            pool,
            queries: 0,
            entropy: None,
        }
    }

    /// Makes room for keys appended since the accumulator was made (a causal pass scores a
    /// head that grows chunk by chunk); new keys start from no attention.
    pub fn grow(&mut self, n: usize) {
        if n > self.acc.len() {
            self.acc.resize(n, 0.0);
            self.block.resize(n, 0.0);
        }
    }

    /// Also accumulate the entropy of every query's attention (for entropy head budgets).
    pub fn with_entropy(mut self) -> Self {
        self.entropy = Some(0.0);
        self
    }

    /// Mean attention entropy per query in nats (0 when not tracked or no queries).
    pub fn mean_entropy(&self) -> f64 {
        self.entropy.unwrap_or(0.0) / self.queries.max(1) as f64
    }

    /// Adds the queries of `logits_t [n, m]`, which it overwrites: column r's first
    /// `visible[r]` rows become `exp(logit - max_r)`. `outside[r]`: query r's
    /// `(max, sum of exp(logit - max))` over keys it sees outside these rows (they share its
    /// softmax but are not scored). Returns each query's softmax statistics
    /// `(max logit, total exp(logit - max))` over every key it sees.
    pub fn add(
        &mut self,
        mut logits_t: faer::MatMut<f32>,
        visible: Option<&[usize]>,
        outside: Option<&[(f32, f64)]>,
    ) -> Vec<(f32, f64)> {
        let (n, m) = logits_t.shape();
        let fold = match self.pool {
            Pool::Rms => Fold::Squares,
            Pool::Max => Fold::Max,
            Pool::Sum | Pool::Mean => Fold::Sum,
        };
        let mut stats = Vec::with_capacity(m);
        let mut col = Vec::new();
        for r in 0..m {
            let upto = visible.map_or(n, |v| v[r].min(n));
            let x: &mut [f32] = match logits_t.as_mut().col_mut(r).try_as_col_major_mut() {
                Some(c) => &mut c.as_slice_mut()[..upto],
                None => {
                    col.clear();
                    col.extend((0..upto).map(|j| logits_t[(j, r)]));
                    &mut col
                }
            };
            let raw = self.entropy.is_some().then(|| x.to_vec());
            let outside = outside.map_or(NOTHING_OUTSIDE, |o| o[r]);
            let (max, sum) = softmax_fold(x, &mut self.block, fold, outside);
            if let (Some(h), Some(raw)) = (self.entropy.as_mut(), raw) {
                // H = ln S - sum_i p_i (l_i - max) with p_i = e_i / S and e_i = exp(l_i - max).
                let dot: f64 = x
                    .iter()
                    .zip(&raw)
                    .map(|(&e, &l)| e as f64 * (l - max) as f64)
                    .sum();
                *h += sum.ln() - dot / sum;
            }
            stats.push((max, sum));
        }
        // f32 sums of one block of queries are exact enough; the running total is f64.
        for (a, b) in self.acc.iter_mut().zip(self.block.iter_mut()) {
            match fold {
                Fold::Max => *a = a.max(*b as f64),
                Fold::Squares | Fold::Sum => *a += *b as f64,
            }
            *b = 0.0;
        }
        self.queries += m;
        stats
    }

    pub fn finish(self) -> Vec<f32> {
        let m = self.queries.max(1) as f64;
        let pool = self.pool;
        self.acc
            .into_iter()
            .map(|a| match pool {
                Pool::Rms => (a / m).sqrt() as f32,
                Pool::Mean => (a / m) as f32,
                Pool::Max | Pool::Sum => a as f32,
            })
            .collect()
    }
}

/// Centred moving average of width `kernel` (SnapKV's pooling: keeps neighbours of a strong
/// key together); the window shrinks at the edges.
pub fn avg_pool(scores: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..scores.len())
        .map(|i| {
            let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(scores.len()));
            scores[lo..hi].iter().sum::<f32>() / (hi - lo) as f32
        })
        .collect()
}

/// Splits a pool of `total` keys across heads by one global top-k over every head's scores:
/// head `i` gets as many keys as it has among the `total` best. Returns counts per head.
/// With a `floor`, every head is first given its own `floor` best keys (or all it has; a
/// floor above an even split of the pool is lowered to it) and the rest of the pool goes by
/// the global top-k over the keys not yet given. Each head's count is still its top keys by
/// score, so the selection stays a per-head top-k.
pub fn allocate(scores: &[&[f32]], total: usize, floor: usize) -> Vec<usize> {
    let floor = floor.min(total / scores.len().max(1));
    let mut counts: Vec<usize> = scores.iter().map(|s| floor.min(s.len())).collect();
    let given: usize = counts.iter().sum();
    let mut all: Vec<(f32, u32)> = Vec::new();
    for (h, (s, &given)) in scores.iter().zip(&counts).enumerate() {
        let tag = |&x: &f32| (x, h as u32);
        if given == 0 {
            all.extend(s.iter().map(tag));
        } else if given < s.len() {
            // The head's keys beyond its own `given` best.
            let mut rest = s.to_vec();
            rest.select_nth_unstable_by(given - 1, |a, b| b.total_cmp(a));
            all.extend(rest[given..].iter().map(tag));
        }
    }
    let left = (total - given).min(all.len());
    if left == 0 {
        return counts;
    }
    if left < all.len() {
        all.select_nth_unstable_by(left - 1, |a, b| b.0.total_cmp(&a.0));
    }
    for &(_, h) in &all[..left] {
        counts[h as usize] += 1;
    }
    counts
}

/// Splits `total` keys across heads in proportion to `weights`, no head above its `caps`
/// (water-filling: what a capped head cannot take goes to the others), rounded by largest
/// remainder so the counts sum to `min(total, sum(caps))`.
pub fn proportional(weights: &[f64], caps: &[usize], total: usize) -> Vec<usize> {
    let n = weights.len();
    let total = total.min(caps.iter().sum());
    let mut share = vec![0f64; n];
    let mut capped = vec![false; n];
    let mut left = total as f64;
    loop {
        let free: f64 = (0..n)
            .filter(|&i| !capped[i])
            .map(|i| weights[i].max(0.0))
            .sum();
        let open: Vec<usize> = (0..n).filter(|&i| !capped[i]).collect();
        let mut changed = false;
        for &i in &open {
            share[i] = match free > 0.0 {
                true => left * weights[i].max(0.0) / free,
                false => left / open.len() as f64,
            };
            if share[i] >= caps[i] as f64 {
                share[i] = caps[i] as f64;
                capped[i] = true;
                left -= share[i];
                changed = true;
            }
        }
        if !changed || capped.iter().all(|&c| c) {
            break;
        }
    }
    let mut counts: Vec<usize> = share.iter().map(|&x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (share[b] - share[b].floor()).total_cmp(&(share[a] - share[a].floor())));
    let mut missing = total - counts.iter().sum::<usize>();
    for &i in order.iter().cycle().take(2 * n) {
        if missing == 0 {
            break;
        }
        if counts[i] < caps[i] {
            counts[i] += 1;
            missing -= 1;
        }
    }
    counts
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
            [(0..4).collect::<Vec<u32>>(), (84..100).collect()].concat()
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
    fn scores_pool_softmax_weights() {
        // Two queries over three keys; the second sees only the first two keys (causal).
        let lt = faer::Mat::<f32>::from_fn(3, 2, |j, r| [[0.0, 0.0], [1.0, 0.0], [2.0, 5.0]][j][r]);
        let e = |x: f64| x.exp();
        let p0 = [
            1.0 / (1.0 + e(1.0) + e(2.0)),
            e(1.0) / (1.0 + e(1.0) + e(2.0)),
            e(2.0) / (1.0 + e(1.0) + e(2.0)),
        ];
        let sum = key_scores(lt.as_ref(), Pool::Sum, Some(&[3, 2]));
        let want = [p0[0] + 0.5, p0[1] + 0.5, p0[2]];
        assert!(
            sum.iter()
                .zip(want)
                .all(|(a, b)| (*a as f64 - b).abs() < 1e-6),
            "{sum:?}"
        );
        let max = key_scores(lt.as_ref(), Pool::Max, None);
        assert!(
            (max[2] as f64 - 1.0 / (1.0 + 2.0 * e(-5.0))).abs() < 1e-6,
            "{max:?}"
        );
        let rms = key_scores(lt.as_ref(), Pool::Rms, Some(&[3, 2]));
        assert!((rms[1] as f64 - ((p0[1].powi(2) + 0.25) / 2.0).sqrt()).abs() < 1e-6);
        assert_eq!(
            avg_pool(&[3.0, 0.0, 0.0, 0.0, 6.0], 3),
            vec![1.5, 1.0, 0.0, 2.0, 3.0]
        );
    }

    #[test]
    fn allocation_follows_the_global_top_k() {
        let a = [0.9f32, 0.8, 0.1];
        let b = [0.5f32, 0.05];
        let c = [0.01f32];
        assert_eq!(allocate(&[&a, &b, &c], 3, 0), vec![2, 1, 0]);
        assert_eq!(allocate(&[&a, &b, &c], 10, 0), vec![3, 2, 1]);
        assert_eq!(allocate(&[&a, &b, &c], 0, 0), vec![0, 0, 0]);
        // A floor of one key each: head c gets its best key, the rest of the pool follows
        // the global order; a floor above an even split is lowered to it.
        assert_eq!(allocate(&[&a, &b, &c], 3, 1), vec![1, 1, 1]);
        assert_eq!(allocate(&[&a, &b, &c], 4, 1), vec![2, 1, 1]);
        assert_eq!(allocate(&[&a, &b, &c], 2, 1), vec![2, 0, 0]);
        assert_eq!(allocate(&[&a, &b, &c], 6, 5), vec![3, 2, 1]);
    }

    #[test]
    fn top_k_picks_the_largest() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 5.0, -1.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 2.0], 5), vec![0, 1]);
    }

    #[test]
    fn proportional_split_respects_caps_and_the_total() {
        let c = proportional(&[1.0, 1.0, 2.0], &[100, 100, 100], 40);
        assert_eq!(c, vec![10, 10, 20]);
        // The capped head's excess goes to the others in proportion.
        let c = proportional(&[1.0, 1.0, 8.0], &[100, 100, 10], 40);
        assert_eq!(c, vec![15, 15, 10]);
        let c = proportional(&[0.3, 0.3, 0.3], &[5, 5, 5], 7);
        assert_eq!(c.iter().sum::<usize>(), 7);
        assert!(c.iter().all(|&x| (2..=3).contains(&x)));
        assert_eq!(proportional(&[1.0, 2.0], &[3, 4], 100), vec![3, 4]);
    }

    #[test]
    fn entropy_is_zero_for_a_peaked_row_and_ln_n_for_a_flat_one() {
        let (n, m) = (8, 2);
        let mut lt = faer::Mat::<f32>::zeros(n, m);
        lt[(3, 0)] = 80.0; // query 0 looks at key 3 only; query 1 is uniform
        let mut acc = ScoreAcc::new(n, Pool::Max).with_entropy();
        acc.add(lt.as_mut(), None, None);
        let want = (0.0 + (n as f64).ln()) / 2.0;
        assert!(
            (acc.mean_entropy() - want).abs() < 1e-5,
            "{}",
            acc.mean_entropy()
        );
    }
}
