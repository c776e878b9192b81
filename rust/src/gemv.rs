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
    let mut out = vec![0f32; m * n];
    match &*w_storage {
        candle_core::Storage::Cpu(CpuStorage::F32(ws)) => run(&xs, &ws[o1..o2], m, n, k, &mut out, |v| v),
        candle_core::Storage::Cpu(CpuStorage::BF16(ws)) => run(&xs, &ws[o1..o2], m, n, k, &mut out, bf16::to_f32),
        candle_core::Storage::Cpu(CpuStorage::F16(ws)) => run(&xs, &ws[o1..o2], m, n, k, &mut out, f16::to_f32),
        _ => return Ok(None),
    }
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

fn run<W: Copy + Send + Sync>(
    x: &[f32],
    w: &[W],
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    cvt: impl Fn(W) -> f32 + Sync + Copy,
) {
    // Work on the transposed output [n, m] so each task owns a contiguous slice, then scatter.
    let mut t = vec![0f32; n * m];
    t.par_chunks_mut(ROWS_PER_TASK * m).enumerate().for_each(|(task, chunk)| {
        let row0 = task * ROWS_PER_TASK;
        for (r, ys) in chunk.chunks_mut(m).enumerate() {
            let wr = &w[(row0 + r) * k..(row0 + r + 1) * k];
            for (i, y) in ys.iter_mut().enumerate() {
                *y = dot(&x[i * k..(i + 1) * k], wr, cvt);
            }
        }
    });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = t[j * m + i];
        }
    }
}

#[inline(always)]
pub(crate) fn dot<W: Copy>(x: &[f32], w: &[W], cvt: impl Fn(W) -> f32 + Copy) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected on this CPU.
            return unsafe { dot_avx2(x, w, cvt) };
        }
    }
    dot_generic(x, w, cvt)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<W: Copy>(x: &[f32], w: &[W], cvt: impl Fn(W) -> f32 + Copy) -> f32 {
    dot_generic(x, w, cvt)
}

/// 32 independent lanes so the compiler vectorises the reduction without reassociating floats.
#[inline(always)]
pub(crate) fn dot_generic<W: Copy>(x: &[f32], w: &[W], cvt: impl Fn(W) -> f32 + Copy) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let xc = x.chunks_exact(L);
    let wc = w.chunks_exact(L);
    let (xr, wr) = (xc.remainder(), wc.remainder());
    for (xa, wa) in xc.zip(wc) {
        // Plain mul + add: `mul_add` becomes a libm call where FMA is not compiled in.
        for l in 0..L {
            acc[l] += xa[l] * cvt(wa[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xr.iter().zip(wr) {
        s += a * cvt(*b);
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
        assert!(matmul_xwt(&Tensor::zeros((9, 4), DType::F32, &dev)?, &Tensor::zeros((2, 4), DType::F32, &dev)?)?.is_none());
        Ok(())
    }
}
