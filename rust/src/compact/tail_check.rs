//! Checking a head's fit on the context's own last queries. The fit matches the reference
//! queries (the repeat prompt's, which copy the context); a continuation's queries do not copy,
//! and biases that restore the copying queries' mass can mislead them (docs/compaction.md).
//! The queries of the context's last tokens are the nearest thing to a continuation's the
//! cache holds: they come after every middle key, so their exact attention over the head is
//! the target, and a candidate fit is judged by the error of that attention with the middle
//! replaced.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// The tail queries' exact attention over one head whose middle `[lo, hi)` is being replaced:
/// per query its max logit, the softmax sum and numerator of the keys outside the middle that
/// it sees (causal), and the whole output. Matrices are stored one query per column.
pub struct TailReference {
    d: usize,
    scale: f32,
    q: Vec<f32>,
    max: Vec<f32>,
    rest_sum: Vec<f32>,
    rest_numer: Mat<f32>,
    output: Mat<f32>,
}

/// `scale * k qᵀ` for `k [t, d]` and `q [rows, d]`, row-major: `[t, rows]`, a column per query.
fn logits(k: &[f32], q: &[f32], d: usize, scale: f32) -> Mat<f32> {
    let (rows, t) = (q.len() / d, k.len() / d);
    let mut out = Mat::<f32>::zeros(t, rows);
    matmul(
        out.as_mut(),
        Accum::Replace,
        MatRef::from_row_major_slice(k, t, d),
        MatRef::from_row_major_slice(q, rows, d).transpose(),
        scale,
        Par::Seq,
    );
    out
}

/// `vᵀ e` for `v [t, d]` row-major and `e [t, rows]`: `[d, rows]`.
fn numerators(v: &[f32], e: &Mat<f32>, d: usize) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(d, e.ncols());
    let vm = MatRef::from_row_major_slice(v, v.len() / d, d);
    matmul(
        out.as_mut(),
        Accum::Replace,
        vm.transpose(),
        e.as_ref(),
        1.0,
        Par::Seq,
    );
    out
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
        let seen = pos
            .iter()
            .map(|&p| p + 1)
            .max()
            .unwrap_or(0)
            .min(bias.len());
        let mut e = logits(&k[..seen * d], &q, d, scale);
        let rows = pos.len();
        let mut max = vec![f32::NEG_INFINITY; rows];
        let mut rest_sum = vec![0f32; rows];
        let mut total = vec![0f32; rows];
        let mut mid = Mat::<f32>::zeros(hi - lo, rows);
        for (i, &p) in pos.iter().enumerate() {
            let col = e.col_as_slice_mut(i);
            let visible = (p + 1).min(seen);
            for (x, &b) in col.iter_mut().zip(bias).take(visible) {
                *x += b;
            }
            col[visible..].fill(f32::NEG_INFINITY);
            let m = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in col.iter_mut() {
                *x = (*x - m).exp();
            }
            total[i] = col.iter().sum();
            mid.col_as_slice_mut(i).copy_from_slice(&col[lo..hi]);
            col[lo..hi].fill(0.0);
            rest_sum[i] = col.iter().sum();
            max[i] = m;
        }
        let rest_numer = numerators(&v[..seen * d], &e, d);
        let mut output = numerators(&v[lo * d..hi * d], &mid, d);
        for i in 0..rows {
            for c in 0..d {
                output[(c, i)] = (output[(c, i)] + rest_numer[(c, i)]) / total[i];
            }
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
        let d = self.d;
        let mut e = logits(k, &self.q, d, self.scale);
        let mut sum = self.rest_sum.clone();
        for (i, s) in sum.iter_mut().enumerate() {
            let col = e.col_as_slice_mut(i);
            for (x, &b) in col.iter_mut().zip(bias) {
                *x = (*x + b - self.max[i]).exp();
            }
            *s += col.iter().sum::<f32>();
        }
        let numer = numerators(values, &e, d);
        let (mut num, mut den) = (0f64, 0f64);
        for (i, &s) in sum.iter().enumerate() {
            for c in 0..d {
                let o = self.output[(c, i)] as f64;
                let got = ((numer[(c, i)] + self.rest_numer[(c, i)]) / s) as f64;
                num += (got - o).powi(2);
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
