//! One compaction of the cache: score every (layer, KV head)'s keys against reference queries,
//! split the key budget across heads, keep the chosen keys, and (Attention Matching) refit
//! their biases and values so the block keeps its mass and output. Baselines share every step
//! but the fit: they keep the original keys and values with bias 0 (honest baselines).
//!
//! Per head the first `sink` and the last `recent` keys stay exact and out of the scoring and
//! the fit; the budget counts them. Where the reference queries come from (a scratch suffix, or
//! the context's own tokens re-run) is the engine's job; this module takes them as tensors.

use candle_core::{DType, Tensor};
use faer::Mat;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

/// Reference queries scored per GEMM (bounds the `[n, chunk]` logits).
const SCORE_CHUNK: usize = 2048;

use crate::cache::KvCache;
pub use crate::compact::fit::Fit;
use crate::compact::fit::{logits_t, Block, Fidelity, FitParams};
use crate::compact::select::{allocate, avg_pool, baseline, top_k, Baseline, Pool, ScoreAcc};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Attention Matching: highest-attention keys, NNLS biases, least-squares values.
    Am,
    /// KVzip: max attention from the context-reconstruction (repeat) queries.
    Kvzip,
    /// H2O: attention accumulated over all of the context's own queries.
    H2o,
    /// SnapKV: mean attention of the last `window` context tokens, average-pooled.
    SnapKv,
    /// TOVA: attention of the last context token, averaged over the layer's heads.
    Tova,
    /// StreamingLLM: sink tokens plus the most recent window that fits the budget.
    Streaming,
    /// Evenly spaced middle keys.
    Uniform,
    /// Random middle keys (seeded).
    Random,
}

impl Method {
    pub const NAMES: [&'static str; 8] = [
        "am",
        "kvzip",
        "h2o",
        "snapkv",
        "tova",
        "streaming",
        "uniform",
        "random",
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "am" => Self::Am,
            "kvzip" => Self::Kvzip,
            "h2o" => Self::H2o,
            "snapkv" => Self::SnapKv,
            "tova" => Self::Tova,
            "streaming" => Self::Streaming,
            "uniform" => Self::Uniform,
            "random" => Self::Random,
            _ => {
                return Err(Error::invalid(format!(
                    "unknown compaction method {s:?}; expected one of {}",
                    Self::NAMES.join(", ")
                )))
            }
        })
    }

    /// Whether the method needs reference queries at all.
    pub fn needs_queries(self) -> bool {
        !matches!(self, Self::Streaming | Self::Uniform | Self::Random)
    }
}

/// Where Attention Matching takes its reference queries from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySource {
    /// A scratch suffix asking to repeat the context, then the context (the paper's default).
    Repeat,
    /// The context's own queries (re-run from the token history).
    Context,
}

impl QuerySource {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "repeat" => Ok(Self::Repeat),
            "context" => Ok(Self::Context),
            _ => Err(Error::invalid(format!(
                "unknown query source {s:?}; expected \"repeat\" or \"context\""
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum HeadBudgets {
    /// One model-wide pool filled by a global top-k over every head's key scores.
    Global,
    /// The same budget in every head.
    Uniform,
    /// Explicit keys per `[layer][kv_head]` (a measured profile).
    PerHead(Vec<Vec<usize>>),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    pub queries: QuerySource,
    /// Average keys kept per compacted head, sink and recent included.
    pub budget: usize,
    pub sink: usize,
    pub recent: usize,
    pub head_budgets: HeadBudgets,
    /// What Attention Matching refits (ablations keep less).
    pub fit: Fit,
    /// How AM pools a key's attention over the reference queries.
    pub pool: Pool,
    pub fit_params: FitParams,
    /// Reference-query rows per KV head; more are subsampled evenly.
    pub max_queries: usize,
    /// Layers to compact (None: all).
    pub layers: Option<Vec<usize>>,
    pub seed: u64,
    /// AM computes layer l's queries with layers 0..l already compacted (repeat queries only).
    pub on_policy: bool,
    /// SnapKV's observation window and pooling kernel.
    pub window: usize,
    pub kernel: usize,
}

impl Options {
    pub fn new(method: Method, budget: usize) -> Self {
        Self {
            method,
            queries: QuerySource::Repeat,
            budget,
            sink: 4,
            recent: 64,
            head_budgets: if matches!(method, Method::Am | Method::Kvzip) {
                HeadBudgets::Global
            } else {
                HeadBudgets::Uniform
            },
            fit: Fit::Values,
            pool: Pool::Rms,
            fit_params: FitParams::default(),
            max_queries: 4096,
            layers: None,
            seed: 0,
            on_policy: true,
            window: 64,
            kernel: 5,
        }
    }

    /// Whether this run fits anything.
    pub fn fits(&self) -> bool {
        self.method == Method::Am && self.fit != Fit::None
    }

    fn pool(&self) -> Pool {
        match self.method {
            Method::Am => self.pool,
            Method::Kvzip => Pool::Max,
            Method::H2o => Pool::Sum,
            _ => Pool::Mean,
        }
    }
}

/// One layer's reference queries `[n_heads, s, d]`. `causal`: they are the queries of the
/// cache's own last `s` tokens, each seeing only the keys up to itself. `extra`: how many of
/// each head's newest rows are the query tokens' own scratch keys (the repeat suffix): they
/// take part in every softmax, as in the real forward pass, but are neither selected nor fitted
/// and stay last.
pub struct LayerQueries<'a> {
    pub q: &'a Tensor,
    pub causal: bool,
    pub extra: usize,
}

/// A head read out of the cache with its scores.
pub struct Scored {
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    /// Newest rows kept as they are and out of the window (see [`LayerQueries::extra`]).
    extra: usize,
    /// `[n, m]` logits of the (subsampled) reference queries, kept for the fit.
    logits: Option<Mat<f32>>,
    /// Keys each of those queries sees (causal sources).
    fit_visible: Option<Vec<usize>>,
    /// Scores of the middle keys `sink..n - recent`.
    pub scores: Vec<f32>,
}

impl Scored {
    fn window(&self, opts: &Options) -> (usize, usize) {
        let n = self.n - self.extra;
        let lo = opts.sink.min(n);
        (lo, n.saturating_sub(opts.recent).max(lo))
    }

    /// Middle keys this head has.
    pub fn middle(&self, opts: &Options) -> usize {
        let (lo, hi) = self.window(opts);
        hi - lo
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Reads every KV head of layer `l` and scores its middle keys. `keep_logits`: hold the
/// logits for a later fit (memory `n x m` floats per head).
pub fn score_layer(
    cache: &KvCache,
    l: usize,
    queries: Option<&LayerQueries>,
    opts: &Options,
    scale: f32,
    keep_logits: bool,
) -> Result<Vec<Scored>> {
    let (n_kv, d) = (cache.n_kv_heads(), cache.head_dim());
    let q_all = queries.map(|lq| f32s(lq.q)).transpose()?;
    let shape = queries.map(|lq| lq.q.dims3()).transpose()?;
    let mut heads = (0..n_kv)
        .into_par_iter()
        .map(|h| -> Result<Scored> {
            let head = cache.head(l, h);
            let n = head.len();
            let (k, v, bias) = (
                f32s(&head.keys()?)?,
                f32s(&head.values()?)?,
                f32s(&head.bias()?)?,
            );
            let extra = queries.map_or(0, |lq| lq.extra);
            let mut s = Scored {
                k,
                v,
                bias,
                n,
                extra,
                logits: None,
                fit_visible: None,
                scores: Vec::new(),
            };
            let (lo, hi) = s.window(opts);
            let (Some(q_all), Some((nh, t, _)), Some(lq)) = (&q_all, shape, queries) else {
                return Ok(s);
            };
            let g = nh / n_kv;
            let rows = g * t;
            let base = h * g * t * d;
            let gather = |picked: &[usize]| -> Vec<f32> {
                picked
                    .iter()
                    .flat_map(|&r| &q_all[base + r * d..base + (r + 1) * d])
                    .copied()
                    .collect()
            };
            // Query token i of the last t sees keys 0..n - (t - 1 - i).
            let visible = |picked: &[usize]| -> Option<Vec<usize>> {
                lq.causal
                    .then(|| picked.iter().map(|&r| n - (t - 1 - r % t).min(n)).collect())
            };
            // The fit uses a seeded random subset of at most `max_queries` of the queries.
            let picked: Vec<usize> = match keep_logits {
                false => Vec::new(),
                true if rows > opts.max_queries => {
                    let mut rng = StdRng::seed_from_u64(opts.seed ^ ((l as u64) << 20) ^ h as u64);
                    let mut p = sample(&mut rng, rows, opts.max_queries).into_vec();
                    p.sort_unstable();
                    p
                }
                true => (0..rows).collect(),
            };
            let mut fit_lt = keep_logits.then(|| Mat::<f32>::zeros(n, picked.len()));
            // Scores use every query (a key may matter to one query only, as in copying), in
            // chunks so the logits stay bounded; the fit's columns are copied out on the way.
            let all_rows: Vec<usize> = (0..rows).collect();
            let mut acc = ScoreAcc::new(n, opts.pool());
            let mut next = 0;
            for chunk in all_rows.chunks(SCORE_CHUNK) {
                let lt = logits_t(&gather(chunk), &s.k, &s.bias, d, scale);
                acc.add(lt.as_ref(), visible(chunk).as_deref());
                if let Some(f) = fit_lt.as_mut() {
                    while next < picked.len() && picked[next] <= chunk[chunk.len() - 1] {
                        let col = lt.col_as_slice(picked[next] - chunk[0]);
                        f.col_as_slice_mut(next).copy_from_slice(col);
                        next += 1;
                    }
                }
            }
            let all = acc.finish();
            s.scores = all[lo..hi].to_vec();
            if opts.method == Method::SnapKv {
                s.scores = avg_pool(&s.scores, opts.kernel);
            }
            s.fit_visible = visible(&picked);
            s.logits = fit_lt;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    // TOVA shares one selection across the layer's heads when they line up token for token.
    if opts.method == Method::Tova && heads.windows(2).all(|w| w[0].n == w[1].n) {
        let len = heads[0].scores.len();
        let mean: Vec<f32> = (0..len)
            .map(|j| heads.iter().map(|s| s.scores[j]).sum::<f32>() / heads.len() as f32)
            .collect();
        heads.iter_mut().for_each(|s| s.scores = mean.clone());
    }
    Ok(heads)
}

/// Per query (column of `lt [n, m]`): the max logit and the total `exp(logit - max)` over the
/// keys it sees.
fn whole_attention(lt: &Mat<f32>, visible: Option<&[usize]>) -> (Vec<f32>, Vec<f64>) {
    let (n, m) = lt.shape();
    let mut buf = vec![0f32; n];
    (0..m)
        .map(|r| {
            let upto = visible.map_or(n, |v| v[r].min(n));
            let p = &mut buf[..upto];
            p.copy_from_slice(&lt.col_as_slice(r)[..upto]);
            crate::compact::exp::exp_from_max(p)
        })
        .unzip()
}

/// Middle keys each head keeps under a uniform budget.
pub fn uniform_counts(heads: &[Scored], opts: &Options) -> Vec<usize> {
    heads
        .iter()
        .map(|s| {
            opts.budget
                .saturating_sub(opts.sink + opts.recent)
                .min(s.middle(opts))
        })
        .collect()
}

/// Global allocation over every compacted head (`scored[l]` empty for skipped layers): the
/// pool is the uniform budget's middle keys summed over heads.
pub fn global_counts(scored: &[Vec<Scored>], opts: &Options) -> Vec<Vec<usize>> {
    let per_head = opts.budget.saturating_sub(opts.sink + opts.recent);
    let flat: Vec<&[f32]> = scored
        .iter()
        .flatten()
        .map(|s| s.scores.as_slice())
        .collect();
    let counts = allocate(&flat, per_head * flat.len());
    let mut it = counts.into_iter();
    scored
        .iter()
        .map(|layer| layer.iter().map(|_| it.next().unwrap_or(0)).collect())
        .collect()
}

/// What compacting one head did.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeadOutcome {
    pub fidelity: Option<Fidelity>,
    pub nnls_converged: bool,
}

/// A head's new rows (keys, values, biases), or why it stays as it is.
type Rewrite = std::result::Result<(Vec<f32>, Vec<f32>, Vec<f32>, HeadOutcome), HeadOutcome>;

/// Keeps `counts[h]` middle keys in each head of layer `l` (plus sink and recent) and refits
/// them when the method fits. Heads whose keys all fit stay untouched.
pub fn apply_layer(
    cache: &mut KvCache,
    l: usize,
    heads: Vec<Scored>,
    counts: &[usize],
    opts: &Options,
) -> Result<Vec<HeadOutcome>> {
    let d = cache.head_dim();
    let results = heads
        .into_par_iter()
        .zip(counts.par_iter().copied())
        .enumerate()
        .map(|(h, (s, count))| -> Result<Rewrite> {
            let (lo, hi) = s.window(opts);
            if count >= hi - lo {
                // Everything fits: the head stays exact (zero error on any queries).
                let exact = s.logits.as_ref().map(|_| Fidelity::default());
                return Ok(Err(HeadOutcome {
                    fidelity: exact,
                    nnls_converged: true,
                }));
            }
            let rule = match opts.method {
                Method::Streaming => Some(Baseline::Streaming),
                Method::Uniform => Some(Baseline::Uniform),
                Method::Random => Some(Baseline::Random(opts.seed ^ ((l as u64) << 32 | h as u64))),
                _ => None,
            };
            let keep: Vec<u32> = match rule {
                Some(r) => baseline(s.n, lo + count + (s.n - hi), lo, s.n - hi, r)
                    .into_iter()
                    .filter(|&i| (lo..hi).contains(&(i as usize)))
                    .map(|i| i - lo as u32)
                    .collect(),
                None => top_k(&s.scores, count),
            };
            let (mid_k, mid_v) = (&s.k[lo * d..hi * d], &s.v[lo * d..hi * d]);
            let mut outcome = HeadOutcome::default();
            let (mut new_v, mut new_b) = (s.v[..lo * d].to_vec(), s.bias[..lo].to_vec());
            let block = match &s.logits {
                Some(lt) if !keep.is_empty() => {
                    let whole = opts
                        .fit_params
                        .weighted
                        .then(|| whole_attention(lt, s.fit_visible.as_deref()));
                    let whole = whole.as_ref().map(|(m, t)| (m.as_slice(), t.as_slice()));
                    Some(Block::in_context(
                        lt.as_ref().subrows(lo, hi - lo),
                        mid_v,
                        d,
                        whole,
                    )?)
                }
                _ => None,
            };
            match &block {
                Some(b) if opts.fits() => {
                    let fit = b.fit(&keep, &s.bias[lo..hi], mid_v, opts.fit, &opts.fit_params)?;
                    outcome = HeadOutcome {
                        fidelity: Some(fit.fidelity),
                        nnls_converged: fit.nnls_converged,
                    };
                    new_v.extend(&fit.values);
                    new_b.extend(&fit.bias);
                }
                _ => {
                    outcome.fidelity = match &block {
                        Some(b) => Some(b.raw_fidelity(&keep, mid_v, d)),
                        // Nothing kept from the block: its whole mass and output are lost.
                        None => s.logits.as_ref().map(|_| Fidelity {
                            mass_rel_err: 1.0,
                            out_rel_err: 1.0,
                        }),
                    };
                    for &j in &keep {
                        let j = j as usize;
                        new_v.extend(&mid_v[j * d..(j + 1) * d]);
                        new_b.push(s.bias[lo + j]);
                    }
                }
            }
            let mut new_k = s.k[..lo * d].to_vec();
            for &j in &keep {
                new_k.extend(&mid_k[j as usize * d..(j as usize + 1) * d]);
            }
            new_k.extend(&s.k[hi * d..]);
            new_v.extend(&s.v[hi * d..]);
            new_b.extend(&s.bias[hi..]);
            Ok(Ok((new_k, new_v, new_b, outcome)))
        })
        .collect::<Result<Vec<_>>>()?;
    let dev = cache.device().clone();
    let dtype = cache.dtype();
    let mut out = Vec::with_capacity(results.len());
    for (h, r) in results.into_iter().enumerate() {
        let (k, v, b, outcome) = match r {
            Ok(x) => x,
            Err(kept) => {
                out.push(kept);
                continue;
            }
        };
        let t = b.len();
        let k = Tensor::from_vec(k, (t, d), &dev)?.to_dtype(dtype)?;
        let v = Tensor::from_vec(v, (t, d), &dev)?.to_dtype(dtype)?;
        let bias = Tensor::from_vec(b, t, &dev)?;
        cache.replace_head(l, h, &k, &v, Some(&bias))?;
        out.push(outcome);
    }
    Ok(out)
}
