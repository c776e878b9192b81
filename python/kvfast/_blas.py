"""Point the native engine at the OpenBLAS shipped by the `scipy-openblas32` wheel.

CPU prefill products then run on OpenBLAS (about 1.4x candle's own GEMM on 2 cores, measured in
benches/bench.py); decode does not use it. Set KVFAST_BLAS=0 to keep candle's GEMM, or
KVFAST_BLAS=/path/to/libcblas.so (plain `cblas_sgemm` symbols) to use another BLAS.
"""

from __future__ import annotations

import os
import warnings

from kvfast import _native


def load_default_blas() -> bool:
    choice = os.environ.get("KVFAST_BLAS", "").strip()
    if choice.lower() in ("0", "off", "none", "false"):
        return False
    # OpenBLAS workers spin for ~2^28 cycles after each call; decode (which never calls BLAS)
    # would share the cores with them. 2^4 cycles: they sleep right after a prefill product.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        if choice:
            _native.load_blas(choice, "")
            return True
        import scipy_openblas32 as sob  # type: ignore[import-untyped]

        path = os.path.join(sob.get_lib_dir(), sob.get_library(fullname=True))
        _native.load_blas(path, "scipy_")
        return True
    except (ImportError, ValueError, OSError) as e:
        warnings.warn(f"kvfast: no BLAS for CPU prefill, using candle's GEMM ({e})", stacklevel=2)
        return False
