"""The Python API (`kvfast.Session`) on the embedded qwen3-tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import EMBEDDED
from kvfast import Session
from tokenizers import Tokenizer

PROMPT = "Once upon a time"


def greedy(prompt: str = PROMPT, **kwargs: Any) -> str:
    out = Session.from_pretrained().generate(prompt, **kwargs)
    assert isinstance(out, str)
    return out


# -- loading and properties ---------------------------------------------------------------------
def test_properties(session: Session) -> None:
    assert session.model_path == EMBEDDED
    assert session.device == "cpu" and session.dtype == "f32"
    c = session.config
    assert c["model_type"] == "qwen3" and c["vocab_size"] == 8192
    assert c["num_hidden_layers"] == 4 and c["num_key_value_heads"] == 2
    assert isinstance(session.tokenizer, Tokenizer)
    assert session.cache_len == 0
    r = repr(session)
    assert "qwen3-tiny" in r and "layers=4" in r and "cache_len=0" in r


def test_eos_ids_come_from_generation_config_then_tokenizer(session: Session) -> None:
    # generation_config and config.json say 0; tokenizer_config's eos_token is <|endoftext|> = 0.
    assert session.eos_token_ids == [0]


def test_eos_ids_merge_and_dedupe(model_copy: Path) -> None:
    gen = model_copy / "generation_config.json"
    gen.write_text(json.dumps({"eos_token_id": [7, 0, 7]}))
    tc = json.loads((model_copy / "tokenizer_config.json").read_text())
    tc["eos_token"] = {"content": "<|im_end|>"}  # AddedToken-dict form; <|im_end|> is id 2
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    assert Session.from_pretrained(model_copy).eos_token_ids == [7, 0, 2]


def test_eos_ids_fall_back_to_config_json(model_copy: Path) -> None:
    (model_copy / "generation_config.json").unlink()
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["eos_token_id"] = [5, 6]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert Session.from_pretrained(model_copy).eos_token_ids == [5, 6, 0]


# -- text ---------------------------------------------------------------------------------------
def test_encode_decode_round_trip(session: Session) -> None:
    text = "The old man looked at the sea, naïve — 世界 🙂."
    ids = session.encode(text)
    assert ids and all(type(i) is int for i in ids)
    assert session.decode(ids) == text
    assert session.decode(np.array(ids, dtype=np.int64)) == text
    # No BOS/EOS added, and special tokens written in the text are single ids.
    assert session.encode("<|im_start|>") == [1]  # <|im_start|> is id 1 in this vocabulary


def test_decode_skips_special_tokens_unless_asked(session: Session) -> None:
    ids = session.encode("<|im_start|>user\nHi<|im_end|>")
    assert session.decode(ids) == "user\nHi"
    assert session.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>"


def test_chat_template_of_embedded_model(session: Session) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert session.apply_chat_template(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Extra variables the template does not use are harmless.
    out = session.apply_chat_template(msgs[1:], add_generation_prompt=False, enable_thinking=False)
    assert out == "<|im_start|>user\nHi<|im_end|>\n"


def test_chat_template_sees_bos_and_eos(model_copy: Path) -> None:
    tc = json.loads((model_copy / "tokenizer_config.json").read_text())
    tc["chat_template"] = "[{{ bos_token }}|{{ eos_token }}|{{ messages | length }}]"
    tc["bos_token"] = "<|im_start|>"
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    s = Session.from_pretrained(model_copy)
    assert s.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "[<|im_start|>|<|endoftext|>|1]"
    )


def test_no_chat_template_is_a_clear_error(model_copy: Path) -> None:
    tc = json.loads((model_copy / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (model_copy / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="no chat template"):
        Session.from_pretrained(model_copy).apply_chat_template([{"role": "user", "content": "x"}])


def test_explicit_tokenizer_argument(model_copy: Path, session: Session) -> None:
    (model_copy / "tokenizer.json").unlink()
    text = "It was a bright cold day in April"
    want = session.encode(text)
    for tok in (EMBEDDED, EMBEDDED / "tokenizer.json", str(EMBEDDED), session.tokenizer):
        assert Session.from_pretrained(model_copy, tokenizer=tok).encode(text) == want
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Session.from_pretrained(model_copy, tokenizer=model_copy / "nowhere")


def test_ids_only_session(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    s = Session.from_pretrained(model_copy)
    assert s.tokenizer is None
    logits = s.prefill([1, 2, 3])
    assert logits is not None and logits.shape == (8192,)
    for call in (lambda: s.encode("hi"), lambda: s.decode([1]), lambda: s.generate("hi")):
        with pytest.raises(ValueError, match="no tokenizer.*tokenizer="):
            call()
    with pytest.raises(ValueError, match="no tokenizer"):
        s.generate([4, 5])
    assert s.cache_len == 3  # the failed generate did not prefill


# -- prefill, score, cache ----------------------------------------------------------------------
def test_prefill_shapes_dtype_and_cache_growth(session: Session) -> None:
    s = session
    ids = s.encode("It was a bright cold day in April")
    last = s.prefill(ids)
    assert last is not None and last.shape == (8192,) and last.dtype == np.float32
    assert np.all(np.isfinite(last))
    assert s.cache_len == len(ids)
    assert s.prefill(ids[:3], logits=None) is None
    assert s.cache_len == len(ids) + 3
    rows = s.prefill(np.array(ids[:5], dtype=np.int32), logits="all")
    assert rows is not None and rows.shape == (5, 8192) and rows.dtype == np.float32
    assert s.cache_len == len(ids) + 8
    assert s.engine.token_ids == ids + ids[:3] + ids[:5]


def test_prefill_all_rows_equal_last(session: Session) -> None:
    ids = session.encode("The cat sat on the mat.")
    rows = session.prefill(ids, logits="all")
    session.reset()
    last = session.prefill(ids)
    assert rows is not None and last is not None
    np.testing.assert_allclose(rows[-1], last, atol=1e-5)


def test_prefill_rejects_bad_input_without_touching_the_cache(session: Session) -> None:
    session.prefill([1, 2], logits=None)
    with pytest.raises(ValueError, match="logits"):
        session.prefill([3], logits="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty prompt"):
        session.prefill([])
    with pytest.raises(ValueError, match="empty prompt"):
        session.prefill(np.array([], dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        session.prefill([1.5, 2.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="8192"):
        session.prefill([5, 8192])
    assert session.cache_len == 2


def test_score_equals_log_softmax_of_prefill_logits(session: Session) -> None:
    ids = session.encode("The cat sat on the mat and looked out of the window.")
    logits = session.prefill(ids, logits="all")
    assert logits is not None
    session.reset()
    session.prefill(ids[:1], logits=None)
    nll = session.score(ids[1:])
    # -log_softmax(logits[t])[ids[t + 1]], computed stably in float64.
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    log_probs = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    want = -log_probs[np.arange(len(ids) - 1), ids[1:]]
    assert nll.shape == (len(ids) - 1,)
    assert np.all(np.isfinite(nll)) and np.all(nll > 0)
    np.testing.assert_allclose(nll, want, rtol=1e-4, atol=1e-4)
    assert session.cache_len == len(ids)  # score appends


def test_score_needs_a_cached_prefix(session: Session) -> None:
    with pytest.raises(ValueError, match="empty"):
        session.score([1, 2, 3])


def test_cache_info_and_reset(session: Session) -> None:
    info = session.cache_info()
    assert info["tokens"] == 0 and info["bytes"] == 0
    session.prefill(session.encode("a b c d e f g"), logits=None)
    n = session.cache_len
    info = session.cache_info()
    expected_keys = {"tokens", "layers", "kv_heads", "head_dim", "dtype", "tokens_per_head"}
    expected_keys |= {"bytes", "capacity_bytes", "bytes_per_token"}
    assert set(info) >= expected_keys
    assert info["tokens"] == n and info["layers"] == 4 and info["kv_heads"] == 2
    assert info["head_dim"] == 64 and info["dtype"] == "f32"
    assert info["tokens_per_head"] == [[n, n]] * 4
    # At least K and V (f32) for every layer and KV head; at most that plus the per-key bias.
    kv = 2 * 4 * 2 * 64 * 4
    assert kv * n <= info["bytes"] <= (kv + 4 * 2 * 4) * n
    assert info["capacity_bytes"] >= info["bytes"] > 0
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / n)
    session.reset()
    assert session.cache_len == 0 and session.engine.token_ids == []
    info = session.cache_info()
    assert info["tokens"] == 0 and info["bytes"] == 0
    assert info["tokens_per_head"] == [[0, 0]] * 4


# -- generate -----------------------------------------------------------------------------------
def test_greedy_generate_is_deterministic() -> None:
    a, b = greedy(max_new_tokens=24), greedy(max_new_tokens=24)
    assert a and a == b


def test_generated_text_is_the_decoded_new_tokens(session: Session) -> None:
    n0 = len(session.encode(PROMPT))
    text = session.generate(PROMPT, max_new_tokens=24)
    new = session.engine.token_ids[n0:]
    assert 0 < len(new) <= 24 and session.cache_len == n0 + len(new)
    assert text == session.decode([t for t in new if t not in session.eos_token_ids])


def test_stream_pieces_join_to_the_text_and_are_lazy(session: Session) -> None:
    want = greedy(max_new_tokens=24)
    n0 = len(session.encode(PROMPT))
    pieces = session.generate(PROMPT, max_new_tokens=24, stream=True)
    assert not isinstance(pieces, str)
    # The prompt is prefilled at call time, but no token is sampled before the first next().
    assert session.cache_len == n0
    first = next(pieces)
    assert n0 < session.cache_len < n0 + 24
    rest = list(pieces)
    assert rest and first + "".join(rest) == want
    assert all(isinstance(p, str) and p for p in rest)


def test_generate_continues_from_the_cache(session: Session) -> None:
    one_go = greedy(max_new_tokens=16)
    session.prefill(session.encode(PROMPT), logits=None)
    n0 = session.cache_len
    first = session.generate(max_new_tokens=6)
    assert session.cache_len == n0 + 6
    second = session.generate(max_new_tokens=10)
    assert session.cache_len == n0 + 16
    assert isinstance(first, str) and isinstance(second, str)
    assert session.decode(session.engine.token_ids[n0:]) == one_go
    assert one_go.startswith(first)


def test_prompt_as_ids_equals_prompt_as_text(session: Session) -> None:
    ids = session.encode(PROMPT)
    assert session.generate(np.array(ids), max_new_tokens=12) == greedy(max_new_tokens=12)


def test_max_new_tokens_zero(session: Session) -> None:
    assert session.generate(PROMPT, max_new_tokens=0) == ""
    assert session.cache_len == len(session.encode(PROMPT))
    assert list(session.generate(max_new_tokens=0, stream=True)) == []


def test_stop_strings_cut_the_text() -> None:
    full = greedy(max_new_tokens=40)
    stop = full[6:9]
    assert len(stop.strip()) >= 2, f"need a visible stop string in {full!r}"
    want = full[: full.index(stop)]
    assert greedy(max_new_tokens=40, stop=stop) == want
    assert greedy(max_new_tokens=40, stop=["zzzz", stop]) == want
    s = Session.from_pretrained()
    pieces = list(s.generate(PROMPT, max_new_tokens=40, stop=[stop, "zzzz"], stream=True))
    assert "".join(pieces) == want
    # Generation stopped soon after the stop string, not after max_new_tokens.
    assert s.cache_len < len(s.encode(PROMPT)) + 40
    # A stop string that never appears changes nothing.
    assert greedy(max_new_tokens=40, stop="\x00never") == full


def test_eos_ends_generation_and_is_not_in_the_text(model_copy: Path, session: Session) -> None:
    n0 = len(session.encode(PROMPT))
    session.generate(PROMPT, max_new_tokens=12)
    new = session.engine.token_ids[n0:]
    k = next(i for i in range(3, len(new)) if new[i] not in new[:i])  # first fresh id from 3 on
    (model_copy / "generation_config.json").write_text(json.dumps({"eos_token_id": new[k]}))
    s = Session.from_pretrained(model_copy)
    assert new[k] in s.eos_token_ids
    text = s.generate(PROMPT, max_new_tokens=12)
    assert text == session.decode(new[:k])
    assert s.engine.token_ids[n0:] == new[: k + 1]  # EOS is sampled and cached, then stop


def test_sampling_is_seeded() -> None:
    def run(seed: int) -> str:
        return greedy(max_new_tokens=32, temperature=1.0, top_p=0.95, seed=seed)

    assert run(1) == run(1)
    # Three 32-token samples at temperature 1 being identical is astronomically unlikely.
    assert len({run(1), run(2), run(3)}) > 1
    assert run(2) != greedy(max_new_tokens=32) or run(3) != greedy(max_new_tokens=32)


def test_sampling_filters_are_accepted() -> None:
    a = greedy(max_new_tokens=16, temperature=0.7, top_k=20, min_p=0.05, seed=0)
    b = greedy(
        max_new_tokens=16, temperature=0.7, top_k=20, min_p=0.05, repetition_penalty=1.3, seed=0
    )
    assert a and b
    # top_k=1 is greedy whatever the temperature.
    assert greedy(max_new_tokens=16, temperature=5.0, top_k=1, seed=3) == greedy(max_new_tokens=16)


def test_generate_needs_something_to_continue(session: Session) -> None:
    with pytest.raises(ValueError, match="nothing to continue from: the cache is empty"):
        session.generate()
    with pytest.raises(ValueError, match="empty prompt"):
        session.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        session.generate([])
    assert session.cache_len == 0


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_bad_generate_arguments_leave_the_cache_alone(
    session: Session, kwargs: dict[str, Any], word: str
) -> None:
    with pytest.raises(ValueError, match=word):
        session.generate(PROMPT, **kwargs)
    assert session.cache_len == 0
