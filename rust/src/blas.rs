//! Optional CBLAS `sgemm` for CPU prefill, loaded at run time.
//!
//! candle's CPU GEMM (the `gemm` crate) reached 75-95 GFLOP/s on prefill shapes here, against
//! ~150 for OpenBLAS/oneDNN on the same 2 cores, which made prefill about half as fast as
//! transformers. Rather than link a BLAS into the wheel, the Python package points us at the
//! OpenBLAS that the `scipy-openblas32` wheel ships (`kvfast._native.load_blas`). Without it
//! every product falls back to candle, with identical results up to f32 rounding.

use std::ffi::c_int;
use std::path::Path;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Storage, Tensor};

use crate::error::{Error, Result};

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type SetThreads = unsafe extern "C" fn(c_int);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

struct Blas {
    _lib: libloading::Library,
    sgemm: Sgemm,
}

static BLAS: OnceLock<Blas> = OnceLock::new();

/// Loads `cblas_sgemm` from the shared library at `path`; `prefix` is its symbol prefix
/// ("scipy_" for scipy-openblas). Threads are set to the kvfast pool size. The first library
/// loaded stays in use; later calls only check theirs.
pub fn load(path: &Path, prefix: &str) -> Result<()> {
    let err = |m: String| Error::invalid(format!("cannot use BLAS {}: {m}", path.display()));
    // SAFETY: loading a BLAS runs its initialisers; the symbols are checked by name and the
    // CBLAS ABI is fixed.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| err(e.to_string()))?;
        let sgemm: Sgemm = *lib
            .get::<Sgemm>(format!("{prefix}cblas_sgemm\0").as_bytes())
            .map_err(|e| err(e.to_string()))?;
        if let Ok(set) =
            lib.get::<SetThreads>(format!("{prefix}openblas_set_num_threads\0").as_bytes())
        {
            set(crate::threads::num_threads() as c_int);
        }
        let _ = BLAS.set(Blas { _lib: lib, sgemm });
    }
    Ok(())
}

pub fn available() -> bool {
    BLAS.get().is_some()
}

/// `a [m, k] @ b` where `b` is `[k, n]`, or `[n, k]` read transposed (`b_t`), both f32 on the
/// CPU with contiguous storage. `None` when no BLAS is loaded or the operands do not qualify.
pub fn matmul(a: &Tensor, b: &Tensor, b_t: bool) -> Result<Option<Tensor>> {
    let Some(blas) = BLAS.get() else {
        return Ok(None);
    };
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return Ok(None);
    }
    let (m, k) = a.dims2()?;
    let (r, c) = b.dims2()?;
    let (n, kb) = if b_t { (r, c) } else { (c, r) };
    if k != kb {
        return Ok(None);
    }
    let (a_s, a_l) = a.storage_and_layout();
    let (b_s, b_l) = b.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) = (&*a_s, &*b_s)
    else {
        return Ok(None);
    };
    let (Some((a0, a1)), Some((b0, b1))) = (a_l.contiguous_offsets(), b_l.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (av, bv) = (&av[a0..a1], &bv[b0..b1]);
    let mut out = vec![0f32; m * n];
    let (ldb, tb) = if b_t { (k, TRANS) } else { (n, NO_TRANS) };
    // SAFETY: sizes and leading dimensions match the slices checked above.
    unsafe {
        (blas.sgemm)(
            ROW_MAJOR,
            NO_TRANS,
            tb,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            av.as_ptr(),
            k as c_int,
            bv.as_ptr(),
            ldb as c_int,
            0.0,
            out.as_mut_ptr(),
            n as c_int,
        );
    }
    Ok(Some(Tensor::from_vec(out, (m, n), a.device())?))
}
