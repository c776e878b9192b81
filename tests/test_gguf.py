"""GGUF checkpoints: the real SmolLM2-135M-Instruct (Llama architecture, Q4_1 matrices, Q8_0
embeddings) against transformers reading the same file (tests/fixtures/golden/
smollm2-135m-q4_1.npz from scripts/make_gguf_fixtures.py), the tokenizer and chat template built
from its metadata, compaction on it, and bad GGUF input.

Tolerances: with dequantized weights (`CANDLE_DEQUANTIZE_ALL=1`) the logits equal transformers'
f32 ones to 1e-3 (measured 7.5e-5): names, tied embeddings and llama.cpp's permuted q/k rows are
handled exactly. With the default quantized matmuls, candle quantizes activations to 8 bits (as
llama.cpp does): max error <= 5% of the largest |logit| (measured 3%) and the argmax agrees.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES, smollm2_gguf
from kvfast import ModelLoadError, Session

GOLDEN = FIXTURES / "golden" / "smollm2-135m-q4_1.npz"


@pytest.fixture(scope="module")
def path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def smol(path: Path) -> Session:
    return Session.from_pretrained(path)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return dict(np.load(GOLDEN, allow_pickle=True))


def test_config_and_memory_come_from_the_gguf(smol: Session) -> None:
    c = smol.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"]) == ("llama", 30, 576)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert c["tie_word_embeddings"] and c["vocab_size"] == 49152
    assert c["rope_theta"] == 100000.0 and c["eos_token_ids"] == [2]
    # Matrices stay quantized: ~97 MB held, not the 538 MB of f32 weights.
    assert smol.engine.num_parameters > 134_000_000
    assert smol.engine.weight_bytes < 100_000_000


def test_tokenizer_from_metadata_matches_transformers(
    smol: Session, golden: dict[str, np.ndarray]
) -> None:
    for text, ids in zip(golden["texts"], golden["text_ids"], strict=True):
        assert smol.encode(str(text)) == [int(i) for i in ids], text
        assert smol.decode([int(i) for i in ids], skip_special_tokens=False) == text


def test_quantized_logits_close_to_transformers(smol: Session, golden: dict) -> None:
    smol.reset()
    got = smol.prefill([int(i) for i in golden["input_ids"]], logits="all")[golden["positions"]]
    ref = golden["logits_f32"]
    err = float(np.abs(got - ref).max())
    assert err <= 0.05 * float(np.abs(ref).max()), f"max abs logit error {err:.3f}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    smol.reset()


def test_dequantized_logits_equal_transformers(path: Path) -> None:
    # A subprocess: candle reads CANDLE_DEQUANTIZE_ALL once per thread.
    code = (
        "import numpy as np, sys; from kvfast import Session\n"
        f"g = dict(np.load({str(GOLDEN)!r}, allow_pickle=True))\n"
        f"s = Session.from_pretrained({str(path)!r})\n"
        "l = s.prefill([int(i) for i in g['input_ids']], logits='all')[g['positions']]\n"
        "print(float(np.abs(l - g['logits_f32']).max()))\n"
        "s.reset(); s.prefill([int(i) for i in g['input_ids']], logits=None)\n"
        "print(list(s.engine.generate(max_new_tokens=16, eos_ids=[])) == g['greedy_f32'].tolist())"
    )
    env = {**os.environ, "CANDLE_DEQUANTIZE_ALL": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    err, greedy = r.stdout.split()
    assert float(err) <= 1e-3, f"dequantized max abs logit error {err}"
    assert greedy == "True", "greedy continuation differs from transformers'"


def test_generates_and_chats_and_compacts(smol: Session) -> None:
    smol.reset()
    smol.prefill(smol.encode("The capital of France is"), logits=None)
    assert smol.generate(max_new_tokens=4).startswith(" Paris")
    chat = smol.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in chat
    assert 2 in smol.eos_token_ids
    text = " ".join(["The lighthouse keeper counted the steps."] * 40)
    for method in ("am", "snapkv"):
        smol.reset()
        smol.prefill(smol.encode(text), logits=None)
        r = smol.compact(ratio=4, method=method)
        assert r.ratio > 3
        assert np.isfinite(smol.score(smol.encode(" The keeper"))).all()
    smol.reset()


def _gguf_bytes(arch: str) -> bytes:
    """A GGUF v3 header with one string field, general.architecture, and no tensors."""

    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x)) + x.encode()

    return (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + s("general.architecture")
        + struct.pack("<I", 8)
        + s(arch)
    )


def test_bad_gguf_files_raise_clear_errors(tmp_path: Path, path: Path) -> None:
    bert = tmp_path / "bert.gguf"
    bert.write_bytes(_gguf_bytes("bert"))
    with pytest.raises(ModelLoadError, match='architecture "bert" is not supported'):
        Session.from_pretrained(bert)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        Session.from_pretrained(junk)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:20_000_000])
    with pytest.raises(ModelLoadError, match="truncated"):
        Session.from_pretrained(cut)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Session.from_pretrained(tmp_path / "missing.gguf")


def test_eval_runs_on_a_gguf_checkpoint(path: Path, tmp_path: Path) -> None:
    from kvfast.eval import main as eval_main
    from kvfast.eval.common import model_fingerprint

    assert len(model_fingerprint(path)) == 16
    argv = "ppl --methods full --context 128 --continuation 16 --windows 1 --out".split()
    assert eval_main([*argv, str(tmp_path), "--model", str(path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows[0]["key"] == "full" and np.isfinite(rows[0]["ppl"])
