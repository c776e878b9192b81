//! The solves of an Attention-Matching fit, in f64 on faer:
//! - [`nnls`]: min ||A w - b||^2 subject to w >= 0, by Lawson-Hanson's active-set method on the
//!   normal equations (G = A^T A, h = A^T b), with a KKT convergence test;
//! - [`box_lstsq`]: the same within bounds, by accelerated projected gradient and an exact
//!   solve on the face it settles on;
//! - [`ridge_lstsq`]: min ||P X - Y||_F^2 + lambda ||X - A||_F^2 by Cholesky of P^T P + lambda I
//!   (`A` an optional anchor, 0 without one).
//!
//! f32 serves where its rounding stays below what the solve resolves (the bulk of the
//! projected-gradient steps, Gram matrices under a strong ridge): the large heads' solves are
//! bound by the bytes of `t x t` matrices.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Scale, Side};

use crate::error::{Error, Result};

/// Result of [`nnls`].
#[derive(Debug, Clone)]
pub struct Nnls {
    pub w: Vec<f64>,
    pub iterations: usize,
    /// KKT conditions hold within tolerance (false: stopped at the iteration cap).
    pub converged: bool,
}

/// Solves the SPD system `g[idx, idx] x = h[idx]` (`g` row-major `t x t`).
fn solve_sub(g: &[f64], t: usize, h: &[f64], idx: &[usize]) -> Option<Vec<f64>> {
    let p = idx.len();
    // A relative jitter keeps Cholesky alive on nearly dependent columns (the Gram matrices of
    // softmax rows are often numerically singular).
    let jitter = 1e-12 * idx.iter().map(|&i| g[i * t + i]).fold(0f64, f64::max);
    let a = Mat::<f64>::from_fn(p, p, |i, j| g[idx[i] * t + idx[j]]);
    let rhs = Mat::<f64>::from_fn(p, 1, |i, _| h[idx[i]]);
    let x = cholesky_solve(a.as_ref(), rhs.as_ref(), jitter)?;
    Some((0..p).map(|i| x[(i, 0)]).collect())
}

/// Non-negative least squares on the normal equations. `g` is `t x t` row-major, `h` length t.
pub fn nnls(g: &[f64], h: &[f64], t: usize, max_iter: usize) -> Result<Nnls> {
    if g.len() != t * t || h.len() != t {
        return Err(Error::invalid("nnls: G must be t x t and h of length t"));
    }
    // Gradient tolerance relative to the problem's scale.
    let scale = h
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let tol = 1e-10 * scale * t as f64;
    // Warm start: the unconstrained solution is the answer whenever it is already positive,
    // which is the common case when the kept keys all carry mass. Otherwise its positive part
    // seeds the passive set (far fewer active-set steps than Lawson-Hanson from zero).
    let all: Vec<usize> = (0..t).collect();
    let mut w = vec![0f64; t];
    let mut passive = vec![false; t];
    if let Some(s) = solve_sub(g, t, h, &all) {
        if s.iter().all(|&x| x > 0.0) {
            return Ok(Nnls {
                w: s,
                iterations: 0,
                converged: true,
            });
        }
        for (i, &x) in s.iter().enumerate() {
            if x > 0.0 {
                w[i] = x;
                passive[i] = true;
            }
        }
    }
    // Variables freed per outer step: one is Lawson-Hanson; several keep large t tractable.
    let batch = (t / 16).max(1);
    let mut iterations = 0;
    loop {
        // Inner loop: move towards the passive-set LS solution, dropping variables that would
        // turn negative, until that solution is strictly positive.
        loop {
            let idx: Vec<usize> = (0..t).filter(|&i| passive[i]).collect();
            if idx.is_empty() {
                break;
            }
            let Some(s) = solve_sub(g, t, h, &idx) else {
                // Singular passive set: stop with the last feasible point.
                return Ok(Nnls {
                    w,
                    iterations,
                    converged: false,
                });
            };
            if s.iter().all(|&x| x > 0.0) {
                for (&i, &x) in idx.iter().zip(&s) {
                    w[i] = x;
                }
                break;
            }
            let alpha = idx
                .iter()
                .zip(&s)
                .filter(|(_, &x)| x <= 0.0)
                .map(|(&i, &x)| w[i] / (w[i] - x))
                .fold(f64::INFINITY, f64::min);
            for (&i, &x) in idx.iter().zip(&s) {
                w[i] += alpha * (x - w[i]);
                if w[i] <= 1e-15 * scale || x <= 0.0 && w[i] <= 1e-12 * scale {
                    w[i] = 0.0;
                    passive[i] = false;
                }
            }
        }
        // Gradient of -1/2 ||Aw-b||^2: h - G w. KKT: <= tol on the active (zero) set.
        let grad: Vec<f64> = (0..t)
            .map(|i| h[i] - (0..t).map(|j| g[i * t + j] * w[j]).sum::<f64>())
            .collect();
        let mut free: Vec<usize> = (0..t).filter(|&i| !passive[i] && grad[i] > tol).collect();
        if free.is_empty() {
            return Ok(Nnls {
                w,
                iterations,
                converged: true,
            });
        }
        if iterations >= max_iter {
            return Ok(Nnls {
                w,
                iterations,
                converged: false,
            });
        }
        iterations += 1;
        free.sort_unstable_by(|&a, &b| grad[b].total_cmp(&grad[a]));
        for &i in free.iter().take(batch) {
            passive[i] = true;
        }
    }
}

/// Box-constrained least squares on the normal equations: min 1/2 w'Gw - h'w subject to
/// `lo <= w <= hi`, by accelerated projected gradient (FISTA with restarts) from `w0`, with an
/// exact solve on the face the steps settle on (below). Converged when the
/// projected gradient is below `1e-9 * max|h|` in every coordinate (the KKT test).
///
/// The face solve: the weights at a bound whose gradient pushes them out stay there, the
/// others solve their own normal equations by Cholesky, and the move towards that point is
/// projected back into the box and halved until the objective drops. Projected gradient finds
/// which weights sit at a bound in a few dozen steps but then creeps towards the optimum in
/// the rest (a 2k-key head stopped at the 500-step cap 5e-5 short of the test); once the face
/// is right one solve lands on it. Only faces of up to [`FACE_MAX_FREE`] free weights are
/// solved: beyond that the Cholesky costs what the steps it saves do, and the fit got no
/// faster either way (docs/results/compaction-qwen3-small.md); what it buys is the exact
/// solution on the heads below that size.
pub fn box_lstsq(
    g: &[f64],
    h: &[f64],
    t: usize,
    (lo, hi): (f64, f64),
    w0: &[f64],
    max_iter: usize,
) -> Result<Nnls> {
    if g.len() != t * t || h.len() != t || w0.len() != t || lo > hi || lo.is_nan() || hi.is_nan() {
        return Err(Error::invalid("box_lstsq: bad shapes or bounds"));
    }
    let gm = MatRef::from_row_major_slice(g, t, t);
    // Step 1/L with L the largest eigenvalue of G (power iteration, then a safety margin).
    let mut v = Mat::<f64>::from_fn(t, 1, |_, _| 1.0);
    let mut l = 0f64;
    for _ in 0..30 {
        let gv = gm * &v;
        l = (0..t).map(|i| gv[(i, 0)].powi(2)).sum::<f64>().sqrt();
        if l == 0.0 {
            break;
        }
        v = gv * faer::Scale(1.0 / l);
    }
    let step = 1.0 / (1.1 * l).max(f64::MIN_POSITIVE);
    let scale = h
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let tol = 1e-9 * scale;
    let clamp = |x: f64| x.clamp(lo, hi);
    let grad = |w: &[f64]| -> Vec<f64> {
        let wm = MatRef::from_column_major_slice(w, t, 1);
        let gw = gm * wm;
        (0..t).map(|i| gw[(i, 0)] - h[i]).collect()
    };
    // The steps are bound by reading G (t^2 values each), so while the projected gradient is
    // far above f32's rounding they read an f32 copy: half the bytes (a 2k-key head's Gram is
    // then 16 MB and stays in a 32 MB L3; 3.8x faster per step on the dev machine). The
    // convergence test always runs in f64, and once the gradient nears f32's resolution the
    // steps switch to f64 (f32 rounding would stall them short of the test).
    let g32: Vec<f32> = if t >= F32_STEPS_FROM {
        g.iter().map(|&x| x as f32).collect()
    } else {
        Vec::new()
    };
    let mut precise = g32.is_empty();
    let grad32 = |w: &[f64]| -> Vec<f64> {
        // G is symmetric, so its row-major copy reads as column-major too.
        let gm32 = MatRef::from_column_major_slice(&g32, t, t);
        let x = Mat::<f32>::from_fn(t, 1, |i, _| w[i] as f32);
        let mut gw = Mat::<f32>::zeros(t, 1);
        matmul(
            gw.as_mut(),
            Accum::Replace,
            gm32,
            x.as_ref(),
            1.0,
            crate::compact::par(),
        );
        (0..t).map(|i| gw[(i, 0)] as f64 - h[i]).collect()
    };
    let projected = |w: &[f64], gw: &[f64]| -> f64 {
        w.iter()
            .zip(gw)
            .map(|(&x, &g)| projected_gradient(x, g, (lo, hi)).abs())
            .fold(0f64, f64::max)
    };
    let mut w: Vec<f64> = w0.iter().map(|&x| clamp(x)).collect();
    let mut y = w.clone();
    let mut momentum = 1f64;
    let (mut last_held, mut last_face) = (Vec::new(), Vec::new());
    for it in 0..max_iter {
        let gy = if precise { grad(&y) } else { grad32(&y) };
        let next: Vec<f64> = y
            .iter()
            .zip(&gy)
            .map(|(&a, &b)| clamp(a - step * b))
            .collect();
        // Restart the momentum when the step goes uphill (keeps FISTA monotone in practice).
        let uphill: f64 = gy
            .iter()
            .zip(next.iter().zip(&w))
            .map(|(g, (n, o))| g * (n - o))
            .sum();
        let m_next = (1.0 + (1.0 + 4.0 * momentum * momentum).sqrt()) / 2.0;
        let beta = if uphill > 0.0 {
            0.0
        } else {
            (momentum - 1.0) / m_next
        };
        momentum = if uphill > 0.0 { 1.0 } else { m_next };
        y = next
            .iter()
            .zip(&w)
            .map(|(&n, &o)| clamp(n + beta * (n - o)))
            .collect();
        w = next;
        if it % 10 == 9 {
            let mut gw = grad(&w);
            let mut worst = projected(&w, &gw);
            if worst > tol {
                // Solve on the face once the steps have all but stopped changing it
                // (earlier, the solve lands on a face many weights are about to leave), and
                // not twice on the same face: its solution depends on the face alone.
                let now = held(&w, &gw, (lo, hi));
                let moved = match last_held.len() {
                    0 => t,
                    _ => now.iter().zip(&last_held).filter(|(a, b)| a != b).count(),
                };
                let free = now.iter().filter(|&&x| !x).count();
                if moved * FACE_SETTLED <= t && free <= FACE_MAX_FREE && now != last_face {
                    if let Some((wf, gf)) = face_step(g, t, (lo, hi), &w, &gw, &now) {
                        (w, gw) = (wf, gf);
                        worst = projected(&w, &gw);
                        // The momentum belongs to the path the face step left.
                        y.clone_from(&w);
                        momentum = 1.0;
                    }
                    last_face = now;
                    last_held = held(&w, &gw, (lo, hi));
                } else {
                    last_held = now;
                }
            }
            if worst <= tol {
                return Ok(Nnls {
                    w,
                    iterations: it + 1,
                    converged: true,
                });
            }
            precise |= worst <= F32_STEPS_UNTIL * scale;
        }
    }
    Ok(Nnls {
        w,
        iterations: max_iter,
        converged: false,
    })
}

/// [`box_lstsq`] solves on the face when fewer than `t / FACE_SETTLED` weights joined or left
/// it over the last 10 steps.
const FACE_SETTLED: usize = 50;

/// [`box_lstsq`] solves on faces of at most this many free weights: the Cholesky grows with
/// their cube (23 ms at 1,000 on the dev machine, the cost of ~80 projected-gradient steps of
/// a 1,000-key head), and larger faces settle late, so they were solved dozens of times each
/// (without the limit every head of the Qwen3-0.6B shape at 4k converged, but its box solves
/// took 59 s of thread time instead of 15).
const FACE_MAX_FREE: usize = 512;

/// The part of the gradient `g` of weight `x` that can move it within `[lo, hi]` (0 at a bound
/// the gradient pushes against): all zero is the KKT condition of [`box_lstsq`].
fn projected_gradient(x: f64, g: f64, (lo, hi): (f64, f64)) -> f64 {
    if x <= lo {
        g.min(0.0)
    } else if x >= hi {
        g.max(0.0)
    } else {
        g
    }
}

/// The weights [`box_lstsq`] holds at a bound: there, with the gradient `gw = G w - h`
/// pushing them out of the box.
fn held(w: &[f64], gw: &[f64], (lo, hi): (f64, f64)) -> Vec<bool> {
    w.iter()
        .zip(gw)
        .map(|(&x, &g)| (x <= lo && g >= 0.0) || (x >= hi && g <= 0.0))
        .collect()
}

/// One face solve of [`box_lstsq`] from the feasible `w` with gradient `gw = G w - h`: the
/// weights `held` ([`held`]) stay, the rest solve
/// `G_FF x = h_F - G_FB w_B`, and `w + a (x - w)`, projected into the box, is taken for the
/// largest `a` in 1, 1/2, ... 1/64 that lowers `1/2 w'Gw - h'w`. Returns the new point and its
/// gradient, or None when no step lowers the objective (or the face system is singular).
fn face_step(
    g: &[f64],
    t: usize,
    (lo, hi): (f64, f64),
    w: &[f64],
    gw: &[f64],
    held: &[bool],
) -> Option<(Vec<f64>, Vec<f64>)> {
    let free: Vec<usize> = (0..t).filter(|&i| !held[i]).collect();
    if free.is_empty() {
        return None;
    }
    // h_F - G_FB w_B = (h - G w)_F + G_FF w_F: the gradient already holds G w.
    let mut rhs = vec![0f64; t];
    for &i in &free {
        rhs[i] = -gw[i] + free.iter().map(|&j| g[i * t + j] * w[j]).sum::<f64>();
    }
    let x = solve_sub(g, t, &rhs, &free)?;
    // Only the free weights move, so the objective's change along the step, `gw'd + d'Gd/2`,
    // and the new gradient `gw + G d` read G's free columns only, not all of G per try.
    let change = |d: &[f64]| -> f64 {
        let quad: f64 = free
            .iter()
            .zip(d)
            .map(|(&i, &di)| {
                di * free
                    .iter()
                    .zip(d)
                    .map(|(&j, &dj)| g[i * t + j] * dj)
                    .sum::<f64>()
            })
            .sum();
        free.iter().zip(d).map(|(&i, &di)| gw[i] * di).sum::<f64>() + 0.5 * quad
    };
    let mut a = 1f64;
    for _ in 0..7 {
        let d: Vec<f64> = free
            .iter()
            .zip(&x)
            .map(|(&i, &xi)| (w[i] + a * (xi - w[i])).clamp(lo, hi) - w[i])
            .collect();
        if change(&d) < 0.0 {
            let mut next = w.to_vec();
            for (&i, &di) in free.iter().zip(&d) {
                next[i] += di;
            }
            let gn = (0..t)
                .map(|k| {
                    gw[k]
                        + free
                            .iter()
                            .zip(&d)
                            .map(|(&j, &dj)| g[k * t + j] * dj)
                            .sum::<f64>()
                })
                .collect();
            return Some((next, gn));
        }
        a *= 0.5;
    }
    None
}

/// Heads from this many kept keys take f32 steps in [`box_lstsq`] (below it G is small and
/// the copy is not worth it).
const F32_STEPS_FROM: usize = 256;
/// [`box_lstsq`]'s steps read the f32 Gram until the projected gradient is below this
/// fraction of `max|h|` (f32 rounds `G w` to about 1e-7 of it on 2k-key heads).
const F32_STEPS_UNTIL: f64 = 1e-6;

/// Mean of the diagonal of a square matrix (the scale ridges are relative to).
pub fn mean_diag(g: MatRef<f64>) -> f64 {
    let t = g.nrows();
    (0..t).map(|i| g[(i, i)]).sum::<f64>() / t.max(1) as f64
}

/// Solves `(G + lambda I) X = B` by Cholesky; None when that is not positive definite.
pub fn cholesky_solve(g: MatRef<f64>, b: MatRef<f64>, lambda: f64) -> Option<Mat<f64>> {
    let mut a = g.to_owned();
    for i in 0..a.nrows() {
        a[(i, i)] += lambda;
    }
    Some(a.llt(Side::Lower).ok()?.solve(b))
}

/// `AᵀA` of `a [m, t]`: only the lower triangle is multiplied (half the work), then mirrored.
pub fn gram<T: faer::traits::ComplexField + Copy>(a: MatRef<T>) -> Mat<T> {
    let t = a.ncols();
    let mut g = Mat::<T>::zeros(t, t);
    triangular::matmul(
        g.as_mut(),
        BlockStructure::TriangularLower,
        Accum::Replace,
        a.transpose(),
        BlockStructure::Rectangular,
        a,
        BlockStructure::Rectangular,
        T::one_impl(),
        crate::compact::par(),
    );
    for c in 1..t {
        for r in 0..c {
            g[(r, c)] = g[(c, r)];
        }
    }
    g
}

/// The normal equations of `min ||P X - Y||^2`: `G = PᵀP`, `B = PᵀY` and `||Y||^2`. Built once
/// and solved for several ridges (the held-out choice), and added over row subsets.
struct NormalEq {
    gram: Mat<f64>,
    rhs: Mat<f64>,
    yy: f64,
}

impl NormalEq {
    /// `single`: form `PᵀP` and `PᵀY` in f32 (twice as fast; see [`F32_GRAM_FROM_RIDGE`]).
    fn new(p: MatRef<f64>, y: MatRef<f64>, single: bool) -> Self {
        let (t, d) = (p.ncols(), y.ncols());
        let yy = y.squared_norm_l2();
        if single {
            // Built transposed: the fit's rows are stored one query per column.
            let pt = Mat::<f32>::from_fn(t, p.nrows(), |c, r| p[(r, c)] as f32);
            let y32 = Mat::<f32>::from_fn(y.nrows(), d, |r, c| y[(r, c)] as f32);
            let mut rhs = Mat::<f32>::zeros(t, d);
            matmul(
                rhs.as_mut(),
                Accum::Replace,
                pt.as_ref(),
                y32.as_ref(),
                1.0,
                crate::compact::par(),
            );
            let g = gram(pt.transpose());
            return Self {
                gram: Mat::from_fn(t, t, |i, j| g[(i, j)] as f64),
                rhs: Mat::from_fn(t, d, |i, c| rhs[(i, c)] as f64),
                yy,
            };
        }
        let mut rhs = Mat::<f64>::zeros(t, d);
        matmul(
            rhs.as_mut(),
            Accum::Replace,
            p.transpose(),
            y,
            1.0,
            crate::compact::par(),
        );
        Self {
            gram: gram(p),
            rhs,
            yy,
        }
    }

    fn plus(&self, o: &Self) -> Self {
        Self {
            gram: &self.gram + &o.gram,
            rhs: &self.rhs + &o.rhs,
            yy: self.yy + o.yy,
        }
    }

    /// `X` for `ridge` relative to the mean diagonal of `G`, pulled towards `anchor`.
    fn solve(&self, ridge: f64, anchor: Option<MatRef<f64>>) -> Result<Mat<f64>> {
        let lambda = ridge * mean_diag(self.gram.as_ref());
        let mut rhs = self.rhs.clone();
        if let Some(a) = anchor {
            rhs += Scale(lambda) * a;
        }
        cholesky_solve(self.gram.as_ref(), rhs.as_ref(), lambda).ok_or_else(|| {
            Error::invalid(
                "ridge_lstsq: P^T P + lambda I is not positive definite; raise the ridge",
            )
        })
    }

    /// `||P X - Y||^2 = tr(XᵀGX) - 2 tr(XᵀB) + ||Y||^2`, without touching the rows again.
    fn error(&self, x: MatRef<f64>) -> f64 {
        let mut gx = Mat::<f64>::zeros(x.nrows(), x.ncols());
        matmul(
            gx.as_mut(),
            Accum::Replace,
            self.gram.as_ref(),
            x,
            1.0,
            crate::compact::par(),
        );
        let mut e = self.yy;
        for c in 0..x.ncols() {
            for i in 0..x.nrows() {
                e += x[(i, c)] * (gx[(i, c)] - 2.0 * self.rhs[(i, c)]);
            }
        }
        e.max(0.0)
    }
}

/// `X [t, d]` minimising `||P X - Y||^2 + lambda ||X - A||^2` with `P [m, t]`, `Y [m, d]`, the
/// anchor `A [t, d]` (0 when None) and `lambda = ridge * mean(diag(P^T P))` (so `ridge` is
/// relative to the problem's scale). The value fit anchors at the kept keys' own values: a key
/// the reference queries barely see keeps its value instead of shrinking to 0.
pub fn ridge_lstsq(
    p: MatRef<f64>,
    y: MatRef<f64>,
    ridge: f64,
    anchor: Option<MatRef<f64>>,
) -> Result<Mat<f64>> {
    let (m, t) = p.shape();
    if y.nrows() != m || anchor.is_some_and(|a| a.shape() != (t, y.ncols())) {
        return Err(Error::invalid(
            "ridge_lstsq: P and Y need the same number of rows, the anchor [t, d]",
        ));
    }
    NormalEq::new(p, y, ridge >= F32_GRAM_FROM_RIDGE).solve(ridge, anchor)
}

/// From this relative ridge on, [`ridge_lstsq`] forms its normal equations in f32: the ridge
/// bounds the condition number of `PᵀP + lambda I` to about `1 + 1/ridge` times the Gram's
/// spread over its mean diagonal, so f32's ~1e-7 relative rounding of `PᵀP` moves the solution
/// by far less than the fit's own error. Smaller ridges (the held-out search's grid) stay in
/// f64.
const F32_GRAM_FROM_RIDGE: f64 = 0.1;

/// Candidate ridges of [`ridge_lstsq_cv`] (relative, as in [`ridge_lstsq`]); the anchor
/// itself (an infinite ridge) is always a candidate too.
pub const RIDGE_GRID: [f64; 6] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];

/// [`ridge_lstsq`] with the ridge chosen on held-out rows: the rows with `held[r]` score each
/// candidate of [`RIDGE_GRID`] (and `X = A`) fitted on the others; the one with the lowest
/// held-out error wins and is refitted on every row. The normal equations are formed once per
/// row set, so the search costs a few `t x t` solves. Returns the solution and the chosen
/// ridge (`f64::INFINITY` when the anchor itself won).
pub fn ridge_lstsq_cv(
    p: MatRef<f64>,
    y: MatRef<f64>,
    anchor: MatRef<f64>,
    held: &[bool],
) -> Result<(Mat<f64>, f64)> {
    let (m, t) = p.shape();
    let d = y.ncols();
    if y.nrows() != m || held.len() != m || anchor.shape() != (t, d) {
        return Err(Error::invalid("ridge_lstsq_cv: mismatched shapes"));
    }
    let (order, split) = held_out_last(m, |r| held[r]);
    let pick = |a: MatRef<f64>| Mat::<f64>::from_fn(m, a.ncols(), |i, c| a[(order[i], c)]);
    ridge_lstsq_split(pick(p).as_ref(), pick(y).as_ref(), anchor, split)
}

/// Rows `0..m` reordered with the held-out ones last, and how many come before them (the
/// layout [`ridge_lstsq_split`] takes).
pub fn held_out_last(m: usize, held: impl Fn(usize) -> bool) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..m).filter(|&r| !held(r)).collect();
    let split = order.len();
    order.extend((0..m).filter(|&r| held(r)));
    (order, split)
}

/// [`ridge_lstsq_cv`] with the rows already ordered: rows `..split` fit, rows `split..` are
/// held out (views, no copies).
pub fn ridge_lstsq_split(
    p: MatRef<f64>,
    y: MatRef<f64>,
    anchor: MatRef<f64>,
    split: usize,
) -> Result<(Mat<f64>, f64)> {
    let (m, t) = p.shape();
    let d = y.ncols();
    if y.nrows() != m || anchor.shape() != (t, d) {
        return Err(Error::invalid("ridge_lstsq_cv: mismatched shapes"));
    }
    if split == 0 || split >= m {
        return Err(Error::invalid(
            "ridge_lstsq_cv: needs fit and held-out rows",
        ));
    }
    let fit = NormalEq::new(p.subrows(0, split), y.subrows(0, split), false);
    let val = NormalEq::new(
        p.subrows(split, m - split),
        y.subrows(split, m - split),
        false,
    );
    let mut best = (val.error(anchor), f64::INFINITY);
    for &ridge in &RIDGE_GRID {
        // A candidate the fit rows cannot support (not positive definite) just loses.
        if let Ok(x) = fit.solve(ridge, Some(anchor)) {
            let e = val.error(x.as_ref());
            if e < best.0 {
                best = (e, ridge);
            }
        }
    }
    let x = match best.1.is_finite() {
        true => fit.plus(&val).solve(best.1, Some(anchor))?,
        false => anchor.to_owned(),
    };
    Ok((x, best.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn gram(a: &[f64], m: usize, t: usize, b: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let mut g = vec![0.0; t * t];
        let mut h = vec![0.0; t];
        for r in 0..m {
            for i in 0..t {
                h[i] += a[r * t + i] * b[r];
                for j in 0..t {
                    g[i * t + j] += a[r * t + i] * a[r * t + j];
                }
            }
        }
        (g, h)
    }

    #[test]
    fn nnls_recovers_a_planted_sparse_solution() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(3);
        let (m, t) = (60, 12);
        let a: Vec<f64> = (0..m * t).map(|_| rng.random::<f64>()).collect();
        let truth: Vec<f64> = (0..t)
            .map(|i| if i % 3 == 0 { 0.0 } else { 0.5 + i as f64 })
            .collect();
        let b: Vec<f64> = (0..m)
            .map(|r| (0..t).map(|i| a[r * t + i] * truth[i]).sum())
            .collect();
        let (g, h) = gram(&a, m, t, &b);
        let s = nnls(&g, &h, t, 100)?;
        assert!(s.converged);
        for (x, y) in s.w.iter().zip(&truth) {
            assert!((x - y).abs() < 1e-6, "{:?} vs {truth:?}", s.w);
        }
        Ok(())
    }

    #[test]
    fn nnls_clamps_where_least_squares_goes_negative() -> Result<()> {
        // b pulls w1 negative: unconstrained LS gives (2, -1); NNLS must give w1 = 0 and the
        // best w0 alone, with the gradient condition satisfied.
        let a = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let b = [1.0, -1.0, 2.0];
        let (g, h) = gram(&a, 3, 2, &b);
        let s = nnls(&g, &h, 2, 10)?;
        assert!(s.converged && s.w[1] == 0.0);
        assert!((s.w[0] - 1.5).abs() < 1e-9, "{:?}", s.w);
        Ok(())
    }

    #[test]
    fn box_lstsq_matches_nnls_inside_the_box_and_respects_bounds() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(4);
        let (m, t) = (40, 8);
        let a: Vec<f64> = (0..m * t).map(|_| rng.random::<f64>()).collect();
        let truth: Vec<f64> = (0..t).map(|i| 0.5 + 0.25 * i as f64).collect();
        let b: Vec<f64> = (0..m)
            .map(|r| (0..t).map(|i| a[r * t + i] * truth[i]).sum())
            .collect();
        let (g, h) = gram(&a, m, t, &b);
        // Loose box: the exact solution.
        let s = box_lstsq(&g, &h, t, (0.0, 10.0), &vec![1.0; t], 20000)?;
        assert!(s.converged, "{s:?}");
        assert!(
            s.w.iter().zip(&truth).all(|(x, y)| (x - y).abs() < 1e-5),
            "{s:?}"
        );
        // Tight box: all within bounds, and no feasible coordinate move improves the objective.
        let s = box_lstsq(&g, &h, t, (0.6, 1.5), &vec![1.0; t], 20000)?;
        assert!(
            s.converged && s.w.iter().all(|&x| (0.6..=1.5).contains(&x)),
            "{s:?}"
        );
        let at_bound = s.w.iter().filter(|&&x| x == 0.6 || x == 1.5).count();
        assert!(
            at_bound > 0,
            "the truth leaves the box, so some bound must bind: {s:?}"
        );
        for i in 0..t {
            let gi: f64 = (0..t).map(|j| g[i * t + j] * s.w[j]).sum::<f64>() - h[i];
            let ok = if s.w[i] == 0.6 {
                gi >= -1e-6
            } else if s.w[i] == 1.5 {
                gi <= 1e-6
            } else {
                gi.abs() < 1e-6
            };
            assert!(ok, "KKT fails at {i}: w {} grad {gi}", s.w[i]);
        }
        Ok(())
    }

    /// The projected gradient of `1/2 w'Gw - h'w` in the box is within `1e-9 max|h|` of 0.
    fn assert_kkt(g: &[f64], h: &[f64], w: &[f64], bounds: (f64, f64)) {
        let t = w.len();
        let scale = h.iter().fold(0f64, |m, x| m.max(x.abs()));
        for i in 0..t {
            let gi: f64 = (0..t).map(|j| g[i * t + j] * w[j]).sum::<f64>() - h[i];
            let pg = projected_gradient(w[i], gi, bounds);
            assert!(pg.abs() <= 1e-9 * scale, "KKT fails at {i}: {pg}");
        }
    }

    #[test]
    fn box_lstsq_on_a_large_head_still_converges_to_the_kkt_point() -> Result<()> {
        // Large enough for the f32 steps: they must hand over to f64 and meet the f64 test.
        let mut rng = StdRng::seed_from_u64(9);
        let (m, t) = (900, F32_STEPS_FROM + 44);
        let a: Vec<f64> = (0..m * t).map(|_| rng.random::<f64>() - 0.3).collect();
        let truth: Vec<f64> = (0..t).map(|i| 0.5 + (i % 7) as f64 * 0.4).collect();
        let b: Vec<f64> = (0..m)
            .map(|r| (0..t).map(|i| a[r * t + i] * truth[i]).sum())
            .collect();
        let (g, h) = gram(&a, m, t, &b);
        let (lo, hi) = (1.0, 2.0);
        let s = box_lstsq(&g, &h, t, (lo, hi), &vec![1.0; t], 20000)?;
        assert!(s.converged, "stopped after {} steps", s.iterations);
        assert_kkt(&g, &h, &s.w, (lo, hi));
        Ok(())
    }

    #[test]
    fn box_lstsq_lands_on_the_face_of_an_ill_conditioned_problem() -> Result<()> {
        // Nearly dependent columns (as softmax rows are): projected gradient alone creeps for
        // thousands of steps; once the bound weights settle, one face solve must finish it.
        let mut rng = StdRng::seed_from_u64(5);
        let (m, t) = (300, 120);
        let base: Vec<f64> = (0..m).map(|_| rng.random::<f64>()).collect();
        let a: Vec<f64> = (0..m * t)
            .map(|x| base[x / t] + 0.05 * rng.random::<f64>())
            .collect();
        let truth: Vec<f64> = (0..t).map(|i| [0.5, 1.5, 3.0][i % 3]).collect();
        let b: Vec<f64> = (0..m)
            .map(|r| (0..t).map(|i| a[r * t + i] * truth[i]).sum())
            .collect();
        let (g, h) = gram(&a, m, t, &b);
        let (lo, hi) = (1.0, 2.5);
        let s = box_lstsq(&g, &h, t, (lo, hi), &vec![1.0; t], 300)?;
        assert!(s.converged, "stopped after {} steps", s.iterations);
        let free = s.w.iter().filter(|&&x| x > lo && x < hi).count();
        assert!(
            free > 0 && free < t,
            "the box must bind some weights: {free} free"
        );
        assert_kkt(&g, &h, &s.w, (lo, hi));
        Ok(())
    }

    #[test]
    fn ridge_lstsq_solves_exact_systems_and_shrinks_with_ridge() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(5);
        let (m, t, d) = (30, 6, 3);
        let p: Vec<f64> = (0..m * t).map(|_| rng.random::<f64>()).collect();
        let x: Vec<f64> = (0..t * d).map(|_| rng.random::<f64>() - 0.5).collect();
        let y: Vec<f64> = (0..m)
            .flat_map(|r| (0..d).map(move |c| (r, c)))
            .map(|(r, c)| (0..t).map(|i| p[r * t + i] * x[i * d + c]).sum())
            .collect();
        let pm = MatRef::from_row_major_slice(&p, m, t);
        let ym = MatRef::from_row_major_slice(&y, m, d);
        let got = ridge_lstsq(pm, ym, 0.0, None)?;
        let flat = |a: &Mat<f64>| -> Vec<f64> { (0..t * d).map(|i| a[(i / d, i % d)]).collect() };
        assert!(flat(&got).iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-8));
        let shrunk = ridge_lstsq(pm, ym, 1.0, None)?;
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!(norm(&flat(&shrunk)) < norm(&flat(&got)));
        // With an anchor the ridge pulls towards it: a huge ridge returns the anchor, and a
        // moderate one lands between the anchor and the exact solution.
        let anchor = Mat::<f64>::from_fn(t, d, |i, c| (i + c) as f64);
        let dist = |a: &Mat<f64>| -> f64 {
            flat(a)
                .iter()
                .zip(flat(&anchor))
                .map(|(u, v)| (u - v).powi(2))
                .sum()
        };
        let pinned = ridge_lstsq(pm, ym, 1e9, Some(anchor.as_ref()))?;
        assert!(dist(&pinned) < 1e-12, "{}", dist(&pinned));
        let between = ridge_lstsq(pm, ym, 1.0, Some(anchor.as_ref()))?;
        assert!(dist(&between) < dist(&got) && dist(&between) > 1e-3);
        Ok(())
    }

    #[test]
    fn held_out_ridge_fits_when_it_generalises_and_keeps_the_anchor_when_not() -> Result<()> {
        let mut rng = StdRng::seed_from_u64(11);
        let (m, t, d) = (80, 5, 2);
        let p = Mat::<f64>::from_fn(m, t, |_, _| rng.random::<f64>());
        let truth = Mat::<f64>::from_fn(t, d, |_, _| rng.random::<f64>() - 0.5);
        let anchor = Mat::<f64>::zeros(t, d);
        let held: Vec<bool> = (0..m).map(|r| r % 2 == 1).collect();
        // Every row follows the same X: the smallest ridge wins and X is recovered.
        let y = &p * &truth;
        let (x, ridge) = ridge_lstsq_cv(p.as_ref(), y.as_ref(), anchor.as_ref(), &held)?;
        assert_eq!(ridge, RIDGE_GRID[0]);
        assert!((&x - &truth).norm_max() < 1e-3);
        // Held-out rows contradict the fit rows (their targets flip sign): fitting only hurts
        // there, so the anchor itself is kept.
        let flip = Mat::<f64>::from_fn(m, d, |r, c| if held[r] { -y[(r, c)] } else { y[(r, c)] });
        let (x, ridge) = ridge_lstsq_cv(p.as_ref(), flip.as_ref(), anchor.as_ref(), &held)?;
        assert!(ridge.is_infinite() && x.norm_max() == 0.0, "{ridge}");
        Ok(())
    }
}
