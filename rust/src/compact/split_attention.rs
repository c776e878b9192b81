//! The on-policy reference pass's attention, split in two so one product serves both the
//! scoring and the forward pass (CPU).
//!
//! On-policy, layer l's reference queries are scored against the layer's original keys, the
//! layer is compacted, and only then does the forward pass attend (to the compacted keys) to
//! make layer l + 1's queries. The repeat suffix's own keys take part in both softmaxes
//! unchanged, so their part is computed once, before the scoring ([`suffix_partials`]): its
//! `(max, sum)` per query completes the scoring softmax over the context keys alone (a third of
//! the scoring product at 2k tokens), and its unnormalised output is merged with the attention
//! over the compacted context ([`merge_context`]) to give the forward pass's output.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::cache::{HeadCache, LayerCache};
use crate::compact::exp::{exp_from_max, exp_shifted, max};
use crate::compact::fit::{logits_t_into, weighted_values};
use crate::compact::pipeline::f32s;
use crate::error::Result;

/// Query rows per product (bounds the `[keys, rows]` logits).
const ROWS: usize = 512;

/// Per KV head, per query row (query head by query head, each over the suffix's tokens): the
/// softmax statistics `(max, sum of exp(logit - max))` over the suffix's own keys it sees, and
/// its output over them, `sum exp(logit - max) v` (`[rows, d]`, not normalised).
pub struct SuffixPartials {
    pub stats: Vec<Vec<(f32, f64)>>,
    outs: Vec<Vec<f32>>,
}

/// One head's `(stats, outs)` of [`SuffixPartials`].
type HeadPartials = (Vec<(f32, f64)>, Vec<f32>);

/// The suffix queries `q [n_heads, t, d]` of one layer over the suffix's own keys, the last `t`
/// rows of every head of `layer` (causal: token i sees suffix keys 0..=i).
pub fn suffix_partials(layer: &LayerCache, q: &Tensor, scale: f32) -> Result<SuffixPartials> {
    let (nh, t, d) = q.dims3()?;
    let n_kv = layer.heads.len();
    let rows = nh / n_kv * t;
    let qf = f32s(q)?;
    let (stats, outs) = layer
        .heads
        .par_iter()
        .enumerate()
        .map(|(h, head)| -> Result<HeadPartials> {
            let (k, v, b) = head_rows(head, head.len() - t, t)?;
            let q = &qf[h * rows * d..(h + 1) * rows * d];
            let mut stats = Vec::with_capacity(rows);
            let mut out = Vec::with_capacity(rows * d);
            let mut e = Vec::new();
            for r0 in (0..rows).step_by(ROWS) {
                let r1 = (r0 + ROWS).min(rows);
                // Row r is token r % t; keys no row of the chunk sees are never computed.
                let upto = (r0..r1).map(|r| r % t + 1).max().unwrap_or(0);
                logits_t_into(
                    &mut e,
                    &q[r0 * d..r1 * d],
                    &k[..upto * d],
                    &b[..upto],
                    d,
                    scale,
                );
                for (r, col) in (r0..r1).zip(e.chunks_exact_mut(upto)) {
                    let seen = r % t + 1;
                    stats.push(exp_from_max(&mut col[..seen]));
                    col[seen..].fill(0.0);
                }
                out.extend(weighted_values(&v, &e, upto, r1 - r0, d).iter());
            }
            Ok((stats, out))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    Ok(SuffixPartials { stats, outs })
}

/// Keys, values and biases of rows `start..start + len` of a head, in f32.
fn head_rows(head: &HeadCache, start: usize, len: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let rows = |x: Tensor| -> Result<Vec<f32>> { f32s(&x.narrow(0, start, len)?) };
    Ok((
        rows(head.keys()?)?,
        rows(head.values()?)?,
        rows(head.bias()?)?,
    ))
}

/// The suffix queries' attention over the (compacted) context, the rows of every head of
/// `layer` before its last `t` (all visible, with their biases), merged with `partials`: the
/// forward pass's attention output `[n_heads, t, d]` in `q`'s dtype.
pub fn merge_context(
    layer: &LayerCache,
    q: &Tensor,
    partials: &SuffixPartials,
    scale: f32,
) -> Result<Tensor> {
    let (nh, t, d) = q.dims3()?;
    let n_kv = layer.heads.len();
    let rows = nh / n_kv * t;
    let qf = f32s(q)?;
    let outs = layer
        .heads
        .par_iter()
        .enumerate()
        .map(|(h, head)| -> Result<Vec<f32>> {
            let ctx = head.len() - t;
            let (k, v, b) = head_rows(head, 0, ctx)?;
            let q = &qf[h * rows * d..(h + 1) * rows * d];
            let (stats, partial) = (&partials.stats[h], &partials.outs[h]);
            let mut out = Vec::with_capacity(rows * d);
            let mut e = Vec::new();
            for r0 in (0..rows).step_by(ROWS) {
                let r1 = (r0 + ROWS).min(rows);
                let mut scales = Vec::with_capacity(r1 - r0);
                if ctx > 0 {
                    logits_t_into(&mut e, &q[r0 * d..r1 * d], &k, &b, d, scale);
                }
                for (i, r) in (r0..r1).enumerate() {
                    // One softmax over both parts, in units of their common max.
                    let (max_s, sum_s) = stats[r];
                    let (top, sum_c) = match ctx {
                        0 => (max_s, 0.0),
                        _ => {
                            let col = &mut e[i * ctx..(i + 1) * ctx];
                            let top = max(col).max(max_s);
                            (top, exp_shifted(col, top))
                        }
                    };
                    let w_s = ((max_s - top) as f64).exp();
                    scales.push((w_s as f32, (1.0 / (sum_c + sum_s * w_s)) as f32));
                }
                let ctx_out = match ctx {
                    0 => vec![0f32; (r1 - r0) * d],
                    _ => weighted_values(&v, &e, ctx, r1 - r0, d),
                };
                for (i, (w_s, inv)) in scales.into_iter().enumerate() {
                    let r = r0 + i;
                    let (c, s) = (&ctx_out[i * d..(i + 1) * d], &partial[r * d..(r + 1) * d]);
                    out.extend(c.iter().zip(s).map(|(c, s)| (c + s * w_s) * inv));
                }
            }
            Ok(out)
        })
        .collect::<Result<Vec<_>>>()?;
    let out = Tensor::from_vec(outs.concat(), (nh, t, d), q.device())?;
    Ok(out.to_dtype(q.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::attend_reference;
    use crate::compact::score_pass::tests::{ragged_cache, random_chunk};

    /// Suffix partials merged with the context give the plain causal attention of the suffix
    /// over the whole layer (ragged, biased context; a suffix longer than one product's rows).
    #[test]
    fn split_attention_equals_the_whole() -> Result<()> {
        let (g, d, t, scale) = (3, 8, 200, 0.35f32);
        let mut c = ragged_cache(&[20, 26], d)?;
        let q = random_chunk(&mut c, g, t, d)?;
        let p = suffix_partials(&c.layers[0], &q, scale)?;
        assert_eq!(p.stats[0].len(), g * t);
        let got = merge_context(&c.layers[0], &q, &p, scale)?;
        let want = attend_reference(&q, &c.layers[0], scale as f64)?;
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }
}
