//! Attention of new queries over one layer of the ragged, biased cache.
//!
//! Per KV head `h` with keys `K_h [n_h, d]`, values `V_h`, bias `b_h [n_h]`, the `g` query heads of
//! its group are stacked as rows (`[g * t, d]`), so GQA never materialises repeated K/V:
//! `out = softmax(Q K_h^T * scale + b_h + causal) V_h`. Logits, mask, bias and softmax are f32
//! whatever the model dtype; the two products run in the model dtype. This is the seam where a
//! fused GPU kernel would plug in.

use candle_core::{DType, Tensor, D};

use crate::cache::LayerCache;
use crate::error::Result;

/// `q`: `[n_heads, t, d]` for the `t` newest tokens, whose keys are already the last `t` rows of
/// every head of `layer`. Returns `[n_heads, t, d]`.
pub fn attend(q: &Tensor, layer: &LayerCache, scale: f64) -> Result<Tensor> {
    if let Some(out) = crate::attention_cpu::attend(q, layer, scale)? {
        return Ok(out);
    }
    // Off the CPU every op is a kernel launch: one batched GEMM pair for all heads of a packed
    // layer instead of ~8 ops per head. (On the CPU the per-head loop goes through BLAS.)
    if !q.device().is_cpu() {
        if let Some((k, v)) = layer.packed() {
            return attend_packed(q, &k, &v, scale);
        }
    }
    attend_gemm(q, layer, scale)
}

/// Attention over a packed layer: `k`, `v` `[n_kv, n, d]` (strided views of the layer's
/// buffers), every head the same length and no bias. Candle ops only, so every backend runs it.
pub fn attend_packed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let t = q.dim(1)?;
    #[cfg(feature = "cuda")]
    if t > 1 && crate::fused::available(q) {
        return attend_causal_fused(q, k, v, scale);
    }
    let mask = if t > 1 {
        Some(causal_mask(t, k.dim(1)?, q.device())?)
    } else {
        None
    };
    attend_masked(q, k, v, scale, mask.as_ref())
}

/// [`attend_packed`] with an explicit additive f32 `mask` `[t, n]` (None: every key visible).
/// The static decode step passes a mask computed on the device, so the same launches serve
/// every cache length up to `n` (see `decode_graph`).
pub fn attend_masked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (n_heads, t, d) = q.dims3()?;
    let (n_kv, n, _) = k.dims3()?;
    let g = n_heads / n_kv;
    // Query heads h*g..(h+1)*g share KV head h: stacking them as rows keeps GQA copy-free.
    let q = (q * scale)?.reshape((n_kv, g * t, d))?;
    let mut logits = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    if let Some(mask) = mask {
        logits = logits
            .reshape((n_kv, g, t, n))?
            .broadcast_add(mask)?
            .reshape((n_kv, g * t, n))?;
    }
    let p = candle_nn::ops::softmax_last_dim(&logits)?.to_dtype(v.dtype())?;
    Ok(p.matmul(v)?.reshape((n_heads, t, d))?)
}

/// [`attend_packed`] for a prefill chunk on CUDA: the two products in the model dtype and one
/// kernel for the causal softmax in place over their logits (f32 math), instead of an f32 copy
/// of the logits, a mask add, a softmax and a cast back (on an H200 those four were 83% of an
/// 8k-token prefill; docs/gpu.md).
#[cfg(feature = "cuda")]
fn attend_causal_fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (n_heads, t, d) = q.dims3()?;
    let n_kv = k.dim(0)?;
    let g = n_heads / n_kv;
    let q = (q * scale)?.reshape((n_kv, g * t, d))?;
    let logits = q.matmul(&k.t()?)?;
    crate::fused::causal_softmax(&logits, t)?;
    Ok(logits.matmul(v)?.reshape((n_heads, t, d))?)
}

/// The GEMM formulation (prefill chunks, GPU): candle ops only, so every backend runs it.
pub fn attend_gemm(q: &Tensor, layer: &LayerCache, scale: f64) -> Result<Tensor> {
    let (n_heads, t, d) = q.dims3()?;
    // Scaling q ([heads, t, d]) is cheaper than scaling every logit ([g*t, n] per head).
    let q = (q * scale)?;
    let n_kv = layer.heads.len();
    let g = n_heads / n_kv;
    let mut mask: Option<(usize, Tensor)> = None;
    let mut outs = Vec::with_capacity(n_kv);
    for (h, head) in layer.heads.iter().enumerate() {
        let n = head.len();
        let qg = q.narrow(0, h * g, g)?.reshape((g * t, d))?;
        let k = head.keys()?;
        let v = head.values()?;
        let mut logits = mm(&qg, &k, true)?
            .to_dtype(DType::F32)?
            .reshape((g, t, n))?;
        if t > 1 {
            // Heads may differ in length after compaction; rebuild the mask only when needed.
            if mask.as_ref().is_none_or(|(len, _)| *len != n) {
                mask = Some((n, causal_mask(t, n, q.device())?));
            }
            logits = logits.broadcast_add(&mask.as_ref().unwrap().1)?;
        }
        if head.has_bias() {
            logits = logits.broadcast_add(&head.bias()?)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&logits)?.to_dtype(v.dtype())?;
        let out = mm(&p.reshape((g * t, n))?, &v, false)?;
        outs.push(out.reshape((g, t, d))?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

/// `a @ b` (`b_t`: `a @ b^T`), through BLAS when one is loaded.
fn mm(a: &Tensor, b: &Tensor, b_t: bool) -> Result<Tensor> {
    if let Some(y) = crate::blas::matmul(a, b, b_t)? {
        return Ok(y);
    }
    Ok(if b_t {
        a.matmul(&b.t()?)?
    } else {
        a.matmul(b)?
    })
}

/// `[t, n]` additive mask: query `i` (the `n - t + i`-th key) sees keys `0..=n - t + i`.
/// Built on the device from two index vectors: on a GPU, a mask built on the host cost one
/// `t x n` upload per layer and chunk (most of an 8k-token prefill's time).
pub fn causal_mask(t: usize, n: usize, device: &candle_core::Device) -> Result<Tensor> {
    let offset = (n - t) as u32;
    let last_seen = Tensor::arange(offset, offset + t as u32, device)?.reshape((t, 1))?;
    let keys = Tensor::arange(0u32, n as u32, device)?.reshape((1, n))?;
    let hidden = keys.broadcast_gt(&last_seen)?;
    let neg = Tensor::new(f32::NEG_INFINITY, device)?.broadcast_as((t, n))?;
    let zero = Tensor::new(0f32, device)?.broadcast_as((t, n))?;
    Ok(hidden.where_cond(&neg, &zero)?)
}

/// Plain reference: explicit per-query-head loop with repeated K/V, used by the tests to check
/// [`attend`] on hand-built ragged, biased caches.
pub fn attend_reference(q: &Tensor, layer: &LayerCache, scale: f64) -> Result<Tensor> {
    let (n_heads, t, _) = q.dims3()?;
    let g = n_heads / layer.heads.len();
    let mut outs = Vec::new();
    for qh in 0..n_heads {
        let head = &layer.heads[qh / g];
        let n = head.len();
        let k = head.keys()?.to_dtype(DType::F32)?;
        let v = head.values()?.to_dtype(DType::F32)?;
        let b = head.bias()?;
        let mut rows = Vec::new();
        for i in 0..t {
            let qi = q.get(qh)?.get(i)?.to_dtype(DType::F32)?.unsqueeze(0)?;
            let visible = n - t + i + 1;
            let s = (qi.matmul(&k.narrow(0, 0, visible)?.t()?)? * scale)?
                .broadcast_add(&b.narrow(0, 0, visible)?.unsqueeze(0)?)?;
            let p = candle_nn::ops::softmax(&s, D::Minus1)?;
            rows.push(p.matmul(&v.narrow(0, 0, visible)?)?);
        }
        outs.push(Tensor::cat(&rows, 0)?.unsqueeze(0)?);
    }
    Ok(Tensor::cat(&outs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KvCache;
    use candle_core::Device;

    /// A cache whose heads have different lengths and hand-set biases, then new tokens appended
    /// (bias 0) as in decode after compaction: `attend` must equal the plain reference.
    #[test]
    fn ragged_biased_cache_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let (n_kv, g, d) = (3, 2, 8);
        let mut cache = KvCache::new(1, n_kv, d, DType::F32, &dev)?;
        for (h, n) in [5usize, 17, 1].into_iter().enumerate() {
            let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
            let b = Tensor::randn(0f32, 2.0, n, &dev)?;
            cache.replace_head(0, h, &k, &v, Some(&b))?;
        }
        for t in [4usize, 1] {
            let k = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
            cache.append(0, &k, &v)?;
            let q = Tensor::randn(0f32, 1.0, (n_kv * g, t, d), &dev)?;
            let got = attend_gemm(&q, &cache.layers[0], 0.35)?;
            let want = attend_reference(&q, &cache.layers[0], 0.35)?;
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "t={t}: max abs error {err}");
        }
        assert_eq!(cache.tokens_per_head(), vec![vec![10, 22, 6]]);
        Ok(())
    }

    /// A packed layer (heads are views of one buffer, grown twice) through the batched path
    /// equals the plain reference, for a prefill chunk and a decode step.
    #[test]
    fn packed_layer_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let (n_kv, g, d) = (2, 3, 8);
        let mut cache = KvCache::new(1, n_kv, d, DType::F32, &dev)?;
        for t in [50usize, 30, 4, 1] {
            let k = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (n_kv, t, d), &dev)?;
            cache.append(0, &k, &v)?;
            let (pk, pv) = cache.layers[0].packed().expect("a fresh layer is packed");
            assert_eq!(pk.dims(), [n_kv, cache.head(0, 0).len(), d]);
            let q = Tensor::randn(0f32, 1.0, (n_kv * g, t, d), &dev)?;
            let got = attend_packed(&q, &pk, &pv, 0.35)?;
            let want = attend_reference(&q, &cache.layers[0], 0.35)?;
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "t={t}: max abs error {err}");
        }
        assert_eq!(cache.head(0, 1).capacity(), 128);
        // Replacing a head makes the layer ragged: no packed view any more.
        let k = cache.head(0, 0).keys()?.narrow(0, 0, 3)?;
        cache.replace_head(0, 0, &k, &k, None)?;
        assert!(cache.layers[0].packed().is_none());
        Ok(())
    }

    #[test]
    fn causal_mask_hides_only_later_keys() -> Result<()> {
        let m = causal_mask(2, 4, &Device::Cpu)?.to_vec2::<f32>()?;
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![vec![0., 0., 0., inf], vec![0., 0., 0., 0.]]);
        Ok(())
    }

    #[test]
    fn bias_shifts_attention_like_log_weights() -> Result<()> {
        // A bias of log(2) on one of two identical keys doubles its weight: p = (2/3, 1/3).
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 1, 2, DType::F32, &dev)?;
        let k = Tensor::new(&[[1f32, 0.], [1., 0.]], &dev)?;
        let v = Tensor::new(&[[3f32, 0.], [0., 3.]], &dev)?;
        let b = Tensor::new(&[2f32.ln(), 0.0], &dev)?;
        cache.replace_head(0, 0, &k, &v, Some(&b))?;
        let q = Tensor::new(&[[[0.5f32, 0.5]]], &dev)?;
        // A single query over 2 keys with t=1: it sees both (it is not one of them, but the
        // mask only applies for t > 1).
        let out = attend(&q, &cache.layers[0], 1.0)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(
            (out[0] - 2.0).abs() < 1e-6 && (out[1] - 1.0).abs() < 1e-6,
            "{out:?}"
        );
        Ok(())
    }
}
