//! Checking a head's fit on the context's own last queries. The fit matches the reference
//! queries (the repeat prompt's, which copy the context); a continuation's queries do not copy,
//! and biases that restore the copying queries' mass can mislead them (docs/compaction.md).
//! The queries of the context's last tokens are the nearest thing to a continuation's the
//! cache holds: they come after every middle key, so their exact attention over the head is
//! the target, and a candidate fit is judged by the error of that attention with the middle
//! replaced.

use faer::{Accum, Mat, MatRef};

use crate::compact::exp::{exp_from_max, sum};
use crate::compact::fit::{logits_t_into, numerators, weighted_values_into};

/// The tail queries' exact attention over one head whose middle `[lo, hi)` is being replaced:
/// per query its max logit, the softmax sum and output part of the keys outside the middle
/// that it sees (causal), and the whole output (`[d, rows]`, a column per query).
pub struct TailReference {
    d: usize,
    scale: f32,
    q: Vec<f32>,
    max: Vec<f32>,
    rest_sum: Vec<f64>,
    rest_numer: Mat<f32>,
    output: Mat<f32>,
}

impl TailReference {
    /// `q [rows, d]` with each row's position `pos` (all at or after `hi`); the head's keys,
    /// values `[n, d]` and biases `[n]` (rows past the last position are not seen).
    pub fn new(
        q: Vec<f32>,
        pos: &[usize],
        (k, v, bias): (&[f32], &[f32], &[f32]),
        (lo, hi): (usize, usize),
        d: usize,
        scale: f32,
    ) -> Self {
        let rows = pos.len();
        let seen = pos
            .iter()
            .map(|&p| p + 1)
            .max()
            .unwrap_or(0)
            .min(bias.len());
        let mut e = Vec::new();
        logits_t_into(&mut e, &q, &k[..seen * d], &bias[..seen], d, scale);
        let (mut max, mut rest_sum, mut total) =
            (vec![0f32; rows], vec![0f64; rows], vec![0f64; rows]);
        for (i, col) in e.chunks_exact_mut(seen).enumerate() {
            // Causal: the keys after the query's own position weigh nothing.
            let visible = (pos[i] + 1).min(seen);
            (max[i], total[i]) = exp_from_max(&mut col[..visible]);
            col[visible..].fill(0.0);
            rest_sum[i] = total[i] - sum(&col[lo..hi]);
        }
        let em = MatRef::from_column_major_slice(&e, seen, rows);
        let mut rest_numer = Mat::<f32>::zeros(d, rows);
        weighted_values_into(rest_numer.as_mut(), v, em, 0..lo, Accum::Replace);
        weighted_values_into(rest_numer.as_mut(), v, em, hi..seen, Accum::Add);
        let mut output = rest_numer.clone();
        weighted_values_into(output.as_mut(), v, em, lo..hi, Accum::Add);
        for (i, &z) in total.iter().enumerate() {
            output.col_mut(i).iter_mut().for_each(|x| *x /= z as f32);
        }
        Self {
            d,
            scale,
            q,
            max,
            rest_sum,
            rest_numer,
            output,
        }
    }

    /// Relative error (`||o' - o|| / ||o||` over all tail queries) of the attention with the
    /// middle replaced by keys `k [t, d]`, biases `[t]` and values `[t, d]`.
    pub fn error(&self, k: &[f32], bias: &[f32], values: &[f32]) -> f64 {
        let (d, t, rows) = (self.d, bias.len(), self.max.len());
        let e = numerators(&self.q, k, bias, &self.max, d, self.scale);
        let mut numer = self.rest_numer.clone();
        let em = MatRef::from_column_major_slice(&e, t, rows);
        weighted_values_into(numer.as_mut(), values, em, 0..t, Accum::Add);
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..rows {
            let z = self.rest_sum[i] + sum(&e[i * t..(i + 1) * t]);
            for c in 0..d {
                let o = self.output[(c, i)] as f64;
                num += (numer[(c, i)] as f64 / z - o).powi(2);
                den += o * o;
            }
        }
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Softmax attention of `q` over rows `rows` of (k, bias, v), written out.
    fn attend(q: &[f32], rows: &[(Vec<f32>, f32, Vec<f32>)]) -> Vec<f64> {
        let logits: Vec<f64> = rows
            .iter()
            .map(|(k, b, _)| q.iter().zip(k).map(|(x, y)| (x * y) as f64).sum::<f64>() + *b as f64)
            .collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..q.len())
            .map(|c| {
                rows.iter()
                    .zip(&e)
                    .map(|((_, _, v), w)| w * v[c] as f64)
                    .sum::<f64>()
                    / z
            })
            .collect()
    }

    #[test]
    fn the_error_is_that_of_the_attention_with_the_middle_replaced() {
        let mut rng = StdRng::seed_from_u64(1);
        let (n, d, lo, hi) = (40, 4, 3, 30);
        let mut r =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random::<f32>() - 0.5).collect() };
        let (k, v, bias) = (r(n * d), r(n * d), r(n));
        let pos = [30, 35, 39];
        let q = r(pos.len() * d);
        let t = TailReference::new(q.clone(), &pos, (&k, &v, &bias), (lo, hi), d, 1.0);
        let mid = |x: &[f32], w: usize| x[lo * w..hi * w].to_vec();
        let same = t.error(&mid(&k, d), &mid(&bias, 1), &mid(&v, d));
        assert!(same < 1e-6, "{same}");
        // Every other middle key, raised by 0.7 and with new values: against the explicit
        // causal softmax of each tail query, original and replaced.
        let half: Vec<usize> = (lo..hi).step_by(2).collect();
        let (ck, cb, cv): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            half.iter()
                .flat_map(|&j| k[j * d..(j + 1) * d].to_vec())
                .collect(),
            half.iter().map(|&j| bias[j] + 0.7).collect(),
            r(half.len() * d),
        );
        let row = |kk: &[f32], b: f32, vv: &[f32]| (kk.to_vec(), b, vv.to_vec());
        let (mut num, mut den) = (0f64, 0f64);
        for (i, &p) in pos.iter().enumerate() {
            let qi = &q[i * d..(i + 1) * d];
            let all: Vec<_> = (0..=p)
                .map(|j| row(&k[j * d..(j + 1) * d], bias[j], &v[j * d..(j + 1) * d]))
                .collect();
            let mut replaced: Vec<_> = (0..=p)
                .filter(|j| !(lo..hi).contains(j))
                .map(|j| row(&k[j * d..(j + 1) * d], bias[j], &v[j * d..(j + 1) * d]))
                .collect();
            replaced.extend(
                (0..half.len())
                    .map(|j| row(&ck[j * d..(j + 1) * d], cb[j], &cv[j * d..(j + 1) * d])),
            );
            let (o, o2) = (attend(qi, &all), attend(qi, &replaced));
            num += o.iter().zip(&o2).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
            den += o.iter().map(|a| a * a).sum::<f64>();
        }
        let want = (num / den).sqrt();
        let got = t.error(&ck, &cb, &cv);
        assert!(
            want > 1e-2 && (got - want).abs() < 1e-4 * want.max(1.0),
            "{got} vs {want}"
        );
    }
}
