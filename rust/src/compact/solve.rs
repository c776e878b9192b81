//! The two solves of an Attention-Matching fit, in f64 on faer:
//! - [`nnls`]: min ||A w - b||^2 subject to w >= 0, by Lawson-Hanson's active-set method on the
//!   normal equations (G = A^T A, h = A^T b), with a KKT convergence test;
//! - [`ridge_lstsq`]: min ||P X - Y||_F^2 + lambda ||X||_F^2 by Cholesky of P^T P + lambda I.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::Solve;
use faer::{Accum, Mat, MatRef, Par, Side};

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
    let a = Mat::<f64>::from_fn(p, p, |i, j| g[idx[i] * t + idx[j]]);
    let rhs = Mat::<f64>::from_fn(p, 1, |i, _| h[idx[i]]);
    let llt = a.llt(Side::Lower).ok()?;
    let x = llt.solve(&rhs);
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
    // which is the common case when the kept keys all carry mass.
    let all: Vec<usize> = (0..t).collect();
    if let Some(s) = solve_sub(g, t, h, &all) {
        if s.iter().all(|&x| x > 0.0) {
            return Ok(Nnls {
                w: s,
                iterations: 0,
                converged: true,
            });
        }
    }
    let mut w = vec![0f64; t];
    let mut passive = vec![false; t];
    let mut iterations = 0;
    while iterations < max_iter {
        iterations += 1;
        // Gradient of -1/2 ||Aw-b||^2: h - G w. KKT: <= tol on the active (zero) set.
        let grad: Vec<f64> = (0..t)
            .map(|i| h[i] - (0..t).map(|j| g[i * t + j] * w[j]).sum::<f64>())
            .collect();
        let best = (0..t)
            .filter(|&i| !passive[i])
            .max_by(|&a, &b| grad[a].total_cmp(&grad[b]));
        match best {
            Some(j) if grad[j] > tol => passive[j] = true,
            _ => {
                return Ok(Nnls {
                    w,
                    iterations,
                    converged: true,
                })
            }
        }
        // Inner loop: move towards the passive-set LS solution, dropping variables that would
        // turn negative, until that solution is strictly positive.
        loop {
            let idx: Vec<usize> = (0..t).filter(|&i| passive[i]).collect();
            let Some(s) = solve_sub(g, t, h, &idx) else {
                // Singular passive set: drop the newest variable and stop growing it.
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
                if w[i] <= 1e-15 * scale {
                    w[i] = 0.0;
                    passive[i] = false;
                }
            }
        }
    }
    Ok(Nnls {
        w,
        iterations,
        converged: false,
    })
}

/// `X [t, d]` minimising `||P X - Y||^2 + lambda ||X||^2` with `P [m, t]`, `Y [m, d]` and
/// `lambda = ridge * mean(diag(P^T P))` (so `ridge` is relative to the problem's scale).
pub fn ridge_lstsq(p: MatRef<f64>, y: MatRef<f64>, ridge: f64) -> Result<Mat<f64>> {
    let (m, t) = p.shape();
    if y.nrows() != m {
        return Err(Error::invalid(
            "ridge_lstsq: P and Y need the same number of rows",
        ));
    }
    let mut gram = Mat::<f64>::zeros(t, t);
    matmul(
        gram.as_mut(),
        Accum::Replace,
        p.transpose(),
        p,
        1.0,
        Par::Seq,
    );
    let lambda = ridge * (0..t).map(|i| gram[(i, i)]).sum::<f64>() / t.max(1) as f64;
    for i in 0..t {
        gram[(i, i)] += lambda;
    }
    let mut rhs = Mat::<f64>::zeros(t, y.ncols());
    matmul(
        rhs.as_mut(),
        Accum::Replace,
        p.transpose(),
        y,
        1.0,
        Par::Seq,
    );
    let llt = gram.llt(Side::Lower).map_err(|_| {
        Error::invalid("ridge_lstsq: P^T P + lambda I is not positive definite; raise the ridge")
    })?;
    Ok(llt.solve(&rhs))
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
        assert!((s.w[0] - 1.5).abs() < 1e-12, "{:?}", s.w);
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
        let got = ridge_lstsq(pm, ym, 0.0)?;
        let flat = |a: &Mat<f64>| -> Vec<f64> { (0..t * d).map(|i| a[(i / d, i % d)]).collect() };
        assert!(flat(&got).iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-8));
        let shrunk = ridge_lstsq(pm, ym, 1.0)?;
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>();
        assert!(norm(&flat(&shrunk)) < norm(&flat(&got)));
        Ok(())
    }
}
