#!/usr/bin/env bash
# Runs the GPU test subset and the GPU benchmark on a CUDA machine from the wheel that
# scripts/build_cuda_wheel.sh built (no Rust and no network needed there).
#
# The machine must have Python >= 3.10 with torch (cu13), transformers, pytest, numpy,
# tokenizers, jinja2, huggingface_hub and tqdm: the CUDA runtime libraries the wheel links
# (libcudart.so.13, libcublas(Lt).so.13, libcurand.so.10, libnvrtc.so.13) are taken from the
# nvidia-* wheels torch installs, the driver (libcuda.so.1) from the system.
#
# Usage: bash scripts/gpu_check.sh [WHEEL [BASELINE_WHEEL]]
#   WHEEL: default the newest target/wheels-cuda/*.whl. BASELINE_WHEEL: another build (say, the
#   previous commit's) whose kvfast speed is measured in the same run, as "before".
# Env: OUT (results folder, default gpu-out), GPU_BENCH_ARGS (extra args for gpu_speed.py),
#      GPU_TESTS_ONLY=1 (skip the benchmark), GPU_BENCH_ONLY=1 (skip the tests),
#      GPU_PROFILE=1 (before the benchmark, per-kernel device times of WHEEL and BASELINE_WHEEL
#      from benches/gpu_profile.py, args in GPU_PROFILE_ARGS, into $OUT/profile-*.json;
#      GPU_PROFILE=new: of WHEEL only), GPU_NCU=1 (last, Nsight Compute's view of one attention
#      and one GEMV kernel of a 0.6B decode at 4k context, into $OUT/ncu.txt).
# Exit status: non-zero when a GPU test failed (the benchmark still runs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
WHEEL=${1:-$(ls -t target/wheels-cuda/kvfast-*.whl 2>/dev/null | head -n 1)}
[ -f "$WHEEL" ] || { echo "no CUDA wheel (run scripts/build_cuda_wheel.sh first)" >&2; exit 2; }

SITE=$(mktemp -d)/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEEL" || exit 2
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
BASELINE_ARGS=()
if [ -n "${2:-}" ]; then
  BASE_SITE=$(mktemp -d)/site
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$BASE_SITE" "$2" || exit 2
  BASELINE_ARGS=(--baseline "$BASE_SITE")
fi
# Every lib/ folder of the nvidia-* wheels, so the dynamic loader finds the CUDA runtime.
NV_LIBS=$(python3 - <<'EOF'
import glob, os, nvidia
dirs = {os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(f"{d}/**/lib/*.so*", recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KVFAST_BLAS=0 PYTHONUNBUFFERED=1

nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import kvfast, kvfast._native as n; print('kvfast', kvfast.__version__, n.build_features(), 'cuda_available', n.cuda_available())" 2>&1 | tee -a "$OUT/device.txt"

tests=0
if [ "${GPU_BENCH_ONLY:-0}" != 1 ]; then
  python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
  tests=${PIPESTATUS[0]}
fi
if [ "${GPU_PROFILE:-0}" != 0 ]; then
  # shellcheck disable=SC2086
  python3 benches/gpu_profile.py --out "$OUT" --label new ${GPU_PROFILE_ARGS:-}
  if [ -n "${2:-}" ] && [ "$GPU_PROFILE" != new ]; then
    # shellcheck disable=SC2086
    PYTHONPATH="$BASE_SITE" python3 benches/gpu_profile.py --out "$OUT" --label baseline ${GPU_PROFILE_ARGS:-}
  fi
fi
if [ "${GPU_TESTS_ONLY:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  python3 benches/gpu_speed.py --out "$OUT" "${BASELINE_ARGS[@]}" ${GPU_BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_speed.log"
fi
if [ "${GPU_NCU:-0}" = 1 ]; then
  # Kernel nodes inside graph replays are profiled one by one (ncu's default); skip the warm-up.
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  timeout 150 "$NCU" --clock-control none -k 'regex:attn_group|gemv' --launch-skip 2000 \
    --launch-count 5 --section SpeedOfLight --section Occupancy --section WarpStateStats \
    python3 benches/gpu_profile.py --plain --models 0.6b --contexts 4096 --prefill 0 \
    --steps 16 --out "$(mktemp -d)" > "$OUT/ncu.txt" 2>&1
  echo "ncu exit status: $? (report in $OUT/ncu.txt)"
fi
echo "gpu tests exit status: $tests"
exit "$tests"
