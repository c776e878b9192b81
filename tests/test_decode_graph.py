"""The static decode step behind CUDA graphs, run without capture on the CPU.

`KVFAST_CUDA_GRAPH=eager` sends every decode step of an engine through the fixed-shape step a
graph would replay (device-side write row, masked attention span, RoPE by table row); it must
give the ordinary step's tokens, logits and cache. The GPU tests (test_gpu.py) check the same
with real graph capture and replay.
"""

from __future__ import annotations

import numpy as np
import pytest
from kvfast import Session

PROMPT = [1 + (i * 7919) % 8000 for i in range(100)]


Run = tuple[list[int], np.ndarray, np.ndarray, dict]


def run(monkeypatch: pytest.MonkeyPatch, mode: str) -> Run:
    monkeypatch.setenv("KVFAST_CUDA_GRAPH", mode)
    e = Session.from_pretrained().engine
    e.prefill(PROMPT, logits=None)
    toks = list(e.generate(max_new_tokens=40, eos_ids=[]))
    last = e.last_logits()
    assert last is not None
    # Scoring more tokens reads every cached row: equal NLLs mean equal caches.
    nll = e.score(PROMPT[:30])
    return toks, last, nll, e.decode_info()


def test_static_step_equals_the_ordinary_step(monkeypatch: pytest.MonkeyPatch) -> None:
    toks, last, nll, info = run(monkeypatch, "0")
    assert info["mode"] == "off" and info["static_eager_steps"] == 0
    s_toks, s_last, s_nll, s_info = run(monkeypatch, "eager")
    assert s_toks == toks
    np.testing.assert_allclose(s_last, last, atol=1e-4)
    np.testing.assert_allclose(s_nll, nll, atol=1e-4)
    # 100 prompt tokens fill the first buffers exactly: the first decode step grows them (the
    # ordinary step), the other 39 are static.
    assert s_info["mode"] == "eager"
    assert s_info["static_eager_steps"] == 39
    assert s_info["captures"] == 0 and s_info["error"] is None


def test_graph_mode_on_the_cpu_takes_the_ordinary_step(monkeypatch: pytest.MonkeyPatch) -> None:
    toks, _, _, info = run(monkeypatch, "1")
    assert len(toks) == 40
    assert info["mode"] == "graph"
    assert info["setups"] == 0 and info["static_eager_steps"] == 0 and info["replays"] == 0
