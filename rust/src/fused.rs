//! Fused CUDA kernels of the static decode step ([`crate::model::qwen3::Qwen3::decode_static`])
//! and of prefill attention.
//!
//! Per layer the decode step is seven kernels: the qkv GEMV (staging the residual add and
//! RMSNorm), QK-norm + RoPE + cache write, split-K attention that reads each KV head once for
//! its query group, the combine, and the o, gate|up (staging add + RMSNorm) and down (staging
//! SwiGLU) GEMVs. They were shaped by a per-kernel profile on an H200 (docs/gpu.md): the
//! first version's attention blocks walked 256 keys one dependent load at a time and took 60%
//! of the step; with the grouped kernel and the staged GEMVs a 0.6B step went from 2.5 to
//! 1.0 ms of GPU time. Prefill uses `causal_softmax` between two cuBLAS products, and greedy
//! decoding `argmax`. Source: `kernels/decode.cu`, compiled to PTX by `build.rs`.
//!
//! [`available`] says when they apply: CUDA, f32 or bf16, and `KVFAST_FUSED` not `0`. Elsewhere
//! (CPU, Metal, f16) the step runs the candle-op body, which gives the same results up to
//! rounding, so no Metal twin is needed.

use candle_core::{DType, Tensor};

/// Keys per split of the per-query-head attention kernel (one block per query head and split).
pub const ATTN_CHUNK: usize = 256;

/// Keys per split of the grouped attention kernel for a graph's `span`: the largest power of
/// two from 32 to 256 that still gives `n_kv * splits` at least four blocks per multiprocessor
/// of an H100 (132), so a short span is spread over the whole GPU and enough of the cache is
/// in flight at once. Measured on an H200 with Qwen3-0.6B (docs/gpu.md): at a 4608-row span
/// (4k context), 128-key chunks (288 blocks) moved 22% of the DRAM bandwidth (Nsight Compute)
/// and took 14.8 us per layer, 64-key chunks (576 blocks) 11.1 us; at a 1024-row span 16-key
/// chunks were slower than 32 (6.55 against 6.26 us), hence the floor.
pub fn group_chunk(span: usize, n_kv: usize) -> usize {
    const TARGET_BLOCKS: usize = 528;
    let mut chunk = 256;
    while chunk > 32 && n_kv * span.div_ceil(chunk) < TARGET_BLOCKS {
        chunk /= 2;
    }
    chunk
}

/// Whether the fused kernels serve tensors like `x`.
pub fn available(x: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && std::env::var("KVFAST_FUSED").map_or(true, |v| v != "0")
}

/// Shapes of one layer's decode step.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// Rows of the packed cache buffers.
    pub capacity: usize,
    pub eps: f32,
    pub interleaved: bool,
}

#[cfg(feature = "cuda")]
pub use cuda::{
    add_rms_norm, argmax, attention, causal_softmax, gemv, qkv_rope_store, silu_mul, RowInput,
};

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::{
        CudaFunction, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda::CudaStorageSlice;
    use candle_core::{CudaDevice, DType, Storage, Tensor};

    use super::{Dims, ATTN_CHUNK};
    use crate::error::{Error, Result};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/decode.ptx"));

    fn func(dev: &CudaDevice, name: &str, dtype: DType) -> Result<CudaFunction> {
        let suffix = match dtype {
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            other => {
                return Err(Error::invalid(format!(
                    "fused decode kernels take f32 or bf16, not {other:?}"
                )))
            }
        };
        let f = dev.get_or_load_custom_func(&format!("{name}_{suffix}"), "kvfast_decode", PTX)?;
        Ok(f.into_cuda_function())
    }

    /// The device address of `t`'s first element; `t` must be contiguous. The caller keeps `t`
    /// alive across the launch (frees are stream-ordered after it).
    fn addr(t: &Tensor, stream: &CudaStream) -> Result<u64> {
        let (s, l) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*s else {
            return Err(Error::invalid("fused decode kernels need CUDA tensors"));
        };
        if !l.is_contiguous() {
            return Err(Error::invalid(
                "fused decode kernels need contiguous tensors",
            ));
        }
        let (base, size) = match &cs.slice {
            CudaStorageSlice::F32(x) => (x.device_ptr(stream).0, 4),
            CudaStorageSlice::BF16(x) => (x.device_ptr(stream).0, 2),
            CudaStorageSlice::U32(x) => (x.device_ptr(stream).0, 4),
            _ => return Err(Error::invalid("fused decode kernels take f32, bf16 or u32")),
        };
        Ok(base + (l.start_offset() * size) as u64)
    }

    fn cuda(t: &Tensor) -> Result<CudaDevice> {
        Ok(t.device().as_cuda_device()?.clone())
    }

    fn cfg(grid: (usize, usize), block: usize, shared_floats: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (grid.0 as u32, grid.1 as u32, 1),
            block_dim: (block as u32, 1, 1),
            shared_mem_bytes: (shared_floats * 4) as u32,
        }
    }

    /// One token's `qkv` row `[1, (nh + 2 nkv) d]` -> queries `[nh, d]` after QK-norm (when
    /// `norms` is given) and RoPE (row `inputs[1]` of `cos`/`sin`); the key (normed, rotated)
    /// and value are written into `kbuf`/`vbuf` `[nkv, capacity, d]` at row `inputs[2]`.
    #[allow(clippy::too_many_arguments)]
    pub fn qkv_rope_store(
        qkv: &Tensor,
        norms: Option<&(Tensor, Tensor)>,
        cos: &Tensor,
        sin: &Tensor,
        inputs: &Tensor,
        kbuf: &Tensor,
        vbuf: &Tensor,
        dims: Dims,
    ) -> Result<Tensor> {
        let dev = cuda(qkv)?;
        let stream = dev.cuda_stream();
        let (nh, nkv, d) = (dims.n_heads, dims.n_kv, dims.head_dim);
        let q = unsafe { Tensor::empty((nh, d), qkv.dtype(), qkv.device())? };
        let f = func(&dev, "qkv_rope_store", qkv.dtype())?;
        let (qn, kn) = match norms {
            Some((qn, kn)) => (addr(qn, &stream)?, addr(kn, &stream)?),
            None => (0, 0),
        };
        let ptrs = [
            addr(qkv, &stream)?,
            qn,
            kn,
            addr(cos, &stream)?,
            addr(sin, &stream)?,
            addr(inputs, &stream)?,
            addr(&q, &stream)?,
            addr(kbuf, &stream)?,
            addr(vbuf, &stream)?,
        ];
        let has_norm = norms.is_some() as i32;
        let (nh_, nkv_, d_, cap) = (nh as i32, nkv as i32, d as i32, dims.capacity as i32);
        let interleaved = dims.interleaved as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&ptrs[0]).arg(&ptrs[1]).arg(&ptrs[2]).arg(&has_norm);
        for p in &ptrs[3..] {
            b.arg(p);
        }
        b.arg(&nh_)
            .arg(&nkv_)
            .arg(&d_)
            .arg(&cap)
            .arg(&dims.eps)
            .arg(&interleaved);
        let block = d.div_ceil(32) * 32;
        unsafe { b.launch(cfg((nh + 2 * nkv, 1), block, d + 32)) }.map_err(driver)?;
        Ok(q)
    }

    /// Attention of `q` `[nh, d]` over rows `0..=inputs[2]` of `kbuf`/`vbuf` `[nkv, cap, d]`
    /// (GQA: query head h reads KV head h / (nh / nkv)); `span` bounds the rows a graph may
    /// ever cover. Returns `[1, nh * d]`.
    pub fn attention(
        q: &Tensor,
        kbuf: &Tensor,
        vbuf: &Tensor,
        inputs: &Tensor,
        span: usize,
        scale: f32,
        dims: Dims,
    ) -> Result<Tensor> {
        let dev = cuda(q)?;
        let stream = dev.cuda_stream();
        let (nh, nkv, d) = (dims.n_heads, dims.n_kv, dims.head_dim);
        let g = nh / nkv;
        let ptrs = [
            addr(q, &stream)?,
            addr(kbuf, &stream)?,
            addr(vbuf, &stream)?,
            addr(inputs, &stream)?,
        ];
        let grouped = group_kernel(g, d, q.dtype())
            .filter(|_| ptrs[1] % 16 == 0 && ptrs[2] % 16 == 0)
            .filter(|_| std::env::var("KVFAST_ATTN").map_or(true, |v| v != "head"));
        let chunk = match grouped {
            Some(_) => super::group_chunk(span, nkv),
            None => ATTN_CHUNK,
        };
        let splits = span.div_ceil(chunk).max(1);
        let part = unsafe { Tensor::empty((nh, splits, d + 2), DType::F32, q.device())? };
        let out = unsafe { Tensor::empty((1, nh * d), q.dtype(), q.device())? };
        let part_p = addr(&part, &stream)?;
        let (g_, d_, cap) = (g as i32, d as i32, dims.capacity as i32);
        let (chunk_, n_splits) = (chunk as i32, splits as i32);
        match grouped {
            Some(name) => {
                let f = func(&dev, name, q.dtype())?;
                let mut b = stream.launch_builder(&f);
                for p in &ptrs {
                    b.arg(p);
                }
                b.arg(&part_p)
                    .arg(&d_)
                    .arg(&cap)
                    .arg(&chunk_)
                    .arg(&scale)
                    .arg(&n_splits);
                let shared = g * chunk + 32 + (GROUP_THREADS / 32) * g * d;
                unsafe { b.launch(cfg((nkv, splits), GROUP_THREADS, shared)) }.map_err(driver)?;
            }
            None => {
                let f = func(&dev, "attn_partial", q.dtype())?;
                let mut b = stream.launch_builder(&f);
                for p in &ptrs {
                    b.arg(p);
                }
                b.arg(&part_p)
                    .arg(&g_)
                    .arg(&d_)
                    .arg(&cap)
                    .arg(&chunk_)
                    .arg(&scale)
                    .arg(&n_splits);
                unsafe { b.launch(cfg((nh, splits), 128, d + chunk + 32)) }.map_err(driver)?;
            }
        }
        let out_p = addr(&out, &stream)?;
        let f = func(&dev, "attn_combine", q.dtype())?;
        let mut b = stream.launch_builder(&f);
        b.arg(&part_p).arg(&out_p).arg(&d_).arg(&n_splits);
        let threads = COMBINE_THREADS;
        unsafe { b.launch(cfg((nh, 1), threads, splits + 32 + threads)) }.map_err(driver)?;
        Ok(out)
    }

    /// Threads per block of the grouped attention kernel and of the combine.
    const GROUP_THREADS: usize = 128;
    const COMBINE_THREADS: usize = 512;

    /// The grouped attention kernel for `g` query heads per KV head and head size `d`, when
    /// one is compiled for them: `g` in {1, 2, 4, 8} and a key row of a power-of-two count of
    /// 16-byte vectors, at most 32 (one warp). Other shapes take the per-query-head kernel.
    fn group_kernel(g: usize, d: usize, dtype: DType) -> Option<&'static str> {
        let vec = 16 / dtype.size_in_bytes();
        let lanes = d / vec;
        let fits = d % vec == 0 && lanes.is_power_of_two() && lanes <= 32;
        let name = match g {
            1 => "attn_group1",
            2 => "attn_group2",
            4 => "attn_group4",
            8 => "attn_group8",
            _ => return None,
        };
        fits.then_some(name)
    }

    /// What the GEMV kernel stages as its input row (`GEMV_*` in `kernels/decode.cu`).
    #[derive(Debug, Clone, Copy)]
    pub enum RowInput<'a> {
        /// `x` itself.
        Plain,
        /// SwiGLU of `x` = gate | up `[1, 2k]`.
        Silu,
        /// `rmsnorm(x + y) * w` (`y` None: of `x`); the kernel also returns `x + y`.
        Norm {
            y: Option<&'a Tensor>,
            w: &'a Tensor,
            eps: f32,
        },
    }

    /// `x' W^T (+ b)` for one row `x'` `[1, k]` made from `x` as `input` says, and `W` `[n, k]`
    /// (the checkpoint's layout, so each output reads one contiguous row): one warp per output,
    /// 16-byte loads. Returns `(y, x + y)`, the second only for [`RowInput::Norm`] with a `y`;
    /// `y` is f32 with `f32_out` (else `x`'s dtype).
    /// None when the shapes or alignment do not suit it (the caller runs the separate ops).
    /// cuBLAS's GEMM for one row ran these products at a small fraction of the memory bandwidth
    /// (docs/gpu.md).
    pub fn gemv(
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        input: RowInput<'_>,
        f32_out: bool,
    ) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let dev = cuda(x)?;
        let stream = dev.cuda_stream();
        let (n, k) = w.dims2()?;
        let size = x.dtype().size_in_bytes();
        // The kernel's staging mode (GEMV_* in decode.cu) and its extra inputs.
        let (mode, y_in, nw, eps) = match input {
            RowInput::Plain => (0i32, None, None, 0f32),
            RowInput::Silu => (1, None, None, 0.0),
            RowInput::Norm { y, w, eps } => (2, y, Some(w), eps),
        };
        let row = if mode == 1 { 2 * k } else { k };
        let same = |t: &Tensor| t.dtype() == x.dtype() && t.is_contiguous() && t.elem_count() == k;
        let fits = x.dims() == [1, row]
            && x.is_contiguous()
            && w.dtype() == x.dtype()
            && w.is_contiguous()
            && k % (16 / size) == 0
            && k * size <= 48 * 1024 - 256
            && y_in.is_none_or(same)
            && nw.is_none_or(same);
        if !fits {
            return Ok(None);
        }
        let wp = addr(w, &stream)?;
        for t in [Some(x), y_in, nw].into_iter().flatten() {
            if addr(t, &stream)? % 16 != 0 {
                return Ok(None);
            }
        }
        if wp % 16 != 0 {
            return Ok(None);
        }
        let out_dtype = if f32_out { DType::F32 } else { x.dtype() };
        let out = unsafe { Tensor::empty((1, n), out_dtype, x.device())? };
        let bias = match b {
            Some(b) => addr(b, &stream)?,
            None => 0,
        };
        let xo = match y_in {
            Some(_) => Some(unsafe { Tensor::empty((1, k), x.dtype(), x.device())? }),
            None => None,
        };
        let opt = |t: Option<&Tensor>| t.map_or(Ok(0), |t| addr(t, &stream));
        let (y_p, yf_p) = match f32_out {
            true => (0, addr(&out, &stream)?),
            false => (addr(&out, &stream)?, 0),
        };
        let ptrs = [addr(x, &stream)?, wp, bias, y_p];
        let extra = [opt(y_in)?, opt(nw)?, opt(xo.as_ref())?];
        let (n_, k_) = (n as i32, k as i32);
        let f = func(&dev, "gemv", x.dtype())?;
        let mut l = stream.launch_builder(&f);
        for p in &ptrs {
            l.arg(p);
        }
        l.arg(&n_).arg(&k_).arg(&mode);
        for p in &extra {
            l.arg(p);
        }
        l.arg(&eps).arg(&yf_p);
        let shared_floats = (k * size).div_ceil(16) * 4 + 36;
        unsafe { l.launch(cfg((n.div_ceil(8), 1), 256, shared_floats)) }.map_err(driver)?;
        Ok(Some((out, xo)))
    }

    /// Index of the largest of f32 `x`'s values (the first on ties, as the host's argmax),
    /// computed on the device: greedy decoding then reads 4 bytes, not the logits. None when
    /// `x` does not suit the kernel (not f32, not contiguous or not 16-byte aligned).
    pub fn argmax(x: &Tensor) -> Result<Option<u32>> {
        let dev = cuda(x)?;
        let stream = dev.cuda_stream();
        if x.dtype() != DType::F32 || !x.is_contiguous() {
            return Ok(None);
        }
        let xp = addr(x, &stream)?;
        if xp % 16 != 0 {
            return Ok(None);
        }
        let out = unsafe { Tensor::empty(1, DType::U32, x.device())? };
        let (op, n) = (addr(&out, &stream)?, x.elem_count() as i32);
        let f = func(&dev, "argmax", DType::F32)?;
        let mut l = stream.launch_builder(&f);
        l.arg(&xp).arg(&n).arg(&op);
        unsafe { l.launch(cfg((1, 1), 1024, 0)) }.map_err(driver)?;
        Ok(Some(out.to_vec1::<u32>()?[0]))
    }

    /// Causal softmax of prefill logits `[n_kv, g * t, n]` in place: row `r` is query
    /// `r % t` of the chunk, which sees keys `0..=n - t + r % t`. `x` must be contiguous and
    /// not shared (the caller's fresh product).
    pub fn causal_softmax(x: &Tensor, t: usize) -> Result<()> {
        let dev = cuda(x)?;
        let stream = dev.cuda_stream();
        let n = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / n;
        if t == 0 || t > n || rows % t != 0 {
            return Err(Error::invalid(format!(
                "causal softmax: {rows} rows of {n} keys do not hold {t}-query groups"
            )));
        }
        let p = addr(x, &stream)?;
        let (n_, t_) = (n as i32, t as i32);
        let f = func(&dev, "causal_softmax", x.dtype())?;
        let mut l = stream.launch_builder(&f);
        l.arg(&p).arg(&n_).arg(&t_);
        unsafe { l.launch(cfg((rows, 1), 256, 0)) }.map_err(driver)?;
        Ok(())
    }

    /// SwiGLU of one row: `gu` `[1, 2f]` (gate | up) -> `[1, f]`.
    pub fn silu_mul(gu: &Tensor) -> Result<Tensor> {
        let dev = cuda(gu)?;
        let stream = dev.cuda_stream();
        let f = gu.dim(1)? / 2;
        let out = unsafe { Tensor::empty((1, f), gu.dtype(), gu.device())? };
        let (src, dst, n) = (addr(gu, &stream)?, addr(&out, &stream)?, f as i32);
        let k = func(&dev, "silu_mul", gu.dtype())?;
        let mut b = stream.launch_builder(&k);
        b.arg(&src).arg(&dst).arg(&n);
        unsafe { b.launch(cfg((f.div_ceil(256), 1), 256, 0)) }.map_err(driver)?;
        Ok(out)
    }

    /// One row's residual add and the RMSNorm after it: `(x + y, rmsnorm(x + y) * w)`.
    pub fn add_rms_norm(x: &Tensor, y: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
        let dev = cuda(x)?;
        let stream = dev.cuda_stream();
        let n = x.elem_count();
        let xo = unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? };
        let ho = unsafe { Tensor::empty(x.shape(), x.dtype(), x.device())? };
        let ptrs = [
            addr(x, &stream)?,
            addr(y, &stream)?,
            addr(w, &stream)?,
            addr(&xo, &stream)?,
            addr(&ho, &stream)?,
        ];
        let n_ = n as i32;
        let k = func(&dev, "add_rms_norm", x.dtype())?;
        let mut b = stream.launch_builder(&k);
        for p in &ptrs {
            b.arg(p);
        }
        b.arg(&n_).arg(&eps);
        unsafe { b.launch(cfg((1, 1), n.div_ceil(32).min(32) * 32, 0)) }.map_err(driver)?;
        Ok((xo, ho))
    }

    fn driver(e: candle_core::cuda::cudarc::driver::DriverError) -> Error {
        Error::invalid(format!("fused decode kernel launch: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::group_chunk;

    #[test]
    fn group_chunk_spreads_short_spans_and_caps_long_ones() {
        // Qwen3-0.6B / 4B (8 KV heads), the benchmark's spans: 1024 rows (512 context) get the
        // floor, 4608 rows (4k context) 64-key chunks (576 blocks), long spans the largest.
        assert_eq!(group_chunk(1024, 8), 32);
        assert_eq!(group_chunk(4608, 8), 64);
        assert_eq!(group_chunk(65536, 8), 256);
        // Every choice is a power of two in 32..=256 with enough blocks when the span allows.
        for span in [1, 100, 512, 1000, 2048, 5000, 65536] {
            for n_kv in [1, 2, 4, 8, 16] {
                let c = group_chunk(span, n_kv);
                assert!(
                    c.is_power_of_two() && (32..=256).contains(&c),
                    "{span} {n_kv} {c}"
                );
                if c > 32 {
                    assert!(n_kv * span.div_ceil(c) >= 528, "{span} {n_kv} {c}");
                }
            }
        }
    }
}
