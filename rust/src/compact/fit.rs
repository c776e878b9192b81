//! Attention-Matching fit of one KV head (Zweiger et al. 2026): given reference queries Q, a
//! block of the head's keys K, values V and current biases b, and the kept subset S of keys,
//! find biases beta = log w and values C_v so that for every reference query
//! - the mass is kept: sum_{j in S} exp(q.k_j s + b_j + beta_j) ~ sum_i exp(q.k_i s + b_i), and
//! - the output is kept: softmax over S (with beta) of C_v ~ softmax over all keys of V.
//!
//! Every query is scored against every key (no causal mask), as in the reference code. The
//! large products (`m x n` logits, targets) run in f32 on faer's GEMM; the `t`-sized normal
//! equations in f64. Matrices are stored transposed (`[keys, queries]`, column-major) so each
//! query's row is one contiguous column.

use faer::linalg::matmul::matmul;
use faer::prelude::ReborrowMut;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::compact::select::{top_k, Pool, ScoreAcc};
use crate::compact::solve::{
    box_lstsq, cholesky_solve, gram, held_out_last, mean_diag, nnls, ridge_lstsq,
    ridge_lstsq_split, Nnls,
};
use crate::error::{Error, Result};

/// Outer active-set steps of the bias NNLS before it reports non-convergence.
const NNLS_MAX_STEPS: usize = 64;

/// Iterations of the bounded (box) refinement of the weights.
const BOX_MAX_STEPS: usize = 500;

/// Greedy steps of orthogonal matching pursuit (several keys per step when `t` is larger).
const OMP_STEPS: usize = 32;

/// What the Attention-Matching fit changes in the kept keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Biases (NNLS on the mass) and values (least squares on the output): the paper's fit.
    Am,
    /// Values only, biases left at 0 (the default: best measured on our testbed).
    Values,
    /// Biases only; values stay the original ones.
    Beta,
    /// Nothing: the selection alone (bias 0, original values).
    None,
}

impl Fit {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "am" => Ok(Self::Am),
            "values" => Ok(Self::Values),
            "beta" => Ok(Self::Beta),
            "none" => Ok(Self::None),
            _ => Err(Error::invalid(format!(
                "fit must be \"am\", \"values\", \"beta\" or \"none\", got {s:?}"
            ))),
        }
    }
}

/// Settings of one fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitParams {
    /// Ridge of the value fit towards the kept keys' own values, relative to the mean
    /// diagonal of PᵀP; None: chosen per head on held-out reference queries.
    pub ridge: Option<f64>,
    /// Bounds on beta = log w (the reference code uses (-3, 3)); None: exact NNLS.
    pub beta_bounds: Option<(f64, f64)>,
    /// Weigh each reference query by the share of its attention the block holds.
    pub weighted: bool,
    /// Ridge pulling w = exp(beta) towards 1, relative to the mean diagonal of AᵀA (0: none).
    pub beta_prior: f64,
}

/// beta in [0, 3]: bounded above as in the reference code ([-3, 3]; on `qwen3-small` the exact
/// NNLS kept 2/10 needles at 8x and the bounded fit 7/10: unbounded weights fit the reference
/// queries and overshoot on new ones), and never below 0, since with w = 1 the kept keys hold
/// at most the block's mass and a w < 1 only silences a key some query needed (needles 0.9 vs
/// 0.8 at 8x, docs/compaction.md).
pub const DEFAULT_BETA_BOUNDS: (f64, f64) = (0.0, 3.0);

/// The value ridge of `Session.compact`'s default: a light pull to the kept values (with the
/// biases fitted, ridge 10 left the block's output error above every baseline's).
pub const DEFAULT_RIDGE: f64 = 1.0;

/// The value ridge of a values-only fit: a firm pull to the kept values (it ties KVzip on
/// running text, where ridge 1 cost +0.64% at 32x: docs/results/am-vs-kvzip). `Session.compact`'s
/// `ridge="auto"` and the tail check's alternative fit use it.
pub const VALUES_RIDGE: f64 = 10.0;

impl Default for FitParams {
    fn default() -> Self {
        Self {
            ridge: None,
            beta_bounds: Some(DEFAULT_BETA_BOUNDS),
            weighted: true,
            beta_prior: 0.0,
        }
    }
}

/// One head's fitted block and how well it matches on the reference queries.
#[derive(Debug, Clone)]
pub struct HeadFit {
    /// Additive logit bias of each kept key (its old bias plus log w).
    pub bias: Vec<f32>,
    /// Fitted values `[t, d]`, row-major.
    pub values: Vec<f32>,
    pub fidelity: Fidelity,
    pub nnls_converged: bool,
}

/// Relative errors of a compacted block on the reference queries.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Fidelity {
    /// ||mass_fit - mass|| / ||mass||.
    pub mass_rel_err: f64,
    /// ||out_fit - out||_F / ||out||_F.
    pub out_rel_err: f64,
}

/// Row-major inputs: `q [m, d]`, `k`/`v` `[n, d]`, `bias [n]`.
pub struct HeadData<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub bias: &'a [f32],
    pub d: usize,
    pub scale: f32,
}

/// Transposed logits `[n, m]`: column `r` holds `q_r . k_j * scale + b_j` for every key `j`.
pub fn logits_t(q: &[f32], k: &[f32], bias: &[f32], d: usize, scale: f32) -> Mat<f32> {
    let mut l = Mat::<f32>::zeros(k.len() / d, q.len() / d);
    logits_into(l.as_mut(), q, k, bias, d, scale);
    l
}

/// [`logits_t`] into `out`, resized to `n * m` and column-major (a buffer reused across
/// query chunks costs no allocation, zeroing or page faults).
pub fn logits_t_into(out: &mut Vec<f32>, q: &[f32], k: &[f32], bias: &[f32], d: usize, scale: f32) {
    let (m, n) = (q.len() / d, k.len() / d);
    // Every entry is overwritten by the product. A fresh buffer comes from the allocator's
    // zeroed pages (no memset of tens of MB); a reused one is only extended.
    if out.capacity() < n * m {
        *out = vec![0.0; n * m];
    }
    out.resize(n * m, 0.0);
    logits_into(
        MatMut::from_column_major_slice_mut(out, n, m),
        q,
        k,
        bias,
        d,
        scale,
    );
}

/// `exp(q . k_j * scale + b_j - max_r)` of every key of `k [n, d]` (biases `bias`) for each
/// query row `r` of `q [m, d]`: `[n, m]` column-major, each query in the units of its own
/// max over everything it sees (`max[r]`), as [`Block::from_exp`] and [`Block::from_pass`]
/// take them.
pub fn numerators(
    q: &[f32],
    k: &[f32],
    bias: &[f32],
    max: &[f32],
    d: usize,
    scale: f32,
) -> Vec<f32> {
    let mut e = Vec::new();
    logits_t_into(&mut e, q, k, bias, d, scale);
    if !bias.is_empty() {
        e.par_chunks_mut(bias.len())
            .zip(max)
            .for_each(|(col, &mx)| {
                crate::compact::exp::exp_shifted(col, mx);
            });
    }
    e
}

fn logits_into(mut out: MatMut<f32>, q: &[f32], k: &[f32], bias: &[f32], d: usize, scale: f32) {
    let (n, m) = out.shape();
    let kr = MatRef::from_row_major_slice(k, n, d);
    let qt = MatRef::from_column_major_slice(q, d, m);
    matmul(
        out.rb_mut(),
        Accum::Replace,
        kr,
        qt,
        scale,
        crate::compact::par(),
    );
    if bias.iter().any(|&b| b != 0.0) {
        for r in 0..m {
            out.rb_mut()
                .col_mut(r)
                .iter_mut()
                .zip(bias)
                .for_each(|(x, b)| *x += b);
        }
    }
}

/// `[rows, d]` row-major: each row of `e [keys, rows]` (column-major) times `v [keys, d]`.
pub fn weighted_values(v: &[f32], e: &[f32], keys: usize, rows: usize, d: usize) -> Vec<f32> {
    let mut out = Mat::<f32>::zeros(d, rows);
    let e = MatRef::from_column_major_slice(e, keys, rows);
    weighted_values_into(out.as_mut(), v, e, 0..keys, Accum::Replace);
    columns_as_rows(out.as_ref())
}

/// `[rows, d]` row-major from `m [d, rows]` (one row per column).
pub fn columns_as_rows(m: MatRef<f32>) -> Vec<f32> {
    (0..m.ncols())
        .flat_map(|r| m.col(r).iter().copied())
        .collect()
}

/// `out [d, rows] (+)= v[keys]^T e[keys, :]`: the part of each query's (unnormalised) output
/// that the keys `keys` give, `v [*, d]` row-major, `e [*, rows]`.
pub fn weighted_values_into(
    out: MatMut<f32>,
    v: &[f32],
    e: MatRef<f32>,
    keys: std::ops::Range<usize>,
    accum: Accum,
) {
    let d = out.nrows();
    matmul(
        out,
        accum,
        MatRef::from_column_major_slice(&v[keys.start * d..keys.end * d], d, keys.len()),
        e.subrows(keys.start, keys.len()),
        1.0,
        crate::compact::par(),
    );
}

/// The reference attention of the queries over one block of keys: `e[:, r] = exp(logit - max_r)`
/// (each query scaled by its own max for stability), its sums (the mass, in those units) and
/// the target outputs `softmax V`.
pub struct Block {
    /// `[rows, m]` column-major: column r is query r over the block's keys (`rows = n`), or
    /// over the keys of `keys` only.
    e: Vec<f32>,
    /// The block's keys that `e` holds (sorted), when not all of them: the scoring pass
    /// already gave the mass and targets, so only the kept keys' numerators are computed.
    keys: Option<Vec<u32>>,
    n: usize,
    m: usize,
    mass: Vec<f64>,
    /// `[d, m]`: column r is query r's attention output over the block.
    target: Mat<f32>,
    /// Row weights of the value fit (the block's share of each query's attention, or 1).
    weight: Vec<f64>,
}

impl Block {
    /// `logits_t [n, m]` over the block's keys, `v [n, d]` row-major. Each query is scaled by
    /// its own max over the block.
    pub fn new(logits_t: MatRef<f32>, v: &[f32], d: usize) -> Result<Self> {
        let (n, m) = logits_t.shape();
        let mut e = Vec::with_capacity(n * m);
        for r in 0..m {
            match logits_t.col(r).try_as_col_major() {
                Some(c) => e.extend_from_slice(c.as_slice()),
                None => e.extend(logits_t.col(r).iter().copied()),
            }
        }
        Self::in_context(e, n, v, d, None)
    }

    /// [`Block::new`] for a block inside a head, from its logits `[n, m]` (column-major, taken
    /// over and overwritten): `whole = (max, total)` per query over every key it sees. Queries
    /// are then scaled by that max, so each one weighs in the mass fit by the share of its
    /// attention the block really holds, and its value-fit row is weighted by that share too
    /// (a query that barely looks at the block cannot pull the fit).
    pub fn in_context(
        mut logits: Vec<f32>,
        n: usize,
        v: &[f32],
        d: usize,
        whole: Option<(&[f32], &[f64])>,
    ) -> Result<Self> {
        if n == 0 || logits.len() % n != 0 {
            return Err(Error::invalid("fit: empty block or mismatched value shape"));
        }
        for (r, col) in logits.chunks_exact_mut(n).enumerate() {
            match whole {
                Some((max, _)) => crate::compact::exp::exp_shifted(col, max[r]),
                None => crate::compact::exp::exp_from_max(col).1,
            };
        }
        Self::from_exp(logits, n, v, d, whole.map(|w| w.1))
    }

    /// The block from its attention numerators `e [n, m]` (column-major, taken over), each
    /// query's `exp(logit - max)` with `max` over every key it sees, as the scoring pass leaves
    /// them; `total`: per query, the sum of those over every key it sees (weighted fit). None:
    /// the numerators are relative to each query's max over the block itself (unweighted), as
    /// [`Block::new`] makes them ([`rescale_to_block_max`] turns the former into these).
    pub fn from_exp(
        e: Vec<f32>,
        n: usize,
        v: &[f32],
        d: usize,
        total: Option<&[f64]>,
    ) -> Result<Self> {
        if n == 0 || e.is_empty() || e.len() % n != 0 || v.len() != n * d {
            return Err(Error::invalid("fit: empty block or mismatched value shape"));
        }
        let m = e.len() / n;
        let mass = e.chunks(n).map(crate::compact::exp::sum).collect();
        let mut numer = Mat::<f32>::zeros(d, m);
        let em = MatRef::from_column_major_slice(&e, n, m);
        weighted_values_into(numer.as_mut(), v, em, 0..n, Accum::Replace);
        Ok(Self::assemble(e, None, n, mass, numer, total))
    }

    /// The block from what the scoring pass measured over all `n` of its keys, per query:
    /// `mass` (the sum of its numerators, in the units of its max over every key it sees),
    /// `numer [d, m]` (the unnormalised output `sum_j e_j v_j`) and `total` (weighted fit),
    /// plus `e [keys.len(), m]`: the numerators of the keys `keys` (sorted) only, the ones
    /// the fit keeps. Same block as [`Block::from_exp`] on the full numerators, without the
    /// `n x m` products.
    pub fn from_pass(
        e: Vec<f32>,
        keys: Vec<u32>,
        n: usize,
        mass: Vec<f64>,
        numer: Mat<f32>,
        total: &[f64],
    ) -> Result<Self> {
        let m = mass.len();
        if m == 0
            || numer.ncols() != m
            || total.len() != m
            || e.len() != keys.len() * m
            || keys.last().is_some_and(|&j| j as usize >= n)
        {
            return Err(Error::invalid(
                "fit: scoring-pass block of mismatched shapes",
            ));
        }
        Ok(Self::assemble(e, Some(keys), n, mass, numer, Some(total)))
    }

    /// A block from its parts, per query: `mass` (the block's numerator sum) and `numer [d,
    /// m]` (its unnormalised output, which becomes the target divided by the mass); with
    /// `total`, each query's value-fit row weighs the block's share of its attention.
    fn assemble(
        e: Vec<f32>,
        keys: Option<Vec<u32>>,
        n: usize,
        mass: Vec<f64>,
        numer: Mat<f32>,
        total: Option<&[f64]>,
    ) -> Self {
        let m = mass.len();
        let weight = match total {
            Some(total) => mass
                .iter()
                .zip(total)
                .map(|(s, t)| s / t.max(f64::MIN_POSITIVE))
                .collect(),
            None => vec![1f64; m],
        };
        let mass: Vec<f64> = mass.into_iter().map(|s| s.max(f64::MIN_POSITIVE)).collect();
        let mut target = numer;
        for (r, &s) in mass.iter().enumerate() {
            let inv = (1.0 / s) as f32;
            target
                .col_as_slice_mut(r)
                .iter_mut()
                .for_each(|x| *x *= inv);
        }
        Self {
            e,
            keys,
            n,
            m,
            mass,
            target,
            weight,
        }
    }

    /// The full numerators `[n, m]`; an error for a block built [`Block::from_pass`].
    fn e(&self) -> Result<MatRef<'_, f32>> {
        match self.keys {
            None => Ok(MatRef::from_column_major_slice(&self.e, self.n, self.m)),
            Some(_) => Err(Error::invalid(
                "fit: this block holds the numerators of its kept keys only",
            )),
        }
    }

    /// `[t, m]` f64 column-major: the kept keys' rows of `e` (column r: query r).
    fn kept(&self, keep: &[u32]) -> Result<Vec<f64>> {
        let rows: Vec<usize> = match &self.keys {
            None => keep.iter().map(|&j| j as usize).collect(),
            Some(keys) => keep
                .iter()
                .map(|j| keys.binary_search(j))
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::invalid("fit: a kept key the scoring pass did not keep"))?,
        };
        let (t, held) = (keep.len(), self.e.len() / self.m.max(1));
        let mut a = vec![0f64; t * self.m];
        if t > 0 && held > 0 {
            a.par_chunks_mut(t)
                .zip(self.e.par_chunks(held))
                .for_each(|(dst, col)| {
                    for (x, &i) in dst.iter_mut().zip(&rows) {
                        *x = col[i] as f64;
                    }
                });
        }
        Ok(a)
    }

    /// The kept keys' mass under weights `w` per query, and `P^T [t, m]` (column-major),
    /// their softmax, made in place of `a` ([`Block::kept`]).
    fn kept_softmax(a: Vec<f64>, w: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let t = w.len();
        let mut pt = a;
        let mut fitted = vec![0f64; pt.len() / t.max(1)];
        if t > 0 {
            pt.par_chunks_mut(t)
                .zip(fitted.par_iter_mut())
                .for_each(|(col, f)| {
                    col.iter_mut().zip(w).for_each(|(x, wi)| *x *= wi);
                    *f = col.iter().sum();
                    let inv = 1.0 / f.max(f64::MIN_POSITIVE);
                    col.iter_mut().for_each(|x| *x *= inv);
                });
        }
        (fitted, pt)
    }

    /// Errors of the kept keys' softmax `pt [t, m]` (mass `fitted` per query) with values
    /// `[t, d]`.
    fn evaluate(&self, fitted: &[f64], pt: &[f64], values: MatRef<f64>) -> Fidelity {
        let (t, m) = (values.nrows(), self.m);
        let d = values.ncols();
        let mut out = Mat::<f64>::zeros(d, m);
        matmul(
            out.as_mut(),
            Accum::Replace,
            values.transpose(),
            MatRef::from_column_major_slice(pt, t, m),
            1.0,
            crate::compact::par(),
        );
        let (mut me, mut mn, mut oe, mut on) = (0f64, 0f64, 0f64, 0f64);
        for (r, (&f, &mass)) in fitted.iter().zip(&self.mass).enumerate() {
            me += (f - mass).powi(2);
            mn += mass.powi(2);
            let (got, want) = (out.col_as_slice(r), self.target.col_as_slice(r));
            for (&o, &y) in got.iter().zip(want) {
                let y = y as f64;
                oe += (o - y).powi(2);
                on += y * y;
            }
        }
        Fidelity {
            mass_rel_err: (me / mn).sqrt(),
            out_rel_err: (oe / on.max(f64::MIN_POSITIVE)).sqrt(),
        }
    }

    /// The value fit's rows `P [m, t]` and targets `Y [m, d]` (returned transposed, column
    /// per query), each query weighted by its share of attention in the block and the queries
    /// of `order` in that order.
    fn value_rows(&self, pt: &[f64], t: usize, order: &[usize]) -> (Vec<f64>, Vec<f64>) {
        let d = self.target.nrows();
        let mut pw = vec![0f64; t * self.m];
        let mut yt = vec![0f64; d * self.m];
        pw.par_chunks_mut(t)
            .zip(yt.par_chunks_mut(d))
            .zip(order.par_iter())
            .for_each(|((p, y), &r)| {
                let wr = self.weight[r];
                p.iter_mut()
                    .zip(&pt[r * t..(r + 1) * t])
                    .for_each(|(x, &v)| *x = v * wr);
                y.iter_mut()
                    .zip(self.target.col_as_slice(r))
                    .for_each(|(x, &v)| *x = v as f64 * wr);
            });
        (pw, yt)
    }

    /// `t` keys chosen by orthogonal matching pursuit on the mass (the paper's stronger
    /// selection): each step adds the keys whose attention correlates most with the mass
    /// residual, then refits w >= 0 on the chosen keys by least squares (clamped, as the
    /// reference code; the Gram matrix grows in place). Returns sorted indices.
    pub fn omp_select(&self, t: usize) -> Result<Vec<u32>> {
        let (n, m) = (self.n, self.m);
        let e = self.e()?;
        let t = t.min(n);
        let step = t.div_ceil(OMP_STEPS).max(1);
        let mass = MatRef::from_column_major_slice(&self.mass, m, 1);
        let mut chosen: Vec<usize> = Vec::with_capacity(t);
        let mut taken = vec![false; n];
        // The chosen keys' rows of `e` [t, m], their Gram matrix and right-hand side.
        let mut rows = Mat::<f64>::zeros(t, m);
        let mut gram = Mat::<f64>::zeros(t, t);
        let mut h = Mat::<f64>::zeros(t, 1);
        let mut fitted = Mat::<f64>::zeros(m, 1);
        let mut resid = Mat::<f32>::from_fn(m, 1, |r, _| self.mass[r] as f32);
        let mut corr = Mat::<f32>::zeros(n, 1);
        while chosen.len() < t {
            matmul(
                corr.as_mut(),
                Accum::Replace,
                e,
                resid.as_ref(),
                1.0,
                Par::Seq,
            );
            let scores: Vec<f32> = (0..n)
                .map(|j| match taken[j] {
                    true => f32::NEG_INFINITY,
                    false => corr[(j, 0)],
                })
                .collect();
            let old = chosen.len();
            for j in crate::compact::select::top_k(&scores, step.min(t - old)) {
                let j = j as usize;
                taken[j] = true;
                for r in 0..m {
                    rows[(chosen.len(), r)] = self.e[r * n + j] as f64;
                }
                chosen.push(j);
            }
            let c = chosen.len();
            let (new, all) = (
                rows.as_ref().subrows(old, c - old),
                rows.as_ref().subrows(0, c),
            );
            // The new rows against every chosen row, mirrored into the Gram matrix.
            let mut cross = Mat::<f64>::zeros(c - old, c);
            matmul(
                cross.as_mut(),
                Accum::Replace,
                new,
                all.transpose(),
                1.0,
                Par::Seq,
            );
            for i in 0..c - old {
                for k in 0..c {
                    gram[(old + i, k)] = cross[(i, k)];
                    gram[(k, old + i)] = cross[(i, k)];
                }
            }
            matmul(
                h.as_mut().subrows_mut(old, c - old),
                Accum::Replace,
                new,
                mass,
                1.0,
                Par::Seq,
            );
            // A tiny ridge keeps Cholesky alive when chosen columns coincide.
            let g = gram.as_ref().submatrix(0, 0, c, c);
            let lambda = 1e-9 * mean_diag(g) + 1e-300;
            let mut w = cholesky_solve(g, h.as_ref().subrows(0, c), lambda).ok_or_else(|| {
                Error::invalid("omp: the Gram matrix of the chosen keys is singular")
            })?;
            for i in 0..c {
                w[(i, 0)] = w[(i, 0)].max(1e-12);
            }
            matmul(
                fitted.as_mut(),
                Accum::Replace,
                all.transpose(),
                w.as_ref(),
                1.0,
                Par::Seq,
            );
            for r in 0..m {
                resid[(r, 0)] = (self.mass[r] - fitted[(r, 0)]) as f32;
            }
        }
        let mut keep: Vec<u32> = chosen.into_iter().map(|j| j as u32).collect();
        keep.sort_unstable();
        Ok(keep)
    }

    /// Fidelity of keeping `keep` as they are (beta = 0, original values `v [n, d]`): what the
    /// baselines and `fit="none"` give.
    pub fn raw_fidelity(&self, keep: &[u32], v: &[f32], d: usize) -> Result<Fidelity> {
        let (fitted, pt) = Self::kept_softmax(self.kept(keep)?, &vec![1.0; keep.len()]);
        Ok(self.evaluate(&fitted, &pt, kept_values(keep, v, d).as_ref()))
    }

    /// w = exp(beta) >= 0 from NNLS on the mass equations `A^T w ~ mass` (`a` is `[t, m]`),
    /// refined into `p.beta_bounds` when set.
    fn fit_weights(&self, a: MatRef<f64>, p: &FitParams) -> Result<Nnls> {
        let (t, m) = a.shape();
        // The bounded solve from w = 1 (below) stops at a step cap long before f32's rounding
        // of G matters, so its Gram is formed in f32, twice as fast; the active-set NNLS, which
        // solves exactly, gets f64.
        let from_one = p.beta_bounds.is_some_and(|(lo, _)| lo >= 0.0);
        let g = if from_one {
            let g32 = gram(Mat::<f32>::from_fn(t, m, |i, r| a[(i, r)] as f32).transpose());
            Mat::<f64>::from_fn(t, t, |i, j| g32[(i, j)] as f64)
        } else {
            gram(a.transpose())
        };
        let mass = MatRef::from_column_major_slice(&self.mass, m, 1);
        let mut h = Mat::<f64>::zeros(t, 1);
        matmul(h.as_mut(), Accum::Replace, a, mass, 1.0, Par::Seq);
        // Keys no reference query attends to (zero columns) carry no evidence: they keep
        // w = 1, and the solve runs on the others (a zero column also makes G singular).
        let max_diag = (0..t).map(|i| g[(i, i)]).fold(0f64, f64::max);
        let informative: Vec<usize> = (0..t).filter(|&i| g[(i, i)] > 1e-14 * max_diag).collect();
        let u = informative.len();
        let mut gv: Vec<f64> = (0..u * u)
            .map(|x| g[(informative[x / u], informative[x % u])])
            .collect();
        let mut hv: Vec<f64> = informative.iter().map(|&i| h[(i, 0)]).collect();
        // Optional prior pulling w towards 1 (beta towards 0): + lambda ||w - 1||^2.
        if p.beta_prior > 0.0 && u > 0 {
            let lambda = p.beta_prior * (0..u).map(|i| gv[i * u + i]).sum::<f64>() / u as f64;
            for i in 0..u {
                gv[i * u + i] += lambda;
                hv[i] += lambda;
            }
        }
        let mut sol = if u == 0 {
            Nnls {
                w: Vec::new(),
                iterations: 0,
                converged: true,
            }
        } else if from_one {
            // w >= 1: the NNLS solution (w >= 0) would only seed the box solver, and its
            // active-set steps cost a Cholesky each, O(t^3) with hundreds of kept keys (3x the
            // whole fit at 2k tokens); w = 1 (the values-only fit) is feasible and close.
            Nnls {
                w: vec![1.0; u],
                iterations: 0,
                converged: false,
            }
        } else {
            nnls(&gv, &hv, u, NNLS_MAX_STEPS)?
        };
        if let (Some((lo, hi)), true) = (p.beta_bounds, u > 0) {
            sol = box_lstsq(&gv, &hv, u, (lo.exp(), hi.exp()), &sol.w, BOX_MAX_STEPS)?;
        }
        let mut full_w = vec![1f64; t];
        for (&i, &x) in informative.iter().zip(&sol.w) {
            full_w[i] = x;
        }
        sol.w = full_w;
        Ok(sol)
    }

    /// Fits what `what` asks for on the kept keys `keep`: beta by NNLS on the mass (`Am`,
    /// `Beta`), values by ridge least squares on the outputs (`Am`, `Values`). `bias` is the
    /// block's current bias, to which log w is added; `v [n, d]` its values, kept as they are
    /// where they are not fitted.
    pub fn fit(
        &self,
        keep: &[u32],
        bias: &[f32],
        v: &[f32],
        what: Fit,
        p: &FitParams,
    ) -> Result<HeadFit> {
        let t = keep.len();
        if t == 0 {
            return Err(Error::invalid("fit: nothing kept"));
        }
        let a = self.kept(keep)?;
        let m = self.m;
        let sol = if matches!(what, Fit::Am | Fit::Beta) {
            self.fit_weights(MatRef::from_column_major_slice(&a, t, m), p)?
        } else {
            Nnls {
                w: vec![1.0; t],
                iterations: 0,
                converged: true,
            }
        };
        // A key with w = 0 would get beta = -inf; floor it so the block stays finite.
        let w: Vec<f64> = sol.w.iter().map(|&x| x.max(1e-12)).collect();
        let d = self.target.nrows();
        let own = kept_values(keep, v, d);
        let (fitted, pt) = Self::kept_softmax(a, &w);
        let cv = match what {
            Fit::Am | Fit::Values => {
                // The held-out search holds out every other tenth of the (position-ordered)
                // queries, so the chosen ridge must carry over to queries looking elsewhere;
                // its rows go last, so both row sets are views.
                let (order, split) =
                    held_out_last(m, |r| p.ridge.is_none() && (r * 10 / m) % 2 == 1);
                let (pw, yt) = self.value_rows(&pt, t, &order);
                let pm = MatRef::from_column_major_slice(&pw, t, m).transpose();
                let ym = MatRef::from_column_major_slice(&yt, d, m).transpose();
                match p.ridge {
                    Some(r) => ridge_lstsq(pm, ym, r, Some(own.as_ref()))?,
                    None => ridge_lstsq_split(pm, ym, own.as_ref(), split)?.0,
                }
            }
            Fit::Beta | Fit::None => own,
        };
        let fidelity = self.evaluate(&fitted, &pt, cv.as_ref());
        Ok(HeadFit {
            bias: keep
                .iter()
                .zip(&w)
                .map(|(&j, &wi)| bias[j as usize] + wi.ln() as f32)
                .collect(),
            values: (0..t)
                .flat_map(|i| (0..cv.ncols()).map(move |c| (i, c)))
                .map(|(i, c)| cv[(i, c)] as f32)
                .collect(),
            fidelity,
            nnls_converged: sol.converged,
        })
    }
}

/// Rescales each query's numerators (column of `e [n, m]`) so its largest over the block is 1:
/// from the units of the whole head's max to those of [`Block::from_exp`] without `total`.
pub fn rescale_to_block_max(e: &mut [f32], n: usize) {
    for col in e.chunks_exact_mut(n) {
        let top = crate::compact::exp::max(col);
        if top > 0.0 {
            let inv = 1.0 / top;
            col.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// The kept keys' rows of `v [n, d]` as `[t, d]` f64.
fn kept_values(keep: &[u32], v: &[f32], d: usize) -> Mat<f64> {
    Mat::from_fn(keep.len(), d, |i, c| v[keep[i] as usize * d + c] as f64)
}

/// Which keys [`fit_head`] keeps.
pub enum Keep<'a> {
    /// These (sorted, unique) indices.
    These(&'a [u32]),
    /// The `t` keys with the highest root-mean-square attention from the queries, chosen on
    /// the same softmax the fit then uses (the reference code's default selection).
    TopRms(usize),
}

/// Fits the kept keys of a whole head (every key in the block). Returns the kept indices and
/// the fit.
pub fn fit_head(h: &HeadData, keep: Keep, what: Fit, p: &FitParams) -> Result<(Vec<u32>, HeadFit)> {
    let (m, n) = (h.q.len() / h.d.max(1), h.k.len() / h.d.max(1));
    if h.d == 0 || h.q.len() != m * h.d || h.k.len() != n * h.d || h.bias.len() != n {
        return Err(Error::invalid("fit: q, k, v must be [*, d] and bias [n]"));
    }
    if let Keep::These(keep) = keep {
        if let Some(&j) = keep.iter().find(|&&j| j as usize >= n) {
            return Err(Error::invalid(format!(
                "fit: kept key {j} out of range (n = {n})"
            )));
        }
    }
    let mut lt = Vec::new();
    logits_t_into(&mut lt, h.q, h.k, h.bias, h.d, h.scale);
    let (keep, block) = match keep {
        Keep::These(keep) => (keep.to_vec(), Block::in_context(lt, n, h.v, h.d, None)?),
        Keep::TopRms(t) => {
            if t == 0 || t > n {
                return Err(Error::invalid(format!("fit: budget {t} not in 1..={n}")));
            }
            // The scoring softmax leaves each column as exp(logit - max): the block's own
            // numerators, so the fit reuses them.
            let mut acc = ScoreAcc::new(n, Pool::Rms);
            acc.add(
                MatMut::from_column_major_slice_mut(&mut lt, n, m),
                None,
                None,
            );
            let keep = top_k(&acc.finish(), t);
            (keep, Block::from_exp(lt, n, h.v, h.d, None)?)
        }
    };
    let f = block.fit(&keep, h.bias, h.v, what, p)?;
    Ok((keep, f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn data(m: usize, n: usize, d: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut r = |len: usize| {
            (0..len)
                .map(|_| rng.random::<f32>() * 2.0 - 1.0)
                .collect::<Vec<_>>()
        };
        (r(m * d), r(n * d), r(n * d))
    }

    #[test]
    fn keeping_every_key_is_an_exact_fit() -> Result<()> {
        let (m, n, d) = (64, 16, 8);
        let (q, k, v) = data(m, n, d, 1);
        let bias = vec![0.3f32; n];
        let h = HeadData {
            q: &q,
            k: &k,
            v: &v,
            bias: &bias,
            d,
            scale: 0.9,
        };
        let keep: Vec<u32> = (0..n as u32).collect();
        let (_, f) = fit_head(
            &h,
            Keep::These(&keep),
            Fit::Am,
            &FitParams {
                ridge: Some(0.0),
                beta_bounds: None,
                ..FitParams::default()
            },
        )?;
        let e = f.fidelity;
        assert!(e.mass_rel_err < 1e-6 && e.out_rel_err < 1e-5, "{e:?}");
        assert!(
            f.bias.iter().all(|&b| (b - 0.3).abs() < 1e-4),
            "{:?}",
            f.bias
        );
        assert!(f.values.iter().zip(&v).all(|(a, b)| (a - b).abs() < 1e-3));
        Ok(())
    }

    #[test]
    fn a_block_from_the_scoring_numerators_fits_as_one_from_logits() -> Result<()> {
        // The pipeline hands the fit the numerators its scoring pass already computed (each
        // query shifted by its max over more keys than the block); that must fit exactly as
        // the block built from the raw logits with the same whole-head statistics.
        let (m, n, d) = (40, 24, 8);
        let (q, k, v) = data(m, n, d, 5);
        let bias = vec![0.1f32; n];
        let lt = logits_t(&q, &k, &bias, d, 0.8);
        let col = |r: usize| (0..n).map(|j| lt[(j, r)]).collect::<Vec<f32>>();
        // The "whole head" has the block plus keys worth 2.5x its mass, and a larger max.
        let max: Vec<f32> = (0..m)
            .map(|r| crate::compact::exp::max(&col(r)) + 0.5)
            .collect();
        let mut e: Vec<f32> = (0..m).flat_map(col).collect();
        let mut total = Vec::new();
        for (r, c) in e.chunks_exact_mut(n).enumerate() {
            total.push(crate::compact::exp::exp_shifted(c, max[r]) * 2.5);
        }
        let logits: Vec<f32> = (0..m).flat_map(col).collect();
        let keep: Vec<u32> = (0..n as u32).step_by(3).collect();
        let p = FitParams::default();
        for whole in [true, false] {
            let mut e = e.clone();
            if !whole {
                rescale_to_block_max(&mut e, n);
            }
            let a = Block::from_exp(e, n, &v, d, whole.then_some(total.as_slice()))?;
            let stats = whole.then_some((max.as_slice(), total.as_slice()));
            let b = Block::in_context(logits.clone(), n, &v, d, stats)?;
            let (fa, fb) = (
                a.fit(&keep, &bias, &v, Fit::Am, &p)?,
                b.fit(&keep, &bias, &v, Fit::Am, &p)?,
            );
            let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(a, b)| (a - b).abs() < 1e-4);
            assert!(
                close(&fa.bias, &fb.bias) && close(&fa.values, &fb.values),
                "whole={whole}"
            );
            assert!((fa.fidelity.out_rel_err - fb.fidelity.out_rel_err).abs() < 1e-6);
        }
        Ok(())
    }

    /// A block built from the scoring pass's mass and outputs plus the kept keys' numerators
    /// fits exactly as the block of every key's numerators (weighted, in the units of a max
    /// taken over more keys than the block's, as inside a head).
    #[test]
    fn a_block_from_the_pass_fits_as_the_full_block() -> Result<()> {
        let (m, n, d) = (96, 40, 8);
        let (q, k, v) = data(m, n, d, 5);
        let bias: Vec<f32> = (0..n).map(|j| (j % 3) as f32 * 0.2).collect();
        let e = logits_t(&q, &k, &bias, d, 1.2);
        let max: Vec<f32> = (0..m)
            .map(|r| e.col(r).iter().fold(0f32, |a, &b| a.max(b)) + 0.5)
            .collect();
        let mut flat: Vec<f32> = Vec::with_capacity(n * m);
        for (r, &mx) in max.iter().enumerate() {
            let mut col: Vec<f32> = e.col(r).iter().copied().collect();
            crate::compact::exp::exp_shifted(&mut col, mx);
            flat.extend(col);
        }
        let total: Vec<f64> = (0..m)
            .map(|r| {
                flat[r * n..(r + 1) * n]
                    .iter()
                    .map(|&x| x as f64)
                    .sum::<f64>()
                    * 1.7
            })
            .collect();
        let full = Block::from_exp(flat.clone(), n, &v, d, Some(&total))?;
        let keep: Vec<u32> = (0..n as u32).filter(|j| j % 3 != 1).collect();
        let mass: Vec<f64> = (0..m)
            .map(|r| crate::compact::exp::sum(&flat[r * n..(r + 1) * n]))
            .collect();
        let mut numer = Mat::<f32>::zeros(d, m);
        let em = MatRef::from_column_major_slice(&flat, n, m);
        weighted_values_into(numer.as_mut(), &v, em, 0..n, Accum::Replace);
        let kept_e: Vec<f32> = (0..m)
            .flat_map(|r| keep.iter().map(move |&j| (r, j as usize)))
            .map(|(r, j)| flat[r * n + j])
            .collect();
        let part = Block::from_pass(kept_e, keep.clone(), n, mass, numer, &total)?;
        for what in [Fit::Am, Fit::Values] {
            let p = FitParams {
                ridge: Some(1.0),
                ..FitParams::default()
            };
            let (a, b) = (
                full.fit(&keep, &bias, &v, what, &p)?,
                part.fit(&keep, &bias, &v, what, &p)?,
            );
            for (x, y) in a
                .values
                .iter()
                .zip(&b.values)
                .chain(a.bias.iter().zip(&b.bias))
            {
                assert!(
                    (x - y).abs() < 1e-4 * (1.0 + y.abs()),
                    "{what:?}: {x} vs {y}"
                );
            }
            assert!((a.fidelity.out_rel_err - b.fidelity.out_rel_err).abs() < 1e-6);
            assert!((a.fidelity.mass_rel_err - b.fidelity.mass_rel_err).abs() < 1e-6);
        }
        let (rf, rp) = (
            full.raw_fidelity(&keep, &v, d)?,
            part.raw_fidelity(&keep, &v, d)?,
        );
        assert!(
            (rf.out_rel_err - rp.out_rel_err).abs() < 1e-6,
            "{rf:?} vs {rp:?}"
        );
        // Keys the pass block does not hold are an error, not a silent zero.
        assert!(part
            .fit(&[1], &bias, &v, Fit::Values, &FitParams::default())
            .is_err());
        assert!(part.omp_select(4).is_err());
        Ok(())
    }

    #[test]
    fn fitting_beats_keeping_the_raw_subset() -> Result<()> {
        // Half the keys kept by highest total attention: the beta/value fit must cut both the
        // mass error and the output error below those of the same keys with beta = 0, V as is.
        let (m, n, d) = (128, 64, 16);
        let (q, k, v) = data(m, n, d, 2);
        let bias = vec![0f32; n];
        let lt = logits_t(&q, &k, &bias, d, 1.5);
        let block = Block::new(lt.as_ref(), &v, d)?;
        let score: Vec<f32> = (0..n).map(|j| (0..m).map(|r| lt[(j, r)]).sum()).collect();
        let keep = top_k(&score, n / 2);
        let fit = block.fit(&keep, &bias, &v, Fit::Am, &FitParams::default())?;
        let raw = block.raw_fidelity(&keep, &v, d)?;
        let all: Vec<u32> = (0..n as u32).collect();
        assert!(block.raw_fidelity(&all, &v, d)?.out_rel_err < 1e-6);
        assert!(fit.nnls_converged);
        let f = fit.fidelity;
        assert!(
            f.mass_rel_err < raw.mass_rel_err * 0.5,
            "{f:?} vs raw {raw:?}"
        );
        assert!(f.out_rel_err < raw.out_rel_err, "{f:?} vs raw {raw:?}");
        Ok(())
    }

    #[test]
    fn omp_picks_one_copy_of_each_duplicated_key() -> Result<()> {
        // Planted: 6 distinct keys, each repeated 1..=6 times. Keeping one copy of each with
        // w = its multiplicity is exact, so OMP with t = 6 must find one of each (mass error
        // ~0), where the highest-attention keys are copies of the few strongest keys.
        let (m, distinct, d) = (80, 6, 8);
        let (q, k0, v0) = data(m, distinct, d, 9);
        let (mut k, mut v, mut owner) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..distinct {
            for _ in 0..=j {
                k.extend(&k0[j * d..(j + 1) * d]);
                v.extend(&v0[j * d..(j + 1) * d]);
                owner.push(j);
            }
        }
        let n = owner.len();
        let bias = vec![0f32; n];
        let lt = logits_t(&q, &k, &bias, d, 1.0);
        let block = Block::new(lt.as_ref(), &v, d)?;
        let keep = block.omp_select(distinct)?;
        let mut owners: Vec<usize> = keep.iter().map(|&j| owner[j as usize]).collect();
        owners.sort_unstable();
        assert_eq!(owners, (0..distinct).collect::<Vec<_>>(), "{keep:?}");
        let p = FitParams {
            beta_bounds: None,
            ..FitParams::default()
        };
        let fit = block.fit(&keep, &bias, &v, Fit::Am, &p)?;
        assert!(fit.fidelity.mass_rel_err < 1e-4, "{:?}", fit.fidelity);
        let top = top_k(
            &(0..n)
                .map(|j| (0..m).map(|r| lt[(j, r)]).sum::<f32>())
                .collect::<Vec<_>>(),
            distinct,
        );
        let topfit = block.fit(&top, &bias, &v, Fit::Am, &p)?;
        assert!(topfit.fidelity.mass_rel_err > 10.0 * fit.fidelity.mass_rel_err);
        Ok(())
    }
}
