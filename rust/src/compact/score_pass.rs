//! Key scores taken during the reference queries' own forward pass. The global head budgets
//! need every layer's scores before the first on-policy fit, which used to mean running the
//! repeat prompt through the model and then scoring its queries again: two `queries x keys`
//! products per head. Here the pass's attention is computed on the host with the scoring
//! softmax, so each product serves both (on `qwen3-small` at 2k tokens this removed 0.45 s of
//! the 2.0 s of fits, and the attention itself is no slower than the GEMM path it replaces).

use candle_core::Tensor;
use faer::MatMut;
use rayon::prelude::*;

use crate::cache::LayerCache;
use crate::compact::fit::{logits_t_into, weighted_values};
use crate::compact::pipeline::f32s;
use crate::compact::select::{Pool, ScoreAcc};
use crate::error::Result;

/// Per-key score accumulators of every (layer, KV head), filled by [`ScoringPass::attend`].
pub struct ScoringPass {
    accs: Vec<Vec<ScoreAcc>>,
    /// Per (layer, KV head), per chunk: each query row's softmax `(max, total)` over the keys
    /// it saw (rows `[g, t]` of the chunk), so an off-policy fit need not score them again.
    stats: Vec<Vec<Vec<QueryStats>>>,
    /// Query heads per KV head (the row blocks of each chunk's statistics).
    group: usize,
    scale: f32,
}

/// One chunk's `(max logit, total exp(logit - max))` per query row, `g` heads of `t` tokens.
pub type QueryStats = Vec<(f32, f64)>;

impl ScoringPass {
    pub fn new(n_layers: usize, n_kv: usize, pool: Pool, entropy: bool, scale: f32) -> Self {
        let acc = || {
            let a = ScoreAcc::new(0, pool);
            if entropy {
                a.with_entropy()
            } else {
                a
            }
        };
        Self {
            accs: (0..n_layers)
                .map(|_| (0..n_kv).map(|_| acc()).collect())
                .collect(),
            stats: vec![vec![Vec::new(); n_kv]; n_layers],
            group: 1,
            scale,
        }
    }

    /// Attention of the chunk's queries `q [n_heads, t, d]` over layer `l` (their own keys
    /// are the last `t` rows of every head, causal among themselves), in f32 on the host,
    /// with every softmax row folded into that head's scores. Returns `[n_heads, t, d]` in
    /// `q`'s dtype and device.
    pub fn attend(&mut self, l: usize, q: &Tensor, layer: &LayerCache) -> Result<Tensor> {
        let (nh, t, d) = q.dims3()?;
        let n_kv = layer.heads.len();
        let g = nh / n_kv;
        self.group = g;
        let qf = f32s(q)?;
        let scale = self.scale;
        let outs = layer
            .heads
            .par_iter()
            .zip(self.accs[l].par_iter_mut())
            .zip(self.stats[l].par_iter_mut())
            .enumerate()
            .map(|(h, ((head, acc), kept))| -> Result<Vec<f32>> {
                let n = head.len();
                let (k, v, bias) = (
                    f32s(&head.keys()?)?,
                    f32s(&head.values()?)?,
                    f32s(&head.bias()?)?,
                );
                acc.grow(n);
                let rows = g * t;
                let mut e = Vec::new();
                logits_t_into(
                    &mut e,
                    &qf[h * rows * d..(h + 1) * rows * d],
                    &k,
                    &bias,
                    d,
                    scale,
                );
                // Query row r is token r % t of the chunk: it sees keys 0..n - t + r % t + 1.
                let visible: Vec<usize> = (0..rows).map(|r| n - t + r % t + 1).collect();
                let stats = acc.add(
                    MatMut::from_column_major_slice_mut(&mut e, n, rows),
                    Some(&visible),
                    None,
                );
                for (col, &vis) in e.chunks_exact_mut(n).zip(&visible) {
                    col[vis..].fill(0.0);
                }
                // Rows of `[g * t, d]` in order, each normalised by its softmax sum.
                let mut flat = weighted_values(&v, &e, n, rows, d);
                for (row, &(_, sum)) in flat.chunks_exact_mut(d).zip(&stats) {
                    let inv = (1.0 / sum) as f32;
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                kept.push(stats);
                Ok(flat)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::from_vec(outs.concat(), (nh, t, d), q.device())?;
        Ok(out.to_dtype(q.dtype())?)
    }

    /// Layer `l`'s query statistics per KV head, rows in [`score_layer`]'s order (query head
    /// by query head, each over every token of the pass).
    ///
    /// [`score_layer`]: crate::compact::pipeline::score_layer
    pub fn take_stats(&mut self, l: usize) -> Vec<Vec<(f32, f64)>> {
        let g = self.group;
        std::mem::take(&mut self.stats[l])
            .into_iter()
            .map(|chunks| {
                (0..g)
                    .flat_map(|qh| {
                        chunks.iter().flat_map(move |c| {
                            let t = c.len() / g;
                            c[qh * t..(qh + 1) * t].iter().copied()
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Layer `l`'s scores: per KV head, the score of every key it had when last scored
    /// (context plus the pass's own tokens), and the mean attention entropy of the queries.
    pub fn finish_layer(&mut self, l: usize) -> Vec<(Vec<f32>, f64)> {
        std::mem::take(&mut self.accs[l])
            .into_iter()
            .map(|acc| {
                let entropy = acc.mean_entropy();
                (acc.finish(), entropy)
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::attention::attend_reference;
    use crate::cache::KvCache;
    use crate::compact::fit::logits_t;
    use crate::compact::select::key_scores;
    use candle_core::{DType, Device};

    /// One layer of random heads of `lens` keys each, with random biases (as after a
    /// compaction).
    pub(crate) fn ragged_cache(lens: &[usize], d: usize) -> Result<KvCache> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, lens.len(), d, DType::F32, &dev)?;
        for (h, &n) in lens.iter().enumerate() {
            let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            cache.replace_head(0, h, &k, &v, Some(&b))?;
        }
        Ok(cache)
    }

    /// Appends `t` random keys and values to every head of layer 0 of `c` and returns random
    /// queries `[n_kv * g, t, d]` for them (a chunk of a reference pass).
    pub(crate) fn random_chunk(c: &mut KvCache, g: usize, t: usize, d: usize) -> Result<Tensor> {
        let (dev, n_kv) = (Device::Cpu, c.n_kv_heads());
        let k = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
        c.append(0, &k, &v)?;
        Ok(Tensor::randn(0f32, 1.0, (n_kv * g, t, d), &dev)?)
    }

    /// Two chunks of queries over a ragged, biased layer (as after a compaction): the pass's
    /// attention equals the plain reference, and its scores equal the scores of every query
    /// taken at once over the final keys with the causal visibility of each.
    #[test]
    fn attention_and_scores_match_the_one_shot_reference() -> Result<()> {
        let (n_kv, g, d, scale) = (2, 3, 8, 0.35f32);
        let cache = ragged_cache(&[9, 14], d)?;
        for pool in [Pool::Rms, Pool::Max] {
            let mut c = cache.clone();
            let mut pass = ScoringPass::new(1, n_kv, pool, true, scale);
            let mut qs = Vec::new();
            for t in [5usize, 3] {
                let q = random_chunk(&mut c, g, t, d)?;
                let got = pass.attend(0, &q, &c.layers[0])?;
                let want = attend_reference(&q, &c.layers[0], scale as f64)?;
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-5, "{pool:?} t={t}: max abs error {err}");
                qs.push(q);
            }
            let q = Tensor::cat(&qs, 1)?; // [n_heads, 8, d]
            let scores = pass.finish_layer(0);
            for (h, (got, entropy)) in scores.into_iter().enumerate() {
                let head = c.head(0, h);
                let n = head.len();
                assert_eq!(got.len(), n);
                let rows = q.narrow(0, h * g, g)?.reshape((g * 8, d))?;
                let f = |t: &Tensor| -> Result<Vec<f32>> { f32s(t) };
                let lt = logits_t(&f(&rows)?, &f(&head.keys()?)?, &f(&head.bias()?)?, d, scale);
                let visible: Vec<usize> = (0..g * 8).map(|r| n - 8 + r % 8 + 1).collect();
                let want = key_scores(lt.as_ref(), pool, Some(&visible));
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() < 1e-5 * b.max(1e-3),
                        "{pool:?} head {h}: {a} vs {b}"
                    );
                }
                assert!(entropy > 0.0 && entropy < (n as f64).ln());
            }
        }
        Ok(())
    }
}
