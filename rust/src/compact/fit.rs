//! Attention-Matching fit of one KV head (Zweiger et al. 2026): given reference queries Q, the
//! head's keys K, values V and current biases b, and the kept subset S of keys, find biases
//! beta = log w and values C_v so that for every reference query
//! - the mass is kept: sum_{j in S} exp(q.k_j s + b_j + beta_j) ~ sum_i exp(q.k_i s + b_i), and
//! - the output is kept: softmax over S (with beta) of C_v ~ softmax over all keys of V.
//!
//! Every query is scored against every key (no causal mask), as in the reference code. f64.

use crate::compact::solve::{nnls, ridge_lstsq};
use crate::error::{Error, Result};

/// One head's fitted block and how well it matches on the reference queries.
#[derive(Debug, Clone)]
pub struct HeadFit {
    /// Additive logit bias of each kept key (its old bias plus log w).
    pub bias: Vec<f32>,
    /// Fitted values `[t, d]`, row-major.
    pub values: Vec<f32>,
    /// ||mass_fit - mass|| / ||mass|| over the reference queries.
    pub mass_rel_err: f64,
    /// ||out_fit - out||_F / ||out||_F over the reference queries.
    pub out_rel_err: f64,
    pub nnls_converged: bool,
}

/// Shapes: `q [m, d]`, `k`/`v` `[n, d]`, `bias [n]`, `keep` sorted indices into `0..n`.
pub struct HeadData<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub bias: &'a [f32],
    pub d: usize,
    pub scale: f32,
}

/// Fits the kept keys `keep`. `ridge` scales a Tikhonov term by the mean diagonal of PᵀP.
pub fn fit_head(h: &HeadData, keep: &[u32], ridge: f64) -> Result<HeadFit> {
    let d = h.d;
    let (m, n, t) = (h.q.len() / d, h.k.len() / d, keep.len());
    if m == 0 || t == 0 || h.v.len() != n * d || h.bias.len() != n {
        return Err(Error::invalid(
            "fit_head: empty queries/keep or mismatched shapes",
        ));
    }
    // exp(logit - row max): every query's row scaled by its own max for stability.
    let mut a = vec![0f64; m * n];
    for r in 0..m {
        let qr = &h.q[r * d..(r + 1) * d];
        let row = &mut a[r * n..(r + 1) * n];
        for (j, x) in row.iter_mut().enumerate() {
            let kj = &h.k[j * d..(j + 1) * d];
            let dot: f64 = qr.iter().zip(kj).map(|(&x, &y)| x as f64 * y as f64).sum();
            *x = dot * h.scale as f64 + h.bias[j] as f64;
        }
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        row.iter_mut().for_each(|x| *x = (*x - max).exp());
    }
    let mass: Vec<f64> = (0..m).map(|r| a[r * n..(r + 1) * n].iter().sum()).collect();
    // Target outputs softmax(.) V, [m, d].
    let mut target = vec![0f64; m * d];
    for r in 0..m {
        for j in 0..n {
            let p = a[r * n + j] / mass[r];
            for c in 0..d {
                target[r * d + c] += p * h.v[j * d + c] as f64;
            }
        }
    }
    // Mass fit: A_S w ~ mass, w >= 0.
    let a_s: Vec<f64> = (0..m)
        .flat_map(|r| keep.iter().map(move |&j| (r, j as usize)))
        .map(|(r, j)| a[r * n + j])
        .collect();
    let mut g = vec![0f64; t * t];
    let mut hv = vec![0f64; t];
    for r in 0..m {
        let row = &a_s[r * t..(r + 1) * t];
        for i in 0..t {
            hv[i] += row[i] * mass[r];
            for j in 0..t {
                g[i * t + j] += row[i] * row[j];
            }
        }
    }
    let sol = nnls(&g, &hv, t, 4 * t + 10)?;
    // A key with w = 0 would get beta = -inf; floor it so the block stays finite.
    let w: Vec<f64> = sol.w.iter().map(|&x| x.max(1e-12)).collect();
    let fitted_mass: Vec<f64> = (0..m)
        .map(|r| (0..t).map(|i| a_s[r * t + i] * w[i]).sum())
        .collect();
    // Value fit on the biased softmax over the kept keys.
    let p: Vec<f64> = (0..m)
        .flat_map(|r| (0..t).map(move |i| (r, i)))
        .map(|(r, i)| a_s[r * t + i] * w[i] / fitted_mass[r])
        .collect();
    let mean_diag = (0..t)
        .map(|i| (0..m).map(|r| p[r * t + i].powi(2)).sum::<f64>())
        .sum::<f64>()
        / t as f64;
    let cv = ridge_lstsq(&p, &target, m, t, d, ridge * mean_diag)?;
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    let mass_err: Vec<f64> = fitted_mass.iter().zip(&mass).map(|(a, b)| a - b).collect();
    let mut out_err = target.clone();
    for r in 0..m {
        for i in 0..t {
            for c in 0..d {
                out_err[r * d + c] -= p[r * t + i] * cv[i * d + c];
            }
        }
    }
    Ok(HeadFit {
        bias: keep
            .iter()
            .zip(&w)
            .map(|(&j, &wi)| h.bias[j as usize] + wi.ln() as f32)
            .collect(),
        values: cv.iter().map(|&x| x as f32).collect(),
        mass_rel_err: norm(&mass_err) / norm(&mass),
        out_rel_err: norm(&out_err) / norm(&target),
        nnls_converged: sol.converged,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compact::select::top_k;
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
        let f = fit_head(&h, &keep, 0.0)?;
        assert!(
            f.mass_rel_err < 1e-9 && f.out_rel_err < 1e-6,
            "{} {}",
            f.mass_rel_err,
            f.out_rel_err
        );
        assert!(
            f.bias.iter().all(|&b| (b - 0.3).abs() < 1e-5),
            "{:?}",
            f.bias
        );
        assert!(f.values.iter().zip(&v).all(|(a, b)| (a - b).abs() < 1e-4));
        Ok(())
    }

    #[test]
    fn fitting_beats_keeping_the_raw_subset() -> Result<()> {
        // Half the keys kept by highest total attention: the beta/value fit must cut both the
        // mass error and the output error below those of the same keys with beta = 0, V as is.
        let (m, n, d) = (128, 64, 16);
        let (q, k, v) = data(m, n, d, 2);
        let bias = vec![0f32; n];
        let h = HeadData {
            q: &q,
            k: &k,
            v: &v,
            bias: &bias,
            d,
            scale: 1.5,
        };
        let full = fit_head(&h, &(0..n as u32).collect::<Vec<_>>(), 0.0)?;
        assert!(full.out_rel_err < 1e-6);
        let score: Vec<f32> = (0..n)
            .map(|j| {
                (0..m)
                    .map(|r| (0..d).map(|c| q[r * d + c] * k[j * d + c]).sum::<f32>())
                    .sum()
            })
            .collect();
        let keep = top_k(&score, n / 2);
        let fit = fit_head(&h, &keep, 1e-6)?;
        // No-fit baseline: w = 1 and the kept values.
        let kk: Vec<f32> = keep
            .iter()
            .flat_map(|&j| k[j as usize * d..(j as usize + 1) * d].to_vec())
            .collect();
        let vv: Vec<f32> = keep
            .iter()
            .flat_map(|&j| v[j as usize * d..(j as usize + 1) * d].to_vec())
            .collect();
        let sub = HeadData {
            q: &q,
            k: &kk,
            v: &vv,
            bias: &bias[..n / 2],
            d,
            scale: 1.5,
        };
        let raw = raw_errors(&h, &sub);
        assert!(fit.nnls_converged);
        assert!(
            fit.mass_rel_err < raw.0 * 0.5,
            "mass {} vs raw {}",
            fit.mass_rel_err,
            raw.0
        );
        assert!(
            fit.out_rel_err < raw.1,
            "out {} vs raw {}",
            fit.out_rel_err,
            raw.1
        );
        Ok(())
    }

    /// (mass, output) relative errors of attending to `sub` with no bias against `full`.
    fn raw_errors(full: &HeadData, sub: &HeadData) -> (f64, f64) {
        let d = full.d;
        let m = full.q.len() / d;
        let attend = |h: &HeadData, r: usize| {
            let n = h.k.len() / d;
            let qr = &full.q[r * d..(r + 1) * d];
            let e: Vec<f64> = (0..n)
                .map(|j| {
                    let dot: f32 = qr
                        .iter()
                        .zip(&h.k[j * d..(j + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                    ((dot * h.scale) as f64).exp()
                })
                .collect();
            let s: f64 = e.iter().sum();
            let out: Vec<f64> = (0..d)
                .map(|c| (0..n).map(|j| e[j] / s * h.v[j * d + c] as f64).sum())
                .collect();
            (s, out)
        };
        let (mut me, mut mn, mut oe, mut on) = (0.0, 0.0, 0.0, 0.0);
        for r in 0..m {
            let (sf, of) = attend(full, r);
            let (ss, os) = attend(sub, r);
            me += (ss - sf).powi(2);
            mn += sf * sf;
            oe += of
                .iter()
                .zip(&os)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>();
            on += of.iter().map(|a| a * a).sum::<f64>();
        }
        ((me / mn).sqrt(), (oe / on).sqrt())
    }
}
