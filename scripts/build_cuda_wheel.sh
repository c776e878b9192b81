#!/usr/bin/env bash
# Builds the kvfast wheel with the `cuda` feature on a machine WITHOUT a GPU or CUDA install.
#
# Everything comes from PyPI and crates.io:
#   1. nvcc 13.0 + headers + the CUDA libraries the link needs, as NVIDIA's PyPI wheels, into
#      $KVFAST_CUDA_DIR (default: ~/.cache/kvfast-cuda); unversioned .so symlinks are added
#      because the wheels only ship versioned sonames.
#   2. A link-only stub libcuda.so.1 exporting every driver function cudarc declares (each
#      returns CUDA_ERROR_STUB_LIBRARY). It is used only to satisfy `-lcuda` here; the wheel
#      records NEEDED libcuda.so.1 and loads the real driver on a GPU machine. Never ship it.
#   3. `maturin build --release --features cuda` for compute capability $CUDA_COMPUTE_CAP
#      (default 90: H100/H200), auditwheel skipped (the CUDA libraries are found at run time).
# Output: target/wheels-cuda/kvfast-*-cp310-abi3-*.whl   (~10 MB). Takes ~15 min on 2 cores the
# first time (candle-kernels' nvcc builds dominate); later builds reuse $KVFAST_CUDA_DIR/target.
#
# Usage: bash scripts/build_cuda_wheel.sh [--check]   (--check: `cargo build --features cuda`
# only, no wheel: what CI runs to keep the feature compiling)
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_DIR=${KVFAST_CUDA_DIR:-$HOME/.cache/kvfast-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
PY=${PYTHON:-python3}

if [ ! -x "$CUDA_DIR/nvidia/cu13/bin/nvcc" ]; then
  echo "== installing nvcc 13.0 and CUDA libraries from PyPI into $CUDA_DIR"
  # 13.0 pinned: cudarc 0.19 (what candle 0.11 uses) rejects newer toolkits.
  "$PY" -m pip install -q --no-deps --target "$CUDA_DIR" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*"
fi
export CUDA_HOME="$CUDA_DIR/nvidia/cu13"
export CUDA_PATH="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$PATH"
LIB="$CUDA_HOME/lib"
for name in cublas cublasLt cudart curand nvrtc; do
  so=$(ls "$LIB"/lib$name.so.* 2>/dev/null | sort | head -n 1 || true)
  [ -n "$so" ] || { echo "missing lib$name in $LIB" >&2; exit 1; }
  ln -sf "$(basename "$so")" "$LIB/lib$name.so"
done

# The driver stub must exist before cudarc's build script runs (it only adds existing dirs).
STUB_DIR="$LIB/stubs"
if [ ! -f "$STUB_DIR/libcuda.so.1" ]; then
  echo "== building the libcuda link stub"
  cargo fetch --quiet
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -n 1)
  mkdir -p "$STUB_DIR"
  grep -rhoE 'pub (unsafe )?fn (cu[A-Za-z0-9_]+)' "$CUDARC/src/driver/sys" \
    | sed -E 's/.*fn //' | sort -u \
    | awk '{ printf "int %s(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }\n", $1 }' \
    > "$STUB_DIR/libcuda_stub.c"
  [ -s "$STUB_DIR/libcuda_stub.c" ] || { echo "found no driver symbols in $CUDARC" >&2; exit 1; }
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB_DIR/libcuda.so.1" "$STUB_DIR/libcuda_stub.c"
  ln -sf libcuda.so.1 "$STUB_DIR/libcuda.so"
fi
ln -sf stubs/libcuda.so.1 "$LIB/libcuda.so"
export LIBRARY_PATH="$LIB:$STUB_DIR${LIBRARY_PATH:+:$LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$LIB -L native=$STUB_DIR"

# A target dir of its own, outside the clone by default, so a clean clone (CI) reuses the
# candle-kernels build (~8-15 min on 2 cores) and only recompiles kvfast; the cuda feature
# changes candle's features, and sharing target/ with the CPU builds would rebuild one or the
# other each time. --check and the wheel use the same (release) profile, so they share it too.
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$CUDA_DIR/target}
nvcc --version | tail -n 2
if [ "${1:-}" = "--check" ]; then
  cargo build --locked --release --features cuda --lib
  echo "cuda feature builds"
  exit 0
fi
"$PY" -m pip install -q "maturin>=1.9.4,<2"
"$PY" -m maturin build --locked --release --features cuda --auditwheel skip -o target/wheels-cuda
ls -lh target/wheels-cuda/*.whl
