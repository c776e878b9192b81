//! CPU attention for a few new tokens (decode): per KV head, one pass over its raw K/V rows,
//! logits and softmax in f32, K/V read in their stored dtype. Replaces ~10 candle ops per head
//! (each allocating, and the GEMM packing K and V) with one fused loop; heads run in parallel.
//! A quantized head's older tokens are read as codes, group by group ([`QuantRows`]); only its
//! newest `< group` tokens are full-precision rows.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::cache::{HeadCache, LayerCache};
use crate::error::Result;
use crate::gemv::{dot_generic, Widen};
use crate::kv_quant::QuantRows;

#[cfg(target_arch = "x86_64")]
mod grouped;

/// Largest number of new tokens served by this kernel; longer chunks use the GEMM path.
pub const MAX_NEW_TOKENS: usize = 8;

/// Same contract as [`crate::attention::attend`]; `None` when this kernel does not apply.
pub fn attend(q: &Tensor, layer: &LayerCache, scale: f64) -> Result<Option<Tensor>> {
    let (nh, t, d) = q.dims3()?;
    if !q.device().is_cpu() || t > MAX_NEW_TOKENS {
        return Ok(None);
    }
    let n_kv = layer.heads.len();
    let g = nh / n_kv;
    let qf = q.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    #[cfg(target_arch = "x86_64")]
    if t == 1 && d % 32 == 0 && crate::gemv::simd() && grouped::enabled() {
        if let Some(out) = grouped::attend(&qf, layer, g, d, scale as f32)? {
            return Ok(Some(
                Tensor::from_vec(out, (nh, t, d), q.device())?.to_dtype(q.dtype())?,
            ));
        }
    }
    let mut out = vec![0f32; nh * t * d];
    // One task per KV head when there are enough of them for the pool, else one per query head
    // (re-reading the shared K/V from cache): SmolLM2's 3 KV heads on 2 threads left one idle
    // for a third of the attention time.
    let per = if n_kv >= 2 * rayon::current_num_threads() {
        g
    } else {
        1
    };
    out.par_chunks_mut(per * t * d)
        .enumerate()
        .try_for_each(|(i, o)| {
            let rows = &qf[i * per * t * d..(i + 1) * per * t * d];
            head_attend(rows, &layer.heads[i * per / g], t, d, scale as f32, o)
        })?;
    Ok(Some(
        Tensor::from_vec(out, (nh, t, d), q.device())?.to_dtype(q.dtype())?,
    ))
}

/// A head's full-precision keys and values as stored.
pub(crate) enum Rows<'a> {
    F32(&'a [f32], &'a [f32]),
    BF16(&'a [half::bf16], &'a [half::bf16]),
    F16(&'a [half::f16], &'a [half::f16]),
}

/// Calls `f` with `head`'s dense key/value rows and its live bias (None when all zero).
pub(crate) fn with_rows<R>(
    head: &HeadCache,
    f: impl FnOnce(Rows<'_>, Option<&[f32]>) -> R,
) -> Result<R> {
    let n = head.len();
    let bias_t = head.bias()?;
    let (bs, bl) = bias_t.storage_and_layout();
    let b = match (&*bs, head.has_bias()) {
        (_, false) => None,
        (Storage::Cpu(CpuStorage::F32(b)), true) => Some(&b[bl.start_offset()..][..n]),
        _ => return Err(candle_core::Error::Msg("cpu attention: bias is not f32".into()).into()),
    };
    let (k, v) = (head.dense_keys()?, head.dense_values()?);
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (k0, v0) = (kl.start_offset(), vl.start_offset());
    let m = head.dense_len() * k.dim(1)?;
    let rows = match (&*ks, &*vs) {
        (Storage::Cpu(CpuStorage::F32(k)), Storage::Cpu(CpuStorage::F32(v))) => {
            Rows::F32(&k[k0..k0 + m], &v[v0..v0 + m])
        }
        (Storage::Cpu(CpuStorage::BF16(k)), Storage::Cpu(CpuStorage::BF16(v))) => {
            Rows::BF16(&k[k0..k0 + m], &v[v0..v0 + m])
        }
        (Storage::Cpu(CpuStorage::F16(k)), Storage::Cpu(CpuStorage::F16(v))) => {
            Rows::F16(&k[k0..k0 + m], &v[v0..v0 + m])
        }
        _ => {
            return Err(
                candle_core::Error::Msg("cpu attention: unsupported cache storage".into()).into(),
            )
        }
    };
    Ok(f(rows, b))
}

/// `q`: `t` query rows of one or more query heads of the group (head-major), `out`: same shape.
fn head_attend(
    q: &[f32],
    head: &HeadCache,
    t: usize,
    d: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let quant = head.quantized().filter(|q| !q.is_empty());
    with_rows(head, |rows, bias| {
        let args = Args {
            t,
            d,
            n: head.len(),
            scale,
            bias,
            quant,
        };
        match rows {
            Rows::F32(k, v) => dispatch(&args, q, k, v, out),
            Rows::BF16(k, v) => dispatch(&args, q, k, v, out),
            Rows::F16(k, v) => dispatch(&args, q, k, v, out),
        }
    })
}

struct Args<'a> {
    t: usize,
    d: usize,
    n: usize,
    scale: f32,
    bias: Option<&'a [f32]>,
    /// The head's quantized older tokens (`k`, `v` then hold only the rest).
    quant: Option<&'a QuantRows>,
}

fn dispatch<W: Widen>(a: &Args, q: &[f32], k: &[W], v: &[W], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were just detected on this CPU.
            return unsafe { kernel_avx2(a, q, k, v, out) };
        }
    }
    kernel(a, q, k, v, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<W: Widen>(a: &Args, q: &[f32], k: &[W], v: &[W], out: &mut [f32]) {
    kernel(a, q, k, v, out)
}

#[inline(always)]
fn kernel<W: Widen>(a: &Args, q: &[f32], k: &[W], v: &[W], out: &mut [f32]) {
    let (t, d, n) = (a.t, a.d, a.n);
    // Tokens 0..nq are quantized, nq..n are the full-precision rows of `k`, `v`.
    let nq = a.quant.map_or(0, QuantRows::len);
    let mut s = vec![0f32; n];
    for (r, (qr, or)) in q.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
        // Rows are [query head][token]; token i sees the old keys and new keys 0..=i.
        let visible = n - t + r % t + 1;
        if let Some(qk) = a.quant {
            qk.logits(qr, a.scale, &mut s[..nq]);
        }
        // (With t > 1 the newest tokens may already sit in a quantized group: lo < nq.)
        let lo = nq.min(visible);
        for (j, sj) in s[lo..visible].iter_mut().enumerate() {
            *sj = dot_generic(qr, &k[j * d..(j + 1) * d]) * a.scale;
        }
        let mut max = f32::NEG_INFINITY;
        for (j, x) in s[..visible].iter_mut().enumerate() {
            if let Some(b) = a.bias {
                *x += b[j];
            }
            max = max.max(*x);
        }
        let mut sum = 0f32;
        for x in &mut s[..visible] {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in &mut s[..visible] {
            *x *= inv;
        }
        or.fill(0.0);
        if let Some(qv) = a.quant {
            qv.accumulate_values(&s[..visible.min(nq)], or);
        }
        for (j, &p) in s[lo..visible].iter().enumerate() {
            for (o, &x) in or.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *o += p * x.widen();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KvCache;
    use candle_core::Device;

    #[test]
    fn matches_reference_on_ragged_biased_cache() -> Result<()> {
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::BF16] {
            let mut cache = KvCache::new(1, 2, 16, dt, &dev)?;
            for (h, n) in [7usize, 40].into_iter().enumerate() {
                let k = Tensor::randn(0f32, 1.0, (n, 16), &dev)?;
                let v = Tensor::randn(0f32, 1.0, (n, 16), &dev)?;
                let b = Tensor::randn(0f32, 1.0, n, &dev)?;
                cache.replace_head(0, h, &k, &v, Some(&b))?;
            }
            for t in [3usize, 1] {
                let k = Tensor::randn(0f32, 1.0, (2, t, 16), &dev)?.to_dtype(dt)?;
                cache.append(0, &k, &k)?;
                let q = Tensor::randn(0f32, 1.0, (6, t, 16), &dev)?.to_dtype(dt)?;
                let got = attend(&q, &cache.layers[0], 0.25)?
                    .unwrap()
                    .to_dtype(DType::F32)?;
                let want = crate::attention::attend_reference(&q, &cache.layers[0], 0.25)?;
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let tol = if dt == DType::F32 { 1e-5 } else { 2e-2 };
                assert!(err < tol, "{dt:?} t={t}: {err}");
            }
        }
        Ok(())
    }

    /// A quantized cache (groups of codes + a full-precision residual, compacted heads
    /// re-quantized, new tokens crossing a group boundary) through the fused kernel equals the
    /// plain reference over the dequantized rows.
    #[test]
    fn quantized_cache_matches_reference_on_dequantized_rows() -> Result<()> {
        let dev = Device::Cpu;
        for name in crate::kv_quant::KV_DTYPES {
            let mut cache = KvCache::new(1, 2, 16, DType::F32, &dev)?;
            cache.set_quant(Some(crate::kv_quant::KvQuant::parse(name)?))?;
            let k = Tensor::randn(0f32, 1.0, (2, 90, 16), &dev)?;
            cache.append(0, &k, &(&k * 0.5)?)?;
            cache.settle(0)?;
            // Head 1 compacted to 70 rows with biases: quantized whole (groups 32, 32, 6).
            let kk = Tensor::randn(0f32, 1.0, (70, 16), &dev)?;
            let b = Tensor::randn(0f32, 1.0, 70, &dev)?;
            cache.replace_head(0, 1, &kk, &kk, Some(&b))?;
            assert_eq!(cache.head(0, 1).dense_len(), 0);
            for t in [1usize, 8, 1] {
                // 90 -> 91 -> 99 (a group fills inside the chunk: its tokens see each other
                // exact, the next step sees them quantized) -> 100
                let k = Tensor::randn(0f32, 1.0, (2, t, 16), &dev)?;
                cache.append(0, &k, &k)?;
                let q = Tensor::randn(0f32, 1.0, (6, t, 16), &dev)?;
                let got = attend(&q, &cache.layers[0], 0.25)?.unwrap();
                let want = crate::attention::attend_reference(&q, &cache.layers[0], 0.25)?;
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-4, "{name} t={t}: {err}");
                cache.settle(0)?;
            }
            assert_eq!(cache.head(0, 0).dense_len(), 100 - 96);
        }
        Ok(())
    }
}
