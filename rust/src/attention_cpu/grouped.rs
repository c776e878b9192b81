//! CPU decode attention (one new token) by KV head: the `g` query heads that share a KV head
//! read its keys and values in one pass, and each head's keys are split into ranges so every
//! thread has work when KV heads are few (SmolLM2: 3 KV heads on 2 threads). Ranges give partial
//! softmax results (max, sum, unnormalised output) that are merged per head.
//!
//! Why: profiled on SmolLM2-135M Q4_0 decode at 512-1000 tokens, the per-query-head kernel took
//! 32% of the time (the weights' products 38%): each of a group's query heads re-read the
//! group's f32 keys and values, one horizontal sum per key. Here a block of 4 keys is loaded once
//! for all `g` queries and reduced with one 4-way sum, and values are accumulated for up to 3
//! queries per pass with the outputs held in registers.
//!
//! x86-64 only (the module is compiled there alone). Serves full-precision heads (f32/bf16/f16 rows, any bias) with `head_dim % 32 == 0` on
//! AVX2/FMA/F16C; otherwise (quantized heads, other CPUs) the caller keeps the per-head kernel.

use rayon::prelude::*;

use super::{with_rows, Rows};
use crate::cache::LayerCache;
use crate::error::Result;
use crate::gemv::Widen;

/// Whether this path is on (`KVFAST_GROUPED_ATTENTION=0` keeps the per-head kernel, to compare).
/// Read once: this runs per layer and token.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("KVFAST_GROUPED_ATTENTION").map_or(true, |v| v != "0"))
}

/// Fewest keys per range: below this, splitting costs more than it balances.
const MIN_RANGE: usize = 128;

/// One key range's softmax pieces for the `g` queries of a KV head.
struct Partial {
    /// Per query: max logit, sum of `exp(logit - max)`.
    m: Vec<f32>,
    l: Vec<f32>,
    /// `[g, d]`: sum of `exp(logit - max) * value`.
    o: Vec<f32>,
}

/// `q` `[g * n_kv, d]` (query heads in order) -> attention outputs, same shape. None when a
/// head is quantized (the per-head kernel reads codes).
pub fn attend(
    q: &[f32],
    layer: &LayerCache,
    g: usize,
    d: usize,
    scale: f32,
) -> Result<Option<Vec<f32>>> {
    let n_kv = layer.heads.len();
    if layer
        .heads
        .iter()
        .any(|h| h.quantized().is_some_and(|q| !q.is_empty()))
    {
        return Ok(None);
    }
    let qs: Vec<f32> = q.iter().map(|x| x * scale).collect();
    let threads = rayon::current_num_threads();
    let tasks: Vec<(usize, usize, usize)> = (0..n_kv)
        .flat_map(|h| {
            let n = layer.heads[h].len();
            let parts = (2 * threads).div_ceil(n_kv).min(n / MIN_RANGE).max(1);
            let step = n.div_ceil(parts).max(1);
            (0..n)
                .step_by(step)
                .map(move |lo| (h, lo, (lo + step).min(n)))
        })
        .collect();
    let partials = tasks
        .par_iter()
        .map(|&(h, lo, hi)| range_partial(layer, h, lo, hi, &qs[h * g * d..(h + 1) * g * d], g, d))
        .collect::<Result<Vec<_>>>()?;
    let mut out = vec![0f32; n_kv * g * d];
    for (h, o) in out.chunks_exact_mut(g * d).enumerate() {
        let parts: Vec<&Partial> = tasks
            .iter()
            .zip(&partials)
            .filter(|((th, _, _), _)| *th == h)
            .map(|(_, p)| p)
            .collect();
        merge(&parts, g, d, o);
    }
    Ok(Some(out))
}

/// Softmax-merges the ranges of one head into `out` `[g, d]`.
fn merge(parts: &[&Partial], g: usize, d: usize, out: &mut [f32]) {
    for r in 0..g {
        let m = parts
            .iter()
            .map(|p| p.m[r])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[r * d..(r + 1) * d];
        if m == f32::NEG_INFINITY {
            continue; // an empty head: zeros, as the per-head kernel gives
        }
        let mut l = 0f32;
        for p in parts {
            if p.l[r] == 0.0 {
                continue;
            }
            let w = (p.m[r] - m).exp();
            l += p.l[r] * w;
            for (a, b) in o.iter_mut().zip(&p.o[r * d..(r + 1) * d]) {
                *a += b * w;
            }
        }
        let inv = 1.0 / l;
        o.iter_mut().for_each(|x| *x *= inv);
    }
}

fn range_partial(
    layer: &LayerCache,
    h: usize,
    lo: usize,
    hi: usize,
    q: &[f32],
    g: usize,
    d: usize,
) -> Result<Partial> {
    with_rows(&layer.heads[h], |rows, bias| {
        let bias = bias.map(|b| &b[lo..hi]);
        // SAFETY: the caller checked AVX2/FMA/F16C (`gemv::simd`) and d % 32 == 0.
        unsafe {
            match rows {
                Rows::F32(k, v) => {
                    partial_avx2(q, &k[lo * d..hi * d], &v[lo * d..hi * d], bias, g, d)
                }
                Rows::BF16(k, v) => {
                    partial_avx2(q, &k[lo * d..hi * d], &v[lo * d..hi * d], bias, g, d)
                }
                Rows::F16(k, v) => {
                    partial_avx2(q, &k[lo * d..hi * d], &v[lo * d..hi * d], bias, g, d)
                }
            }
        }
    })
}

/// One key range for the `g` (pre-scaled) queries `q` `[g, d]`; `k`, `v` `[n, d]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn partial_avx2<W: Widen>(
    q: &[f32],
    k: &[W],
    v: &[W],
    bias: Option<&[f32]>,
    g: usize,
    d: usize,
) -> Partial {
    use std::arch::x86_64::*;
    let n = k.len() / d;
    // Logits [g, n], four keys per pass: the four rows stay in L1 for every query, and one
    // 4-way horizontal sum replaces four.
    let mut s = vec![0f32; g * n];
    let mut j = 0;
    while j + 4 <= n {
        let kp = k.as_ptr().add(j * d);
        for r in 0..g {
            let qp = q.as_ptr().add(r * d);
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..d).step_by(8) {
                let x = _mm256_loadu_ps(qp.add(c));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(x, W::load8(kp.add(i * d + c)), *a);
                }
            }
            _mm_storeu_ps(s.as_mut_ptr().add(r * n + j), hsum4(acc));
        }
        j += 4;
    }
    for jj in j..n {
        for r in 0..g {
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                let x = _mm256_loadu_ps(q.as_ptr().add(r * d + c));
                acc = _mm256_fmadd_ps(x, W::load8(k.as_ptr().add(jj * d + c)), acc);
            }
            s[r * n + jj] = crate::gemv::hsum(acc);
        }
    }
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; g], vec![0f32; g]);
    for r in 0..g {
        let row = &mut s[r * n..(r + 1) * n];
        if let Some(b) = bias {
            row.iter_mut().zip(b).for_each(|(x, b)| *x += b);
        }
        m[r] = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for x in row.iter_mut() {
            *x = (*x - m[r]).exp();
            l[r] += *x;
        }
    }
    let mut o = vec![0f32; g * d];
    let mut r = 0;
    while r < g {
        match g - r {
            1 => values::<W, 1>(&s, v, n, d, r, &mut o),
            2 => values::<W, 2>(&s, v, n, d, r, &mut o),
            _ => values::<W, 3>(&s, v, n, d, r, &mut o),
        }
        r += 3;
    }
    Partial { m, l, o }
}

/// `o[r0 + i] = sum_j p[r0 + i][j] * v_j` for `R` queries, 32 output columns per pass with the
/// `R x 4` accumulators in registers.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values<W: Widen, const R: usize>(
    p: &[f32],
    v: &[W],
    n: usize,
    d: usize,
    r0: usize,
    o: &mut [f32],
) {
    use std::arch::x86_64::*;
    for c in (0..d).step_by(32) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for j in 0..n {
            let vp = v.as_ptr().add(j * d + c);
            let vv = [
                W::load8(vp),
                W::load8(vp.add(8)),
                W::load8(vp.add(16)),
                W::load8(vp.add(24)),
            ];
            for (i, a) in acc.iter_mut().enumerate() {
                let w = _mm256_set1_ps(*p.get_unchecked((r0 + i) * n + j));
                for (ai, x) in a.iter_mut().zip(&vv) {
                    *ai = _mm256_fmadd_ps(w, *x, *ai);
                }
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (b, x) in a.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add((r0 + i) * d + c + 8 * b), *x);
            }
        }
    }
}

/// The lane sums of four vectors, in order.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum4(a: [std::arch::x86_64::__m256; 4]) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KvCache;
    use candle_core::{DType, Device, Tensor};

    /// Largest difference between this path and the plain reference for random queries
    /// (`g` per KV head) over layer 0 of `cache`.
    fn error_vs_reference(cache: &KvCache, g: usize) -> Result<f32> {
        if !crate::gemv::simd() {
            return Err(crate::error::Error::invalid("this CPU lacks AVX2/FMA/F16C"));
        }
        let (n_kv, d) = (cache.n_kv_heads(), cache.head_dim());
        let q = Tensor::randn(0f32, 1.0, (n_kv * g, 1, d), &Device::Cpu)?;
        let qf = q.flatten_all()?.to_vec1::<f32>()?;
        let got = attend(&qf, &cache.layers[0], g, d, 0.125)?.expect("dense heads");
        let want = crate::attention::attend_reference(&q, &cache.layers[0], 0.125)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max))
    }

    /// Ragged, biased heads of every length class (< 4 keys, not a multiple of 4, split into
    /// ranges) in each stored dtype and group size: equal to the plain reference.
    #[test]
    fn matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        let d = 64;
        for (dt, tol) in [(DType::F32, 1e-5), (DType::BF16, 2e-2), (DType::F16, 5e-3)] {
            for g in [1usize, 2, 3, 4, 7] {
                let mut cache = KvCache::new(1, 3, d, dt, &dev)?;
                for (h, n) in [2usize, 1001, 300].into_iter().enumerate() {
                    let k = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
                    let v = Tensor::randn(0f32, 1.0, (n, d), &dev)?;
                    let b = Tensor::randn(0f32, 1.0, n, &dev)?;
                    cache.replace_head(0, h, &k, &v, Some(&b))?;
                }
                let k = Tensor::randn(0f32, 1.0, (3, 1, d), &dev)?.to_dtype(dt)?;
                cache.append(0, &k, &k)?;
                let err = error_vs_reference(&cache, g)?;
                assert!(err < tol, "{dt:?} g={g}: {err}");
            }
        }
        Ok(())
    }

    /// A packed layer (heads are views of one buffer pair, as prefill leaves them).
    #[test]
    fn matches_reference_on_packed_layer() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 3, 64, DType::F32, &dev)?;
        for t in [512usize, 1, 1] {
            let k = Tensor::randn(0f32, 1.0, (3, t, 64), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (3, t, 64), &dev)?;
            cache.append(0, &k, &v)?;
        }
        let err = error_vs_reference(&cache, 3)?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }
}
