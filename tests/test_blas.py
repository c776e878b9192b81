"""The OpenBLAS bridge for CPU prefill."""

from __future__ import annotations

import os
import subprocess
import sys

import kvfast
import numpy as np
import pytest
from kvfast import Session, _native


def test_bundled_openblas_is_loaded() -> None:
    # scipy-openblas32 is a dependency, so every install gets BLAS prefill.
    assert kvfast._native.blas_available()


def test_candle_gemm_fallback_gives_the_same_logits() -> None:
    # A fresh interpreter with KVFAST_BLAS=0 runs the same prefill on candle's GEMM.
    ids = list(range(1, 60))
    code = (
        "import numpy as np, sys; from kvfast import Session, _native;"
        "assert not _native.blas_available();"
        f"np.save(sys.argv[1], Session.from_pretrained().prefill({ids}, logits='all'))"
    )
    out = os.path.join(os.environ.get("PYTEST_TMP", "/tmp"), f"kvfast-noblas-{os.getpid()}.npy")
    env = dict(os.environ, KVFAST_BLAS="0")
    subprocess.run([sys.executable, "-c", code, out], check=True, env=env)
    want = np.load(out)
    os.unlink(out)
    got = Session.from_pretrained().prefill(ids, logits="all")
    assert float(np.abs(got - want).max()) < 1e-4


def test_bad_blas_path_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="/no/such/libblas.so"):
        _native.load_blas("/no/such/libblas.so")
    with pytest.raises(ValueError, match="cblas_sgemm"):
        _native.load_blas(_native.__file__, "nothere_")
    assert _native.blas_available()
