//! Key scores taken during the reference queries' own forward pass. The global head budgets
//! need every layer's scores before the first on-policy fit, which used to mean running the
//! repeat prompt through the model and then scoring its queries again: two `queries x keys`
//! products per head. Here the pass's attention is computed on the host with the scoring
//! softmax, so each product serves both (on `qwen3-small` at 2k tokens this removed 0.45 s of
//! the 2.0 s of fits, and the attention itself is no slower than the GEMM path it replaces).

use candle_core::Tensor;
use faer::{Accum, Mat, MatMut, MatRef};
use rayon::prelude::*;

use crate::cache::LayerCache;
use crate::compact::fit::{columns_as_rows, logits_t_into, weighted_values, weighted_values_into};
use crate::compact::pipeline::{f32s, fit_rows, Options};
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
    /// Set by [`ScoringPass::with_fit_targets`]: what the fits' targets need.
    capture: Option<Capture>,
    /// Per layer and KV head: the fit targets taken on the way (None without a capture, or
    /// for a head whose fit scores its keys itself).
    targets: Vec<Vec<Option<MiddleTargets>>>,
}

/// What the off-policy fits need besides each query's statistics: for the rows a head's fit
/// samples, the mass and unnormalised output of its middle keys (`sink..len - recent`). The
/// pass computes every query's output anyway; splitting that product at the middle's edges
/// costs nothing, and the fit then needs the numerators of its kept keys only instead of
/// scoring every key again (on `qwen3-small` at 2k tokens, 8x: 0.91 -> 0.52 s of fits).
struct Capture {
    opts: Options,
    /// Tokens the whole pass runs (the fit's rows are sampled among `group x tokens`).
    tokens: usize,
    /// Per layer: pass tokens already attended.
    done: Vec<usize>,
}

/// One head's middle-key targets, filled chunk by chunk.
pub struct MiddleTargets {
    lo: usize,
    hi: usize,
    /// Per pass row: its slot among the fit's rows, or `u32::MAX`.
    slot: Vec<u32>,
    /// Per fit row (in the order of the fit's sampled rows): the middle keys' share of its
    /// softmax numerators (units of its max over every key it sees) and `[d, m]` their
    /// values weighted by those numerators.
    pub mass: Vec<f64>,
    pub numer: Mat<f32>,
}

impl MiddleTargets {
    /// Middle keys `lo..hi` of the head (the window the fit uses).
    pub fn window(&self) -> (usize, usize) {
        (self.lo, self.hi)
    }
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
            capture: None,
            targets: (0..n_layers)
                .map(|_| (0..n_kv).map(|_| None).collect())
                .collect(),
        }
    }

    /// Also captures what the fits of `opts` need (see [`Capture`]) for a pass of `tokens`
    /// tokens appended after the context.
    pub fn with_fit_targets(mut self, opts: &Options, tokens: usize) -> Self {
        self.capture = Some(Capture {
            opts: opts.clone(),
            tokens,
            done: vec![0; self.accs.len()],
        });
        self
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
        // Pass tokens before this chunk, and in the whole pass.
        let (mut done, mut tokens) = (0, 0);
        if let Some(c) = self.capture.as_mut() {
            (done, tokens) = (c.done[l], c.tokens);
            if done == 0 {
                for (h, head) in layer.heads.iter().enumerate() {
                    self.targets[l][h] = c.start(l, h, head.len() - t, g, d);
                }
            }
            c.done[l] += t;
            if c.done[l] > c.tokens {
                // A longer pass than announced: its rows are not the fit's sample.
                self.targets[l].iter_mut().for_each(|x| *x = None);
            }
        }
        let outs = layer
            .heads
            .par_iter()
            .zip(self.accs[l].par_iter_mut())
            .zip(self.stats[l].par_iter_mut())
            .zip(self.targets[l].par_iter_mut())
            .enumerate()
            .map(|(h, (((head, acc), kept), targets))| -> Result<Vec<f32>> {
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
                let mut flat = match targets {
                    Some(mt) => mt.attend(&v, &e, n, rows, d, |r| (r / t) * tokens + done + r % t),
                    None => weighted_values(&v, &e, n, rows, d),
                };
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

    /// Layer `l`'s fit targets per KV head (see [`ScoringPass::with_fit_targets`]; None for
    /// a head whose fit scores its keys itself).
    pub fn take_targets(&mut self, l: usize) -> Vec<Option<MiddleTargets>> {
        std::mem::take(&mut self.targets[l])
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

impl Capture {
    /// Head `h` of layer `l` with `ctx` keys of width `d` before the pass: its middle and the
    /// fit's rows among the pass's `g x tokens` (the same seeded sample the fit draws).
    fn start(&self, l: usize, h: usize, ctx: usize, g: usize, d: usize) -> Option<MiddleTargets> {
        let o = &self.opts;
        if o.layers.as_ref().is_some_and(|ls| !ls.contains(&l)) {
            return None;
        }
        let lo = o.sink.min(ctx);
        let hi = ctx.saturating_sub(o.recent).max(lo);
        if hi == lo || hi - lo > o.chunk {
            return None;
        }
        let rows = g * self.tokens;
        let picked = fit_rows(o, l, h, rows);
        let mut slot = vec![u32::MAX; rows];
        for (i, &r) in picked.iter().enumerate() {
            slot[r] = i as u32;
        }
        Some(MiddleTargets {
            lo,
            hi,
            slot,
            mass: vec![0.0; picked.len()],
            numer: Mat::zeros(d, picked.len()),
        })
    }
}

impl MiddleTargets {
    /// [`weighted_values`] of a chunk (`e [n, rows]` numerators, `v [n, d]`), the middle
    /// keys' part taken first: for each of the chunk's rows that the fit samples (`global`
    /// maps a chunk row to its pass row) it keeps that part and the middle's numerator sum.
    fn attend(
        &mut self,
        v: &[f32],
        e: &[f32],
        n: usize,
        rows: usize,
        d: usize,
        global: impl Fn(usize) -> usize,
    ) -> Vec<f32> {
        let (lo, hi) = (self.lo, self.hi);
        let em = MatRef::from_column_major_slice(e, n, rows);
        let mut out = Mat::<f32>::zeros(d, rows);
        weighted_values_into(out.as_mut(), v, em, lo..hi, Accum::Replace);
        for r in 0..rows {
            let i = self.slot[global(r)];
            if i != u32::MAX {
                let i = i as usize;
                self.numer
                    .col_as_slice_mut(i)
                    .copy_from_slice(out.col_as_slice(r));
                self.mass[i] = crate::compact::exp::sum(&e[r * n + lo..r * n + hi]);
            }
        }
        weighted_values_into(out.as_mut(), v, em, 0..lo, Accum::Add);
        weighted_values_into(out.as_mut(), v, em, hi..n, Accum::Add);
        columns_as_rows(out.as_ref())
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
