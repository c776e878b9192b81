//! One compaction of the cache: score every (layer, KV head)'s keys against reference queries,
//! split the key budget across heads, keep the chosen keys, and (Attention Matching) refit
//! their biases and values so the block keeps its mass and output. Baselines share every step
//! but the fit: they keep the original keys and values with bias 0 (honest baselines).
//!
//! Per head the first `sink` and the last `recent` keys stay exact and out of the scoring and
//! the fit; the budget counts them. Where the reference queries come from (a scratch suffix, or
//! the context's own tokens re-run) is the engine's job; this module takes them as tensors.

use candle_core::{DType, Tensor};
use faer::MatMut;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::SeedableRng;
use rayon::prelude::*;

/// Reference queries scored per GEMM (bounds the `[n, chunk]` logits). Small enough that a
/// chunk of the repeat suffix's position-ordered queries skips the suffix keys it cannot see.
const SCORE_CHUNK: usize = 512;

use crate::cache::KvCache;
use crate::compact::exp::exp_shifted;
pub use crate::compact::fit::Fit;
use crate::compact::fit::{
    logits_t_into, numerators, rescale_to_block_max, Block, Fidelity, FitParams, HeadFit,
    DEFAULT_RIDGE, VALUES_RIDGE,
};
use crate::compact::score_pass::MiddleTargets;
use crate::compact::select::{
    allocate, avg_pool, baseline, proportional, top_k, Baseline, Pool, ScoreAcc,
};
use crate::compact::tail_check::TailReference;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Attention Matching: highest-attention keys, NNLS biases, least-squares values.
    Am,
    /// Attention Matching with keys chosen by orthogonal matching pursuit on the mass.
    AmOmp,
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
    pub const NAMES: [&'static str; 9] = [
        "am",
        "am-omp",
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
            "am-omp" => Self::AmOmp,
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

    /// Attention Matching (either selection): the methods that fit and run on-policy.
    pub fn is_am(self) -> bool {
        matches!(self, Self::Am | Self::AmOmp)
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
    /// One model-wide pool split in proportion to each head's mean attention entropy over
    /// the reference queries (heads that spread their attention keep more).
    Entropy,
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
    /// Task-guided selection shared by a layer's heads (the Latent Briefing variant): keys
    /// whose head-averaged score exceeds median + `tau` * MAD, at most the budget (None:
    /// every head selects on its own).
    pub shared_mad: Option<f64>,
    /// Keys per fit chunk of a head's middle (bounds the fit's memory on long contexts).
    pub chunk: usize,
    /// Global budgets: the share of the average middle budget every head keeps before the
    /// rest of the pool is split by score (0: none; global budgets can leave a head nearly
    /// empty, and its output error then exceeds that of an even split).
    pub head_floor: f64,
    /// The context's last tokens (at most `recent`) whose own queries check each head's fit:
    /// where the fit with biases gives them a larger attention error than the values-only fit
    /// with ridge [`VALUES_RIDGE`], the head takes the latter (0: no check).
    pub tail_check: usize,
}

impl Options {
    pub fn new(method: Method, budget: usize) -> Self {
        Self {
            method,
            queries: QuerySource::Repeat,
            budget,
            sink: 4,
            recent: 64,
            head_budgets: if method.is_am() || method == Method::Kvzip {
                HeadBudgets::Global
            } else {
                HeadBudgets::Uniform
            },
            // `Session.compact`'s defaults (docs/compaction.md), but the biases at every ratio:
            // its `fit="auto"` (values only outside 4-16x) is resolved in Python.
            fit: Fit::Am,
            pool: Pool::Max,
            fit_params: FitParams {
                ridge: Some(DEFAULT_RIDGE),
                ..FitParams::default()
            },
            max_queries: 4096,
            layers: None,
            seed: 0,
            on_policy: false,
            window: 64,
            kernel: 5,
            shared_mad: None,
            chunk: 4096,
            head_floor: 0.0,
            tail_check: 0,
        }
    }

    /// Whether this run fits anything.
    pub fn fits(&self) -> bool {
        self.method.is_am() && self.fit != Fit::None
    }

    /// Whether a head's fit can take its mass and targets from the scoring pass
    /// ([`MiddleTargets`]) instead of scoring every key: the weighted fit only (the pass's
    /// numerators are in the units of each query's whole softmax), and not OMP (it needs every
    /// key's numerators).
    pub fn fits_from_pass_targets(&self) -> bool {
        self.fit_params.weighted && self.method != Method::AmOmp
    }

    /// Whether this run checks each head's biases on the context's last queries
    /// ([`Options::tail_check`]): only fits with biases have something to check.
    pub fn checks_tail(&self) -> bool {
        self.tail_check > 0 && self.method.is_am() && matches!(self.fit, Fit::Am | Fit::Beta)
    }

    pub fn pool(&self) -> Pool {
        match self.method {
            Method::Am | Method::AmOmp => self.pool,
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
/// and stay last. `outside`: per KV head and query row, the `(max, sum)` of the query's
/// softmax over those scratch keys, computed elsewhere (the on-policy pass's split attention):
/// then only the keys before them are scored.
pub struct LayerQueries<'a> {
    pub q: &'a Tensor,
    pub causal: bool,
    pub extra: usize,
    pub outside: Option<&'a [Vec<(f32, f64)>]>,
}

/// A head read out of the cache with its scores.
pub struct Scored {
    k: Vec<f32>,
    v: Vec<f32>,
    bias: Vec<f32>,
    n: usize,
    /// Newest rows kept as they are and out of the window (see [`LayerQueries::extra`]).
    extra: usize,
    /// The (subsampled) reference queries of the fit, `[m, d]` row-major.
    fit_q: Option<Vec<f32>>,
    /// Their attention numerators over the middle keys `[hi - lo, m]` (column-major, each
    /// query's `exp(logit - max)` with the max over every key it sees), kept from scoring when
    /// the middle is one fit chunk (longer heads recompute logits chunk by chunk, so memory
    /// stays `chunk x m` per head).
    fit_e: Option<Vec<f32>>,
    /// The middle keys' mass and output per fit query, from the scoring pass: then the fit
    /// scores only the keys it keeps (`fit_e` stays None).
    fit_targets: Option<MiddleTargets>,
    /// Per fit query: the max logit and total `exp(logit - max)` over every key it sees.
    whole: Option<(Vec<f32>, Vec<f64>)>,
    /// Scores of the middle keys `sink..n - recent`.
    pub scores: Vec<f32>,
    /// Mean attention entropy of the reference queries (entropy budgets only).
    pub entropy: f64,
    /// With the tail check ([`Options::tail_check`]): the queries `[group x tokens, d]` of the
    /// context's last `tokens` tokens (the group's query heads, head-major) and `tokens`.
    pub tail_q: Option<(Vec<f32>, usize)>,
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

pub(crate) fn f32s(t: &Tensor) -> Result<Vec<f32>> {
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
            let extra = queries.map_or(0, |lq| lq.extra);
            let mut s = read_head(cache, l, h, extra)?;
            let n = s.n;
            let (lo, hi) = s.window(opts);
            let (Some(q_all), Some((nh, t, _)), Some(lq)) = (&q_all, shape, queries) else {
                return Ok(s);
            };
            let g = nh / n_kv;
            let rows = g * t;
            let gather = |picked: &[usize]| gather_rows(q_all, h * rows, picked, d);
            // Query token i of the last t sees keys 0..n - (t - 1 - i).
            let visible = |picked: &[usize]| -> Option<Vec<usize>> {
                lq.causal
                    .then(|| picked.iter().map(|&r| n - (t - 1 - r % t).min(n)).collect())
            };
            let picked = match keep_logits {
                false => Vec::new(),
                true => fit_rows(opts, l, h, rows),
            };
            // The fit's attention numerators over the middle keys, one column per picked query.
            let mut fit_e = (keep_logits && hi - lo <= opts.chunk)
                .then(|| Vec::with_capacity((hi - lo) * picked.len()));
            let (mut maxes, mut totals) = (Vec::new(), Vec::new());
            // Scores use every query (a key may matter to one query only, as in copying), in
            // chunks so the logits stay bounded; the fit's columns are copied out on the way.
            let all_rows: Vec<usize> = (0..rows).collect();
            let mut acc = ScoreAcc::new(n, opts.pool());
            if opts.head_budgets == HeadBudgets::Entropy {
                acc = acc.with_entropy();
            }
            let mut next = 0;
            let mut lt = Vec::new();
            for chunk in all_rows.chunks(SCORE_CHUNK) {
                // Suffix queries see the scratch keys only up to themselves: logits of the keys
                // no query of the chunk sees are never computed (the fit's block is the
                // context, which every suffix query sees).
                let outside = lq.outside.map(|o| &o[h][chunk[0]..chunk[0] + chunk.len()]);
                let seen = match outside {
                    Some(_) => None,
                    None => visible(chunk),
                };
                let upto = match (&seen, lq.extra > 0, outside) {
                    // Only the context: every suffix query sees all of it.
                    (_, _, Some(_)) => n - lq.extra,
                    (Some(v), true, _) => v.iter().copied().max().unwrap_or(n).min(n),
                    _ => n,
                };
                let qc = gather(chunk);
                logits_t_into(&mut lt, &qc, &s.k[..upto * d], &s.bias[..upto], d, scale);
                let lt_mut = MatMut::from_column_major_slice_mut(&mut lt, upto, chunk.len());
                let stats = acc.add(lt_mut, seen.as_deref(), outside);
                // The fit reuses the softmax numerators and statistics of its queries.
                while next < picked.len() && picked[next] <= chunk[chunk.len() - 1] {
                    let c = picked[next] - chunk[0];
                    let (max, total) = stats[c];
                    if let Some(f) = fit_e.as_mut() {
                        let start = f.len();
                        f.extend_from_slice(&lt[c * upto + lo..c * upto + hi]);
                        // Keys past those the query saw are still logits: the fit scores them
                        // too (no causal mask), in the same units.
                        let vis = seen.as_ref().map_or(upto, |v| v[c]).clamp(lo, hi);
                        exp_shifted(&mut f[start + vis - lo..], max);
                    }
                    maxes.push(max);
                    totals.push(total);
                    next += 1;
                }
            }
            s.entropy = acc.mean_entropy();
            s.scores = middle_scores(&acc.finish()[lo..hi], opts);
            if keep_logits {
                s.fit_q = Some(gather(&picked));
                s.whole = Some((maxes, totals));
            }
            s.fit_e = fit_e;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()?;
    share_tova(&mut heads, opts);
    Ok(heads)
}

/// Head `h` of layer `l` read out of the cache in f32, not yet scored.
fn read_head(cache: &KvCache, l: usize, h: usize, extra: usize) -> Result<Scored> {
    let head = cache.head(l, h);
    Ok(Scored {
        k: f32s(&head.keys()?)?,
        v: f32s(&head.values()?)?,
        bias: f32s(&head.bias()?)?,
        n: head.len(),
        extra,
        fit_q: None,
        fit_e: None,
        fit_targets: None,
        whole: None,
        scores: Vec::new(),
        entropy: 0.0,
        tail_q: None,
    })
}

/// The query rows a head's fit uses: a seeded random subset of at most `max_queries` of its
/// `rows`, in order.
pub(crate) fn fit_rows(opts: &Options, l: usize, h: usize, rows: usize) -> Vec<usize> {
    if rows <= opts.max_queries {
        return (0..rows).collect();
    }
    let mut rng = StdRng::seed_from_u64(opts.seed ^ ((l as u64) << 20) ^ h as u64);
    let mut p = sample(&mut rng, rows, opts.max_queries).into_vec();
    p.sort_unstable();
    p
}

/// Rows `picked` of the `[*, d]` queries starting at row `base`, row-major.
fn gather_rows(q: &[f32], base: usize, picked: &[usize], d: usize) -> Vec<f32> {
    picked
        .iter()
        .flat_map(|&r| &q[(base + r) * d..(base + r + 1) * d])
        .copied()
        .collect()
}

/// A layer as a scoring pass left it: its heads' scores, per head each query row's softmax
/// `(max, total)`, and the heads' fit targets where the pass took them (else empty).
pub type PassLayer = (
    Vec<Scored>,
    Vec<Vec<(f32, f64)>>,
    Vec<Option<MiddleTargets>>,
);

/// Completes the heads a [`ScoringPass`](crate::compact::score_pass::ScoringPass) scored
/// (the off-policy reference queries, still in the cache as `lq.extra` rows) with what their
/// fit needs: the fit queries, their softmax statistics from the pass (`stats[h]`, rows as in
/// [`score_layer`]), and their attention numerators over the middle keys. Only the fit
/// queries' logits over the middle are computed, instead of scoring every query again.
pub fn fit_inputs_from_pass(
    cache: &KvCache,
    l: usize,
    (heads, stats, mut targets): PassLayer,
    lq: &LayerQueries,
    opts: &Options,
    scale: f32,
) -> Result<Vec<Scored>> {
    let d = cache.head_dim();
    let q_all = f32s(lq.q)?;
    let (nh, t, _) = lq.q.dims3()?;
    let rows = nh / cache.n_kv_heads() * t;
    targets.resize_with(heads.len(), || None);
    heads
        .into_par_iter()
        .zip(stats)
        .zip(targets)
        .enumerate()
        .map(|(h, ((scored, stats), targets))| -> Result<Scored> {
            let mut s = read_head(cache, l, h, lq.extra)?;
            if s.n != scored.n || stats.len() != rows {
                return Err(Error::invalid(
                    "compact: the scoring pass does not match the cache it scored",
                ));
            }
            (s.scores, s.entropy) = (scored.scores, scored.entropy);
            let picked = fit_rows(opts, l, h, rows);
            let q = gather_rows(&q_all, h * rows, &picked, d);
            let (lo, hi) = s.window(opts);
            let whole: (Vec<f32>, Vec<f64>) = picked.iter().map(|&r| stats[r]).unzip();
            let usable =
                |tg: &MiddleTargets| opts.fits_from_pass_targets() && tg.window() == (lo, hi);
            if let Some(tg) = targets.filter(usable) {
                s.fit_targets = Some(tg);
            } else if hi - lo <= opts.chunk {
                // The fit scores every middle key, seen or not (no causal mask), in the units
                // of the pass's max.
                let (k, b) = (&s.k[lo * d..hi * d], &s.bias[lo..hi]);
                s.fit_e = Some(numerators(&q, k, b, &whole.0, d, scale));
            }
            s.whole = Some(whole);
            s.fit_q = Some(q);
            Ok(s)
        })
        .collect()
}

/// The selection scores of a head's middle keys from their pooled attention.
fn middle_scores(pooled: &[f32], opts: &Options) -> Vec<f32> {
    match opts.method {
        Method::SnapKv => avg_pool(pooled, opts.kernel),
        _ => pooled.to_vec(),
    }
}

/// TOVA shares one selection across the layer's heads when they line up token for token.
fn share_tova(heads: &mut [Scored], opts: &Options) {
    if opts.method == Method::Tova && heads.windows(2).all(|w| w[0].n == w[1].n) {
        let len = heads[0].scores.len();
        let mean: Vec<f32> = (0..len)
            .map(|j| heads.iter().map(|s| s.scores[j]).sum::<f32>() / heads.len() as f32)
            .collect();
        heads.iter_mut().for_each(|s| s.scores = mean.clone());
    }
}

/// A layer's heads scored by a [`ScoringPass`](crate::compact::score_pass::ScoringPass):
/// `(scores of every key, mean entropy)` per head, the last `extra` keys being the pass's own
/// tokens. Selection-only (no fit data), as [`score_layer`] without `keep_logits`.
pub fn scored_from_pass(layer: Vec<(Vec<f32>, f64)>, extra: usize, opts: &Options) -> Vec<Scored> {
    let mut heads: Vec<Scored> = layer
        .into_iter()
        .map(|(all, entropy)| {
            let mut s = Scored {
                k: Vec::new(),
                v: Vec::new(),
                bias: Vec::new(),
                n: all.len(),
                extra,
                fit_q: None,
                fit_e: None,
                fit_targets: None,
                whole: None,
                scores: Vec::new(),
                entropy,
                tail_q: None,
            };
            let (lo, hi) = s.window(opts);
            s.scores = middle_scores(&all[lo..hi], opts);
            s
        })
        .collect();
    share_tova(&mut heads, opts);
    heads
}

/// One selection for every head of a layer (heads of equal length): each head's middle scores
/// become the heads' mean (scores normalised per head first, so no head dominates), and the
/// keys kept are those above `median + tau * MAD` of that mean, at most `limit`. Returns the
/// count every head keeps, or None when the heads do not line up (then they select alone).
pub fn shared_selection(heads: &mut [Scored], tau: f64, limit: usize) -> Option<usize> {
    let len = heads.first()?.scores.len();
    if heads.iter().any(|s| s.scores.len() != len) || len == 0 {
        return None;
    }
    let mut mean = vec![0f64; len];
    for s in heads.iter() {
        let total: f64 = s
            .scores
            .iter()
            .map(|&x| x as f64)
            .sum::<f64>()
            .max(f64::MIN_POSITIVE);
        mean.iter_mut()
            .zip(&s.scores)
            .for_each(|(m, &x)| *m += x as f64 / total);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let med = median(&mut mean.clone());
    let mad = median(&mut mean.iter().map(|x| (x - med).abs()).collect());
    let threshold = med + tau * mad;
    let above = mean.iter().filter(|&&x| x > threshold).count();
    let shared: Vec<f32> = mean.iter().map(|&x| x as f32).collect();
    heads.iter_mut().for_each(|s| s.scores = shared.clone());
    Some(above.min(limit))
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

/// Model-wide allocation over every compacted head (`scored[l]` empty for skipped layers):
/// the pool is the uniform budget's middle keys summed over heads, split by a global top-k of
/// the key scores (`Global`) or in proportion to the heads' attention entropy (`Entropy`).
pub fn global_counts(scored: &[Vec<Scored>], opts: &Options) -> Vec<Vec<usize>> {
    let per_head = opts.budget.saturating_sub(opts.sink + opts.recent);
    let heads: Vec<&Scored> = scored.iter().flatten().collect();
    let pool = per_head * heads.len();
    let counts = match opts.head_budgets {
        HeadBudgets::Entropy => {
            let weights: Vec<f64> = heads.iter().map(|s| s.entropy).collect();
            let caps: Vec<usize> = heads.iter().map(|s| s.middle(opts)).collect();
            proportional(&weights, &caps, pool)
        }
        _ => {
            let flat: Vec<&[f32]> = heads.iter().map(|s| s.scores.as_slice()).collect();
            let floor = (opts.head_floor * per_head as f64).round() as usize;
            allocate(&flat, pool, floor)
        }
    };
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
    /// The tail check gave this head the values-only fit ([`Options::tail_check`]).
    pub tail_values_only: bool,
}

/// Fidelity over a head's fit chunks: the root-mean-square of the chunks' relative errors,
/// weighted by their key counts (exact for one chunk).
#[derive(Default)]
struct ChunkErrors {
    mass: f64,
    out: f64,
    keys: f64,
}

impl ChunkErrors {
    fn add(&mut self, f: Fidelity, keys: usize) {
        let w = keys as f64;
        self.mass += w * f.mass_rel_err.powi(2);
        self.out += w * f.out_rel_err.powi(2);
        self.keys += w;
    }

    fn finish(self) -> Option<Fidelity> {
        (self.keys > 0.0).then(|| Fidelity {
            mass_rel_err: (self.mass / self.keys).sqrt(),
            out_rel_err: (self.out / self.keys).sqrt(),
        })
    }
}

/// A head's new rows (keys, values, biases), or why it stays as it is.
type Rewrite = std::result::Result<(Vec<f32>, Vec<f32>, Vec<f32>, HeadOutcome), HeadOutcome>;

/// One fit chunk of a head's middle.
struct Piece {
    /// The chunk's first key and its length.
    start: usize,
    len: usize,
    /// Its kept keys, chunk-relative.
    kept: Vec<u32>,
    /// The fit and, with the tail check, the values-only fit it is weighed against.
    fit: Option<HeadFit>,
    alternative: Option<HeadFit>,
    /// Unfitted: the fidelity of the kept keys as they are.
    raw: Option<Fidelity>,
}

impl Piece {
    /// The fit this piece keeps (`alt`: the values-only one where there is one).
    fn chosen(&self, alt: bool) -> Option<&HeadFit> {
        match &self.alternative {
            Some(a) if alt => Some(a),
            _ => self.fit.as_ref(),
        }
    }
}

/// The middle a head keeps: keys, biases and values `[t, d]` of every piece, from its chosen
/// fit or as they were.
fn middle_of(pieces: &[Piece], alt: bool, s: &Scored, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut k, mut b, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for p in pieces {
        let fit = p.chosen(alt);
        for (i, &j) in p.kept.iter().enumerate() {
            let j = p.start + j as usize;
            k.extend(&s.k[j * d..(j + 1) * d]);
            match fit {
                Some(f) => {
                    b.push(f.bias[i]);
                    v.extend(&f.values[i * d..(i + 1) * d]);
                }
                None => {
                    b.push(s.bias[j]);
                    v.extend(&s.v[j * d..(j + 1) * d]);
                }
            }
        }
    }
    (k, b, v)
}

/// Keeps `counts[h]` middle keys in each head of layer `l` (plus sink and recent) and refits
/// them when the method fits. Heads whose keys all fit stay untouched. The middle is fitted in
/// chunks of `opts.chunk` keys (each chunk's kept keys match that chunk's mass and output),
/// so a long context never holds more than `chunk x max_queries` logits per head.
pub fn apply_layer(
    cache: &mut KvCache,
    l: usize,
    heads: Vec<Scored>,
    counts: &[usize],
    opts: &Options,
    scale: f32,
) -> Result<Vec<HeadOutcome>> {
    let d = cache.head_dim();
    let results = heads
        .into_par_iter()
        .zip(counts.par_iter().copied())
        .enumerate()
        .map(|(h, (mut s, count))| -> Result<Rewrite> {
            let (lo, hi) = s.window(opts);
            if count >= hi - lo {
                // Everything fits: the head stays exact (zero error on any queries).
                let exact = s.fit_q.as_ref().map(|_| Fidelity::default());
                return Ok(Err(HeadOutcome {
                    fidelity: exact,
                    nnls_converged: true,
                    tail_values_only: false,
                }));
            }
            let rule = match opts.method {
                Method::Streaming => Some(Baseline::Streaming),
                Method::Uniform => Some(Baseline::Uniform),
                Method::Random => Some(Baseline::Random(opts.seed ^ ((l as u64) << 32 | h as u64))),
                _ => None,
            };
            // Middle-relative indices; OMP refines the choice inside each chunk below.
            let keep: Vec<u32> = match rule {
                Some(r) => baseline(s.n, lo + count + (s.n - hi), lo, s.n - hi, r)
                    .into_iter()
                    .filter(|&i| (lo..hi).contains(&(i as usize)))
                    .map(|i| i - lo as u32)
                    .collect(),
                None => top_k(&s.scores, count),
            };
            let mut outcome = HeadOutcome {
                fidelity: None,
                nnls_converged: true,
                tail_values_only: false,
            };
            let mut pieces: Vec<Piece> = Vec::new();
            let check_tail = s.tail_q.is_some();
            let mut fit_e = s.fit_e.take();
            for c0 in (lo..hi).step_by(opts.chunk.max(1)) {
                let c1 = (c0 + opts.chunk.max(1)).min(hi);
                let (rel0, rel1) = ((c0 - lo) as u32, (c1 - lo) as u32);
                let mut kept: Vec<u32> = keep
                    .iter()
                    .filter(|&&j| (rel0..rel1).contains(&j))
                    .map(|&j| j - rel0)
                    .collect();
                let (ck, cv, cb) = (&s.k[c0 * d..c1 * d], &s.v[c0 * d..c1 * d], &s.bias[c0..c1]);
                let from_pass = s.fit_targets.take();
                let block = match (&s.fit_q, &s.whole) {
                    (Some(q), Some(whole)) => {
                        let weighted = opts.fit_params.weighted;
                        let b = match (fit_e.take(), from_pass) {
                            (_, Some(tg)) => {
                                // Only the kept keys are scored: the pass gave the rest.
                                let rows: Vec<usize> = kept.iter().map(|&j| j as usize).collect();
                                let kk = gather_rows(ck, 0, &rows, d);
                                let kb: Vec<f32> = rows.iter().map(|&j| cb[j]).collect();
                                let e = numerators(q, &kk, &kb, &whole.0, d, scale);
                                let (n, kept) = (c1 - c0, kept.clone());
                                Block::from_pass(e, kept, n, tg.mass, tg.numer, &whole.1)?
                            }
                            (Some(mut e), None) => {
                                if !weighted {
                                    rescale_to_block_max(&mut e, c1 - c0);
                                }
                                let total = weighted.then_some(whole.1.as_slice());
                                Block::from_exp(e, c1 - c0, cv, d, total)?
                            }
                            (None, None) => {
                                let mut lt = Vec::new();
                                logits_t_into(&mut lt, q, ck, cb, d, scale);
                                let whole =
                                    weighted.then_some((whole.0.as_slice(), whole.1.as_slice()));
                                Block::in_context(lt, c1 - c0, cv, d, whole)?
                            }
                        };
                        Some(b)
                    }
                    _ => None,
                };
                if let (Some(b), Method::AmOmp) = (&block, opts.method) {
                    if !kept.is_empty() {
                        kept = b.omp_select(kept.len())?;
                    }
                }
                let (fitted, alternative, raw) = match &block {
                    Some(b) if opts.fits() && !kept.is_empty() => {
                        // The two fits are independent: a thread another head leaves idle
                        // (global budgets make heads uneven) takes the second.
                        let alt_params = FitParams {
                            ridge: Some(VALUES_RIDGE),
                            ..opts.fit_params
                        };
                        let (f, alt) = rayon::join(
                            || b.fit(&kept, cb, cv, opts.fit, &opts.fit_params),
                            || {
                                check_tail
                                    .then(|| b.fit(&kept, cb, cv, Fit::Values, &alt_params))
                                    .transpose()
                            },
                        );
                        (Some(f?), alt?, None)
                    }
                    // Nothing kept from the chunk: its whole mass and output are lost.
                    Some(_) if kept.is_empty() => (
                        None,
                        None,
                        Some(Fidelity {
                            mass_rel_err: 1.0,
                            out_rel_err: 1.0,
                        }),
                    ),
                    Some(b) => (None, None, Some(b.raw_fidelity(&kept, cv, d)?)),
                    None => (None, None, None),
                };
                pieces.push(Piece {
                    start: c0,
                    len: c1 - c0,
                    kept,
                    fit: fitted,
                    alternative,
                    raw,
                });
            }
            // The tail check: the context's last queries judge both fits over the whole middle.
            let mut middle = middle_of(&pieces, false, &s, d);
            if let Some((tq, tokens)) = s.tail_q.take() {
                let (rows, ctx) = (tq.len() / d, s.n - s.extra);
                let pos: Vec<usize> = (0..rows).map(|i| ctx - tokens + i % tokens).collect();
                let reference =
                    TailReference::new(tq, &pos, (&s.k, &s.v, &s.bias), (lo, hi), d, scale);
                let alternative = middle_of(&pieces, true, &s, d);
                let (k, b, v) = &middle;
                let (_, b2, v2) = &alternative;
                if reference.error(k, b2, v2) < reference.error(k, b, v) {
                    (middle, outcome.tail_values_only) = (alternative, true);
                }
            }
            let mut errs = ChunkErrors::default();
            for p in &pieces {
                if let Some(f) = p.chosen(outcome.tail_values_only) {
                    outcome.nnls_converged &= f.nnls_converged;
                    errs.add(f.fidelity, p.len);
                }
                if let Some(r) = p.raw {
                    errs.add(r, p.len);
                }
            }
            let (mid_k, mid_b, mid_v) = middle;
            let mut new_k = [&s.k[..lo * d], &mid_k].concat();
            let mut new_v = [&s.v[..lo * d], &mid_v].concat();
            let mut new_b = [&s.bias[..lo], &mid_b].concat();
            outcome.fidelity = errs.finish();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::fit::weighted_values;

    fn scored(scores: Vec<f32>) -> Scored {
        Scored {
            k: Vec::new(),
            v: Vec::new(),
            bias: Vec::new(),
            n: scores.len(),
            extra: 0,
            fit_e: None,
            fit_targets: None,
            scores,
            entropy: 0.0,
            fit_q: None,
            whole: None,
            tail_q: None,
        }
    }

    #[test]
    fn shared_selection_keeps_the_outliers_of_the_head_mean() {
        // Keys 2 and 7 stand out in the heads' mean (head 1 is scaled up: normalisation keeps
        // it from dominating); everything else is flat noise around the median.
        let base = [1.0, 1.1, 9.0, 0.9, 1.0, 1.05, 0.95, 6.0, 1.0, 1.0];
        let mut heads = vec![
            scored(base.to_vec()),
            scored(base.iter().map(|x| x * 100.0).collect()),
        ];
        let c = shared_selection(&mut heads, 3.0, 8).unwrap();
        assert_eq!(c, 2);
        assert_eq!(
            heads[0].scores, heads[1].scores,
            "one selection for the layer"
        );
        assert_eq!(top_k(&heads[0].scores, c), vec![2, 7]);
        // The budget caps the count; heads that do not line up select on their own.
        assert_eq!(shared_selection(&mut heads, 0.0, 1), Some(1));
        let mut ragged = vec![scored(vec![1.0; 4]), scored(vec![1.0; 5])];
        assert_eq!(shared_selection(&mut ragged, 3.0, 8), None);
    }

    /// Off-policy fits take their inputs from the scoring pass instead of scoring every query
    /// again: scores, fit queries, statistics and numerators equal [`score_layer`]'s (ragged,
    /// biased heads; the pass's own keys in the cache; two chunks; subsampled fit rows).
    #[test]
    fn fit_inputs_from_the_pass_equal_a_fresh_scoring() -> Result<()> {
        use crate::compact::score_pass::tests::{ragged_cache, random_chunk};
        use crate::compact::score_pass::ScoringPass;
        use crate::compact::split_attention::suffix_partials;
        let (n_kv, g, d, scale) = (2, 3, 8, 0.35f32);
        let cache = ragged_cache(&[20, 26], d)?;
        let mut opts = Options::new(Method::Am, 8);
        (opts.sink, opts.recent, opts.max_queries) = (2, 3, 20);
        for pool in [Pool::Rms, Pool::Max] {
            opts.pool = pool;
            let mut c = cache.clone();
            let mut pass = ScoringPass::new(1, n_kv, pool, false, scale);
            // The same pass also taking the fits' targets (see `with_fit_targets`).
            let mut taking =
                ScoringPass::new(1, n_kv, pool, false, scale).with_fit_targets(&opts, 9);
            let mut qs = Vec::new();
            for t in [5usize, 4] {
                let q = random_chunk(&mut c, g, t, d)?;
                let out = pass.attend(0, &q, &c.layers[0])?;
                let out2 = taking.attend(0, &q, &c.layers[0])?;
                let err = (out - out2)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-5, "the pass's attention with targets taken: {err}");
                qs.push(q);
            }
            let q = Tensor::cat(&qs, 1)?;
            let lq = LayerQueries {
                q: &q,
                causal: true,
                extra: 9,
                outside: None,
            };
            let heads = scored_from_pass(pass.finish_layer(0), 9, &opts);
            let layer = (heads, pass.take_stats(0), pass.take_targets(0));
            let got = fit_inputs_from_pass(&c, 0, layer, &lq, &opts, scale)?;
            let heads = scored_from_pass(taking.finish_layer(0), 9, &opts);
            let layer = (heads, taking.take_stats(0), taking.take_targets(0));
            let got_targets = fit_inputs_from_pass(&c, 0, layer, &lq, &opts, scale)?;
            let want = score_layer(&c, 0, Some(&lq), &opts, scale, true)?;
            let close = |a: &[f32], b: &[f32], what: &str| {
                assert_eq!(a.len(), b.len(), "{what}");
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
                        "{what}: {x} vs {y}"
                    );
                }
            };
            // Scores, fit numerators and each fit query's softmax statistics agree.
            let same_inputs = |got: &[Scored], what: &str| {
                for (a, b) in got.iter().zip(&want) {
                    assert_eq!(a.fit_q, b.fit_q, "{what}: the same seeded fit rows");
                    close(&a.scores, &b.scores, &format!("{what} scores"));
                    let (ea, eb) = (a.fit_e.as_ref().unwrap(), b.fit_e.as_ref().unwrap());
                    close(ea, eb, &format!("{what} numerators"));
                    let (wa, wb) = (a.whole.as_ref().unwrap(), b.whole.as_ref().unwrap());
                    close(&wa.0, &wb.0, &format!("{what} max"));
                    for (x, y) in wa.1.iter().zip(&wb.1) {
                        assert!((x - y).abs() <= 1e-5 * y, "{what} total: {x} vs {y}");
                    }
                    assert_eq!((a.k.len(), a.n, a.extra), (b.k.len(), b.n, b.extra));
                }
            };
            same_inputs(&got, "pass");
            // The targets the pass took are the middle's mass and output over the numerators
            // a fresh scoring gives, and the fits made from them rewrite the cache alike.
            for (a, b) in got_targets.iter().zip(&want) {
                let tg = a.fit_targets.as_ref().expect("targets taken");
                assert!(a.fit_e.is_none(), "no full numerators kept");
                let (lo, hi) = b.window(&opts);
                assert_eq!(tg.window(), (lo, hi));
                let e = b.fit_e.as_ref().unwrap();
                let m = e.len() / (hi - lo);
                let mass: Vec<f32> = e.chunks(hi - lo).map(|c| c.iter().sum()).collect();
                let got_mass: Vec<f32> = tg.mass.iter().map(|&x| x as f32).collect();
                close(&got_mass, &mass, "middle mass");
                let numer = weighted_values(&b.v[lo * d..hi * d], e, hi - lo, m, d);
                let got_numer: Vec<f32> = (0..m)
                    .flat_map(|r| tg.numer.col_as_slice(r).to_vec())
                    .collect();
                close(&got_numer, &numer, "middle output");
            }
            let counts = vec![3, 4];
            let mut opts_fit = opts.clone();
            opts_fit.fit_params.ridge = Some(1.0);
            let (mut c1, mut c2) = (c.clone(), c.clone());
            let f1 = apply_layer(&mut c1, 0, got, &counts, &opts_fit, scale)?;
            let f2 = apply_layer(&mut c2, 0, got_targets, &counts, &opts_fit, scale)?;
            for h in 0..n_kv {
                let (a, b) = (f1[h].fidelity.unwrap(), f2[h].fidelity.unwrap());
                assert!(
                    (a.out_rel_err - b.out_rel_err).abs() < 1e-5,
                    "{a:?} vs {b:?}"
                );
                let (h1, h2) = (c1.head(0, h), c2.head(0, h));
                for (x, y) in [(h1.values()?, h2.values()?), (h1.bias()?, h2.bias()?)] {
                    let err = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(err < 1e-4, "head {h}: fitted rows differ by {err}");
                }
            }
            // The on-policy split: the context scored alone, the suffix keys' part of each
            // softmax given from outside, is the same scoring.
            let parts = suffix_partials(&c.layers[0], &q, scale)?;
            let split = LayerQueries {
                outside: Some(&parts.stats),
                ..lq
            };
            same_inputs(
                &score_layer(&c, 0, Some(&split), &opts, scale, true)?,
                "split",
            );
        }
        Ok(())
    }
}
