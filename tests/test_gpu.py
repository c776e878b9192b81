"""GPU parity: the golden fixtures and the CPU path, on CUDA.

Marked `gpu`: CI has no GPU and deselects them (`-m "not gpu"` in pyproject's addopts); the GPU
machine runs them from the CUDA wheel with `scripts/gpu_check.sh` (`pytest -m gpu`). There a
missing GPU is a failure, not a skip. Tolerances on CUDA:
- f32: max abs logit error <= 1e-3 against transformers f32 (as on the CPU: candle's cuBLAS
  products keep f32, no TF32); greedy continuation equal; incremental decode == one-shot <= 1e-4.
- bf16: <= 2% of the largest |logit| and argmax agreement >= 80% (as on the CPU).
- CUDA-graph decode: every replayed step's logits equal an f32 one-shot prefill of the same
  tokens (f32 1e-3; bf16 3% of the largest |logit|, the bf16 ops alone being 2.2% off here).
- Compaction: the GPU computes the reference queries, the fits run on the host as on the CPU
  path, so the kept keys must be the same (>= 99% of kept rows, allowing a near-tie to flip),
  the biases and values within 1e-3 where the selection agrees, and the next-token logits after
  compaction within 1e-2.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from kvfast import Session, _native
from test_parity import MODELS, check_bf16_logits, check_f32_logits, golden, ids_of

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("KVFAST_GPU_DEVICE", "cuda")

CONTEXT = (
    "The old lighthouse keeper lived alone on the rocky island. Every evening he climbed the "
    "stairs, lit the great lamp and watched the ships pass. "
) * 12


def test_this_build_opens_the_gpu() -> None:
    assert "cuda" in _native.build_features(), "not a CUDA build of kvfast"
    assert _native.cuda_available(), "this CUDA build cannot open a GPU here"
    assert Session.from_pretrained(device=DEVICE).device.startswith("cuda")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_f32_logits_match_transformers_on_gpu(name: str) -> None:
    check_f32_logits(name, DEVICE)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_logits_close_to_transformers_on_gpu(name: str) -> None:
    check_bf16_logits(name, DEVICE)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_greedy_continuation_and_incremental_decode_on_gpu(name: str) -> None:
    g = golden(name)
    ids = ids_of(g)
    s = Session.from_pretrained(MODELS[name], dtype="f32", device=DEVICE)
    s.prefill(ids, logits=None)
    want = [int(i) for i in g["greedy_f32"]]
    assert list(s.engine.generate(max_new_tokens=len(want), eos_ids=[])) == want
    # Chunk, single tokens (the decode path, growing the packed cache), chunk.
    one = Session.from_pretrained(MODELS[name], dtype="f32", device=DEVICE).prefill(
        ids, logits="all"
    )
    inc = Session.from_pretrained(MODELS[name], dtype="f32", device=DEVICE)
    rows = [inc.prefill(ids[:20], logits="all")]
    rows += [inc.prefill([i], logits="all") for i in ids[20:40]]
    rows.append(inc.prefill(ids[40:], logits="all"))
    err = float(np.abs(np.concatenate(rows) - one).max())
    assert err <= 1e-4, f"{name}: incremental vs one-shot on {DEVICE} {err:.2e}"


def _rows_shared(a: np.ndarray, b: np.ndarray) -> int:
    """Rows of `a` that also occur in `b` (to 1e-3): kept keys, whatever their order."""
    if len(a) == 0 or len(b) == 0:
        return 0
    d = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    return int((d.min(1) <= 1e-3).sum())


@pytest.mark.parametrize("method", ["am", "kvzip"])
def test_compaction_on_gpu_keeps_the_cpu_keys(method: str) -> None:
    def compacted(device: str) -> tuple[Session, list[float]]:
        s = Session.from_pretrained(dtype="f32", device=device)
        s.prefill(s.encode(CONTEXT), logits=None)
        r = s.compact(ratio=4, method=method, queries="repeat", recent=8, seed=0)
        errs = [f.out_rel_err for layer in r.head_fidelity for f in layer if f is not None]
        return s, errs

    cpu, cpu_err = compacted("cpu")
    gpu, gpu_err = compacted(DEVICE)
    assert gpu.cache_info()["tokens_per_head"] == cpu.cache_info()["tokens_per_head"]
    info = cpu.cache_info()
    kept = shared = 0
    for layer in range(info["layers"]):
        for head in range(info["kv_heads"]):
            kc, vc, bc = cpu.engine.head_cache(layer, head)
            kg, vg, bg = gpu.engine.head_cache(layer, head)
            kept += len(kc)
            shared += _rows_shared(kg, kc)
            if np.abs(kg - kc).max(initial=0) <= 1e-3:
                assert np.abs(bg - bc).max(initial=0) <= 1e-3, (layer, head)
                assert np.abs(vg - vc).max(initial=0) <= 1e-3, (layer, head)
    assert shared >= 0.99 * kept, f"{method}: GPU kept {shared}/{kept} of the CPU's keys"
    if cpu_err:
        assert abs(float(np.mean(gpu_err)) - float(np.mean(cpu_err))) <= 0.01
    q = cpu.encode(" What did the keeper light?")
    lc = cpu.prefill(q, logits="last")
    lg = gpu.prefill(q, logits="last")
    err = float(np.abs(lc - lg).max())
    assert err <= 1e-2, f"{method}: next-token logits after compaction differ by {err:.2e}"


def test_packed_layers_match_the_per_head_loop_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # The batched attention of packed layers vs the per-head loop (KVFAST_PACKED_CACHE=0), over
    # a prefill chunk and decode steps that grow the cache past its first capacity.
    ids = ids_of(golden("qwen3-odd")) * 2  # 96 tokens: past the first capacity (64)
    outs = []
    for packed in ("1", "0"):
        monkeypatch.setenv("KVFAST_PACKED_CACHE", packed)
        s = Session.from_pretrained(MODELS["qwen3-odd"], dtype="f32", device=DEVICE)
        rows = [s.prefill(ids[:30], logits="all")]
        rows += [s.prefill([i], logits="all") for i in ids[30:]]
        outs.append(np.concatenate(rows))
    err = float(np.abs(outs[0] - outs[1]).max())
    assert err <= 1e-4, f"packed vs per-head attention on {DEVICE}: {err:.2e}"


@pytest.mark.parametrize("kernels", ["grouped", "per-head", "candle"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_cuda_graph_decode_matches_one_shot_prefill(
    dtype: str, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Decode steps replayed from CUDA graphs (the default on CUDA) over 500 tokens from a
    # 600-token prompt: two captures (spans 1024 and 1536, across a capacity doubling), the
    # rest replays; every step's logits equal an f32 one-shot prefill of the same tokens (f32
    # 1e-3; bf16 see below). With the fused kernels (default; the attention kernel that reads
    # each KV head once for its query group, and with KVFAST_ATTN=head the per-query-head one
    # that odd head sizes take) and with the candle-op step (KVFAST_FUSED=0).
    fused = "0" if kernels == "candle" else "1"
    monkeypatch.setenv("KVFAST_FUSED", fused)
    monkeypatch.setenv("KVFAST_ATTN", "head" if kernels == "per-head" else "group")
    prompt = [1 + (i * 7919) % 8000 for i in range(600)]
    e = Session.from_pretrained(dtype=dtype, device=DEVICE).engine
    e.prefill(prompt, logits=None)
    toks: list[int] = []
    rows = []
    for t in e.generate(max_new_tokens=500, eos_ids=[]):
        toks.append(t)
        rows.append(e.last_logits())
    info = e.decode_info()
    assert info["mode"] == "graph" and info["error"] is None, info
    assert info["captures"] == 2 and info["replays"] == 497, info
    assert info["fused"] == (fused == "1"), info
    got = np.stack(rows)

    def one_shot(dt: str) -> np.ndarray:
        ref = Session.from_pretrained(dtype=dt, device=DEVICE).engine
        return ref.prefill(prompt + toks, logits="all")[len(prompt) :]

    # Read nowhere, the logits stay on the device and greedy decoding takes their argmax there
    # (reading them above made every pick the host's argmax): the same tokens.
    e2 = Session.from_pretrained(dtype=dtype, device=DEVICE).engine
    e2.prefill(prompt, logits=None)
    assert list(e2.generate(max_new_tokens=500, eos_ids=[])) == toks

    want = one_shot("f32")
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    if dtype == "f32":
        assert err <= 1e-3, f"f32 graph decode vs one-shot prefill: {err:.3e}"
    else:
        # bf16 against the f32 one-shot logits of the same tokens: the bf16 candle ops are
        # themselves 2.2% (of the largest |logit|) away from them on this model, so 3%. The
        # candle-op step replays exactly what the bf16 one-shot prefill computes (0 measured).
        assert err <= 0.03 * scale, f"bf16 graph decode vs f32 one-shot: {err / scale:.2%}"
        if fused == "0":
            same = float(np.abs(got - one_shot("bf16")).max())
            assert same <= 0.005 * scale, f"bf16 candle-op graph vs bf16 one-shot: {same:.3e}"


def test_quantized_kv_cache_is_refused_off_the_cpu_with_a_reason() -> None:
    # The fused quantized-cache attention is a CPU kernel: say so rather than run slowly.
    with pytest.raises(ValueError, match=r"kv_dtype=.*int4.*cpu"):
        Session.from_pretrained(device=DEVICE, kv_dtype="int4")
    s = Session.from_pretrained(device=DEVICE)
    with pytest.raises(ValueError, match="cpu"):
        s.kv_dtype = "int8"
    assert s.kv_dtype is None
