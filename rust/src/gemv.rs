//! CPU kernel for `y = x W^T` when `x` has only a few rows (decode, short chunks).
//!
//! candle's CPU matmul (the `gemm` crate) packs the right-hand matrix on every call: for one
//! decode token that copies every weight matrix once per step and dominated decode time in
//! profiles. Here each output row is a dot product over a contiguous weight row, so the weights
//! are streamed exactly once per call, split across threads by output rows.

use candle_core::{CpuStorage, DType, Layout, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::Result;

/// Up to this many input rows the kernel beats the packed GEMM (each weight row is reused from
/// L1 for all input rows).
pub const MAX_ROWS: usize = 8;

/// Output rows per parallel task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 64;

/// `x [m, k]` f32 (m <= MAX_ROWS) times `w [n, k]` (f32/bf16/f16, contiguous) transposed: `[m, n]` f32.
pub fn matmul_xwt(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (m, k) = x.dims2()?;
    let (n, k2) = w.dims2()?;
    if !x.device().is_cpu() || m > MAX_ROWS || k != k2 || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let xs = cpu_f32(&x)?;
    let (w_storage, w_layout) = w.storage_and_layout();
    let (o1, o2) = match w_layout.contiguous_offsets() {
        Some(o) => o,
        None => return Ok(None),
    };
    let out = match &*w_storage {
        candle_core::Storage::Cpu(CpuStorage::F32(ws)) => run(&xs, &ws[o1..o2], m, n, k),
        candle_core::Storage::Cpu(CpuStorage::BF16(ws)) => run(&xs, &ws[o1..o2], m, n, k),
        candle_core::Storage::Cpu(CpuStorage::F16(ws)) => run(&xs, &ws[o1..o2], m, n, k),
        _ => return Ok(None),
    };
    // Output is [m, n] row-major: out[i * n + j].
    Ok(Some(Tensor::from_vec(out, (m, n), x.device())?))
}

fn cpu_f32(x: &Tensor) -> Result<Vec<f32>> {
    let (s, l): (_, &Layout) = x.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            let (a, b) = l.contiguous_offsets().expect("contiguous");
            Ok(v[a..b].to_vec())
        }
        _ => Ok(x.flatten_all()?.to_vec1::<f32>()?),
    }
}

/// A weight element the kernels can widen to f32.
pub(crate) trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
    /// Loads 8 elements at `p` as f32 lanes.
    ///
    /// # Safety
    /// `p..p+8` must be readable and the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: zero-extend to 32 bits and shift into place.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Whether this CPU runs the AVX2/FMA/F16C kernels (ours in `gemv` and `qgemv`).
pub(crate) fn simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn run<W: Widen>(x: &[f32], w: &[W], m: usize, n: usize, k: usize) -> Vec<f32> {
    // Work on the transposed output [n, m] so each task owns a contiguous slice, then scatter.
    let use_simd = simd();
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(ROWS_PER_TASK * m)
        .enumerate()
        .for_each(|(task, chunk)| {
            let row0 = task * ROWS_PER_TASK;
            let rows = chunk.len() / m;
            let w = &w[row0 * k..(row0 + rows) * k];
            #[cfg(target_arch = "x86_64")]
            if use_simd {
                // SAFETY: features detected above; slices are sized rows x k and m x k.
                unsafe { rows_avx2(x, w, m, k, chunk) };
                return;
            }
            let _ = use_simd;
            for (r, ys) in chunk.chunks_mut(m).enumerate() {
                for (i, y) in ys.iter_mut().enumerate() {
                    *y = dot_generic(&x[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]);
                }
            }
        });
    untranspose(t, m, n)
}

/// The kernels' output `t` `[n, m]` (transposed so each task owns a contiguous run of weight
/// rows) as `[m, n]` row-major; for one row of `x` it already is.
pub(crate) fn untranspose(t: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    if m == 1 {
        return t;
    }
    // Blocks of 32 output rows in parallel, each filled in 32-column tiles so reads and writes
    // both stay in cache (the plain double loop was 8.5% of a GGUF prefill, on one thread).
    const B: usize = 32;
    let mut out = vec![0f32; m * n];
    out.par_chunks_mut(B * n)
        .enumerate()
        .for_each(|(bi, rows)| {
            let (i0, nr) = (bi * B, rows.len() / n);
            for j0 in (0..n).step_by(B) {
                for j in j0..(j0 + B).min(n) {
                    let col = &t[j * m + i0..j * m + i0 + nr];
                    for (i, &x) in col.iter().enumerate() {
                        rows[i * n + j] = x;
                    }
                }
            }
        });
    out
}

/// Sum of the 8 lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

/// `out[r * m + i] = x_i . w_r` for the rows of `w`, four weight rows at a time so each x
/// vector load feeds four FMAs and four independent streams keep the prefetchers busy.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<W: Widen>(x: &[f32], w: &[W], m: usize, k: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let rows = w.len() / k;
    let k8 = k / 8 * 8;
    let mut r = 0;
    while r < rows {
        let nr = (rows - r).min(4);
        for i in 0..m {
            let xi = x.as_ptr().add(i * k);
            let mut acc = [_mm256_setzero_ps(); 4];
            let wp: [*const W; 4] =
                std::array::from_fn(|j| w.as_ptr().add((r + j.min(nr - 1)) * k));
            let mut c = 0;
            while c < k8 {
                let xv = _mm256_loadu_ps(xi.add(c));
                for j in 0..4 {
                    acc[j] = _mm256_fmadd_ps(xv, W::load8(wp[j].add(c)), acc[j]);
                }
                c += 8;
            }
            for j in 0..nr {
                let mut y = hsum(acc[j]);
                for cc in k8..k {
                    y += *xi.add(cc) * (*wp[j].add(cc)).widen();
                }
                out[(r + j) * m + i] = y;
            }
        }
        r += nr;
    }
}

/// Portable dot product; 32 independent lanes so the compiler vectorises without
/// reassociating floats.
#[inline(always)]
pub(crate) fn dot_generic<W: Widen>(x: &[f32], w: &[W]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let xc = x.chunks_exact(L);
    let wc = w.chunks_exact(L);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (xa, wa) in xc.zip(wc) {
        for l in 0..L {
            acc[l] += xa[l] * wa[l].widen();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(wr) {
        s += a * b.widen();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_matmul_for_each_weight_dtype() -> Result<()> {
        let dev = Device::Cpu;
        for (m, n, k) in [(1usize, 130usize, 77usize), (3, 64, 256), (8, 1000, 40)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let wd = w.to_dtype(dt)?;
                let want = x.matmul(&wd.to_dtype(DType::F32)?.t()?)?;
                let got = matmul_xwt(&x, &wd)?.expect("kernel applies");
                let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-3, "{m}x{n}x{k} {dt:?}: {err}");
            }
        }
        assert!(matmul_xwt(
            &Tensor::zeros((9, 4), DType::F32, &dev)?,
            &Tensor::zeros((2, 4), DType::F32, &dev)?
        )?
        .is_none());
        Ok(())
    }
}
