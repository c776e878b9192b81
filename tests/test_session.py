"""The Python API on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
from kvfast import Session


def test_encode_decode_round_trip(session: Session) -> None:
    text = "The old man looked at the sea."
    ids = session.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert session.decode(ids) == text


def test_prefill_shapes_and_cache_growth() -> None:
    s = Session.from_pretrained()
    vocab = s.config["vocab_size"]
    ids = s.encode("It was a bright cold day in April")
    last = s.prefill(ids)
    assert last.shape == (vocab,) and last.dtype == np.float32
    assert s.cache_len == len(ids)
    assert s.prefill(ids[:3], logits=None) is None
    rows = s.prefill(np.array(ids[:5]), logits="all")
    assert rows.shape == (5, vocab) and rows.dtype == np.float32
    assert s.cache_len == len(ids) + 8
    with pytest.raises(ValueError, match="logits"):
        s.prefill(ids, logits="first")  # type: ignore[arg-type]
    assert s.cache_len == len(ids) + 8


def test_greedy_generate_is_deterministic_and_stream_joins() -> None:
    a = Session.from_pretrained().generate("Once upon a time", max_new_tokens=24)
    b = Session.from_pretrained().generate("Once upon a time", max_new_tokens=24)
    assert isinstance(a, str) and a and a == b
    pieces = list(
        Session.from_pretrained().generate("Once upon a time", max_new_tokens=24, stream=True)
    )
    assert len(pieces) > 1 and "".join(pieces) == a


def test_generate_continues_from_cache_and_counts_tokens() -> None:
    s = Session.from_pretrained()
    s.prefill(s.encode("Once upon a time"), logits=None)
    n0 = s.cache_len
    s.generate(max_new_tokens=10)
    assert n0 < s.cache_len <= n0 + 10
    assert s.generate(max_new_tokens=0) == ""


def test_stop_strings_cut_the_text() -> None:
    full = Session.from_pretrained().generate("Once upon a time", max_new_tokens=40)
    stop = full[5:8]
    assert stop.strip(), "need a visible stop string"
    cut = Session.from_pretrained().generate("Once upon a time", max_new_tokens=40, stop=stop)
    assert cut == full[: full.index(stop)]
    streamed = Session.from_pretrained().generate(
        "Once upon a time", max_new_tokens=40, stop=[stop, "zzzz"], stream=True
    )
    assert "".join(streamed) == cut


def test_sampling_is_seeded() -> None:
    def run(seed: int) -> str:
        return Session.from_pretrained().generate(
            "Once upon a time", max_new_tokens=32, temperature=1.0, top_p=0.95, seed=seed
        )

    assert run(1) == run(1)
    assert len({run(1), run(2), run(3)}) > 1


def test_score_equals_log_softmax_of_logits() -> None:
    s = Session.from_pretrained()
    ids = s.encode("The cat sat on the mat and looked out of the window.")
    logits = s.prefill(ids, logits="all")
    s2 = Session.from_pretrained()
    s2.prefill(ids[:1], logits=None)
    nll = s2.score(ids[1:])
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    want = lse[:-1] - logits[np.arange(len(ids) - 1), ids[1:]]
    assert nll.shape == (len(ids) - 1,) and np.all(np.isfinite(nll)) and np.all(nll > 0)
    np.testing.assert_allclose(nll, want, atol=1e-3)
    assert s2.cache_len == len(ids)


def test_reset_and_cache_info() -> None:
    s = Session.from_pretrained()
    s.prefill(s.encode("a b c d e f g"), logits=None)
    info = s.cache_info()
    c = s.config
    assert info["tokens"] == s.cache_len
    tph = info["tokens_per_head"]
    assert len(tph) == c["num_hidden_layers"]
    assert all(len(r) == c["num_key_value_heads"] and set(r) == {s.cache_len} for r in tph)
    per_token = c["num_hidden_layers"] * c["num_key_value_heads"] * (2 * c["head_dim"] * 4 + 4)
    assert info["bytes"] == per_token * s.cache_len
    assert info["capacity_bytes"] >= info["bytes"]
    s.reset()
    assert s.cache_len == 0 and s.cache_info()["bytes"] == 0


def test_generate_needs_something_to_continue() -> None:
    s = Session.from_pretrained()
    with pytest.raises(ValueError, match="cache is empty"):
        s.generate()
    with pytest.raises(ValueError, match="empty prompt"):
        s.generate("")
    with pytest.raises(ValueError, match="empty prompt"):
        s.prefill([])


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_bad_sampling_arguments_leave_cache_alone(kwargs: dict, word: str) -> None:
    s = Session.from_pretrained()
    with pytest.raises(ValueError, match=word):
        s.generate("Once upon a time", **kwargs)
    assert s.cache_len == 0


def test_chat_template_of_embedded_model(session: Session) -> None:
    text = session.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    text = session.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=False
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n"


def test_eos_ids_and_repr(session: Session) -> None:
    assert session.eos_token_ids == [0]
    assert "layers=4" in repr(session)
