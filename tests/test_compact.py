"""`Session.compact` on the embedded qwen3-tiny model: every method, budgets, the report, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from kvfast import Session
from kvfast.compaction import METHODS, CompactionReport

CONTEXT = (
    "The old lighthouse keeper lived alone on the rocky island. Every evening he climbed the "
    "stairs, lit the great lamp and watched the ships pass. "
) * 12


QUESTION = "What did the keeper light?"


def prefilled(session: Session) -> list[int]:
    ids = session.encode(CONTEXT)
    session.prefill(ids, logits=None)
    return ids


def test_compact_shrinks_memory_and_keeps_decoding(session: Session) -> None:
    ids = prefilled(session)
    before = session.cache_info()
    report = session.compact(ratio=4, recent=16)
    after = session.cache_info()
    assert isinstance(report, CompactionReport)
    assert report.tokens_per_head_before == before["tokens_per_head"]
    assert report.tokens_per_head_after == after["tokens_per_head"]
    assert report.bytes_before == before["bytes"] and report.bytes_after == after["bytes"]
    assert report.ratio == pytest.approx(before["bytes"] / after["bytes"])
    assert report.ratio > 3.5
    assert report.budget == round(len(ids) / 4)
    # Global budgets: the total matches the uniform budget, the split does not.
    assert sum(map(sum, report.tokens_per_head_after)) <= report.budget * 8
    assert report.seconds_queries > 0 and report.seconds_fit > 0
    # Default: the repeat instruction, then the context again.
    assert report.query_tokens > len(ids), report.query_tokens
    fids = [f for layer in report.head_fidelity for f in layer]
    assert all(f is not None and 0 <= f.out_rel_err < np.inf for f in fids)
    assert np.mean([f.out_rel_err for f in fids if f is not None]) < 1
    assert "->" in str(report) and "keys per head" in str(report)
    # Positions continue from the original length; generation and scoring still work.
    assert session.cache_len == len(ids)
    text = session.generate(" The keeper", max_new_tokens=8)
    assert isinstance(text, str) and session.cache_len > len(ids)
    nll = session.score(session.encode(" the lamp"))
    assert np.all(np.isfinite(nll))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_budget(session: Session, method: str) -> None:
    ids = prefilled(session)
    report = session.compact(budget=48, method=method, recent=16)
    kept = [n for layer in report.tokens_per_head_after for n in layer]
    assert sum(kept) <= 48 * len(kept)
    assert all(n >= 20 for n in kept), "sink + recent stay"
    if method in ("streaming", "uniform", "random"):
        assert all(f is None for layer in report.head_fidelity for f in layer)
        assert kept == [48] * len(kept)
    else:
        assert all(f is not None for layer in report.head_fidelity for f in layer)
    logits = session.prefill(session.encode(" The"), logits="last")
    assert logits is not None and np.all(np.isfinite(logits))
    assert session.cache_len == len(ids) + 1


@pytest.mark.parametrize("fit", ["values", "am"])
def test_attention_matching_fits_better_than_its_selection_alone(
    session: Session, fit: str
) -> None:
    prefilled(session)
    fitted = session.compact(ratio=4, recent=16, fit=fit)
    session.reset()
    prefilled(session)
    raw = session.compact(ratio=4, recent=16, fit="none")
    assert raw.tokens_per_head_after == fitted.tokens_per_head_after, "same selection"

    def err(r: CompactionReport) -> float:
        return float(np.mean([f.out_rel_err for f in r.layer_fidelity if f is not None]))

    assert err(fitted) < err(raw)


def _biases(session: Session) -> np.ndarray:
    info = session.cache_info()
    return np.concatenate(
        [
            session.engine.head_cache(la, h)[2]
            for la in range(info["layers"])
            for h in range(info["kv_heads"])
        ]
    )


@pytest.mark.parametrize(("ratio", "fit"), [(2, "values"), (4, "am"), (16, "am"), (20, "values")])
def test_default_fit_raises_kept_keys_from_4x_to_16x_and_fits_values_outside(
    session: Session, ratio: float, fit: str
) -> None:
    ids = prefilled(session)
    r = session.compact(ratio=ratio, sink=2, recent=2)
    assert r.fit == fit
    # The ridge follows the fit: light with biases, firm for values alone.
    assert r.ridge == {"am": 1.0, "values": 10.0}[fit]
    b = _biases(session)
    assert b.min() >= -1e-6, "the default bounds never lower a kept key"
    if fit == "am":
        assert b.max() > 1e-3
    else:
        assert np.all(b == 0)
    # The default is that fit with that ridge (the same cache), and not with the other ridge.
    heads = range(session.cache_info()["kv_heads"])
    kept = [session.engine.head_cache(0, h)[1] for h in heads]
    for ridge, same in ((r.ridge, True), (11.0 - r.ridge, False)):
        session.reset()
        session.prefill(ids, logits=None)
        o = session.compact(ratio=ratio, sink=2, recent=2, fit=fit, ridge=ridge)
        assert o.ridge == ridge
        got = [session.engine.head_cache(0, h)[1] for h in heads]
        assert all(np.array_equal(a, b) for a, b in zip(got, kept, strict=True)) == same


def test_fitted_biases_stay_in_bounds_given_as_a_list(session: Session) -> None:
    # Bounds arrive as a list from JSON configs and CLI parsing; the fitted log-weights of
    # the middle block must stay inside them (sink and recent keep bias 0).
    prefilled(session)
    r = session.compact(ratio=4, recent=16, fit="am", beta_bounds=[-0.5, 0.25])
    biases = _biases(session)
    assert r.bytes_after < r.bytes_before
    assert biases.min() >= -0.5 - 1e-5 and biases.max() <= 0.25 + 1e-5
    assert np.any(np.abs(biases) > 1e-3), "some biases were fitted"


def test_on_policy_refits_layers_after_the_first(session: Session) -> None:
    # The paper's order (off by default): layer l's reference queries run over layers < l
    # already compacted. The first layer sees the same queries either way; the budgets come
    # from one off-policy pass in both, so only the later layers' keys and values may differ.
    ids = prefilled(session)
    kw = dict(ratio=4, recent=16, score="rms", ridge=None)
    on = session.compact(on_policy=True, **kw)
    heads_on = [session.engine.head_cache(la, 0) for la in range(len(on.head_fidelity))]
    session.reset()
    session.prefill(ids, logits=None)
    off = session.compact(on_policy=False, **kw)
    heads_off = [session.engine.head_cache(la, 0) for la in range(len(off.head_fidelity))]
    assert on.tokens_per_head_after == off.tokens_per_head_after
    for a, b in zip(heads_on[0], heads_off[0], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert any(
        not np.allclose(a[1], b[1], atol=1e-4)
        for a, b in zip(heads_on[1:], heads_off[1:], strict=True)
    ), "on-policy queries changed a later layer's fit"


def test_context_queries_and_repeated_compaction(session: Session) -> None:
    prefilled(session)
    session.compact(ratio=2, queries="context", recent=16)
    # The cache is compacted: the context's own queries cannot be recomputed any more...
    with pytest.raises(ValueError, match="compacted"):
        session.compact(ratio=2, queries="context", recent=16)
    # ...but the repeat queries refit the current (biased) cache.
    first = session.cache_info()["bytes"]
    r = session.compact(ratio=2, recent=16, queries="repeat")
    assert r.bytes_before == first and r.bytes_after < first
    assert r.query_tokens > session.cache_len, "repeat prompt = instruction + the context"
    assert session.generate(max_new_tokens=4) is not None


def test_head_budget_table_from_json(session: Session, tmp_path: Path) -> None:
    prefilled(session)
    table = [[40, 60], [30, 70], [50, 50], [64, 36]]
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"budgets": table}))
    r = session.compact(head_budgets=str(path), recent=16)
    assert r.tokens_per_head_after == table
    assert r.budget == 50


def test_chunked_fit_bounds_blocks_and_matches_one_chunk_when_large(session: Session) -> None:
    ids = prefilled(session)
    probe = session.encode(" The keeper")

    def after(**kw: object) -> tuple[CompactionReport, np.ndarray]:
        session.reset()
        session.prefill(ids, logits=None)
        r = session.compact(ratio=4, recent=16, **kw)
        return r, np.asarray(session.prefill(probe, logits="all"))

    base, want = after()
    same, got = after(chunk_size=len(ids))
    np.testing.assert_array_equal(got, want)
    chunked, other = after(chunk_size=32)
    # Same selection and memory; the fit differs (each chunk matched alone) but still fits.
    assert chunked.tokens_per_head_after == base.tokens_per_head_after
    assert chunked.bytes_after == base.bytes_after
    assert not np.array_equal(other, want) and np.all(np.isfinite(other))
    unfitted, _ = after(chunk_size=32, fit="none")

    def errs(r: CompactionReport) -> list[float]:
        return [f.out_rel_err for f in r.layer_fidelity if f is not None]

    assert errs(chunked) and np.mean(errs(chunked)) < np.mean(errs(unfitted)), "chunks still fit"
    with pytest.raises(ValueError, match="chunk_size"):
        session.compact(ratio=2, chunk_size=0)


def test_entropy_budgets_split_one_pool_unevenly(session: Session) -> None:
    prefilled(session)
    r = session.compact(budget=48, head_budgets="entropy", recent=16)
    kept = [n for layer in r.tokens_per_head_after for n in layer]
    # The pool is the uniform budget's, every head keeps sink + recent, the split follows the
    # heads' attention entropy (not all equal) and differs from the global top-k split.
    assert sum(kept) == 48 * len(kept)
    assert min(kept) >= 20 and len(set(kept)) > 1
    session.reset()
    prefilled(session)
    g = session.compact(budget=48, head_budgets="global", recent=16)
    assert g.tokens_per_head_after != r.tokens_per_head_after
    assert session.generate(max_new_tokens=4) is not None


def test_head_floor_gives_every_head_a_share_of_the_global_pool(session: Session) -> None:
    prefilled(session)
    plain = session.compact(budget=48, recent=16)
    kept = [n for layer in plain.tokens_per_head_after for n in layer]
    middle = 48 - 4 - 16  # the average middle budget (sink 4, recent 16)
    assert min(kept) < 20 + middle // 2, "this cache's global split starves some head"
    session.reset()
    prefilled(session)
    floored = session.compact(budget=48, recent=16, head_floor=0.5)
    got = [n for layer in floored.tokens_per_head_after for n in layer]
    # The pool is the same; every head keeps sink + recent + half the average middle.
    assert sum(got) == sum(kept)
    assert min(got) >= 20 + middle // 2 and got != kept
    assert session.generate(max_new_tokens=4) is not None
    session.reset()
    prefilled(session)
    even = session.compact(budget=48, recent=16, head_floor=1.0)
    assert all(n == 48 for layer in even.tokens_per_head_after for n in layer)
    for bad in (-0.1, 1.5, float("nan"), True, "half"):
        with pytest.raises(ValueError, match="head_floor"):
            session.compact(budget=48, head_floor=bad)  # type: ignore[arg-type]


def test_tail_check_gives_some_heads_the_values_only_fit_and_leaves_the_rest(
    session: Session,
) -> None:
    def heads() -> list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        layers = len(session.cache_info()["tokens_per_head"])
        n_kv = len(session.cache_info()["tokens_per_head"][0])
        return [[session.engine.head_cache(la, h) for h in range(n_kv)] for la in range(layers)]

    prefilled(session)
    tail_before = [[k[-16:] for k, _, _ in layer] for layer in heads()]
    plain = session.compact(budget=48, recent=16, fit="am")  # the default: no check
    biased = heads()
    session.reset()
    prefilled(session)
    session.compact(budget=48, recent=16, fit="values", ridge=10.0)
    values_only = heads()
    session.reset()
    prefilled(session)
    checked = session.compact(budget=48, recent=16, fit="am", tail_check=64)
    got = heads()
    assert not any(x for layer in plain.tail_values_only for x in layer)
    flags = checked.tail_values_only
    switched = [(la, h) for la, row in enumerate(flags) for h, x in enumerate(row) if x]
    n_heads = sum(len(row) for row in checked.tail_values_only)
    assert 0 < len(switched) < n_heads, "on this cache the check keeps some biases, drops others"
    for la, layer in enumerate(got):
        for h, (k, v, b) in enumerate(layer):
            want = values_only[la][h] if (la, h) in switched else biased[la][h]
            # The same keys, the tail's exactly as before (re-run for its queries, restored).
            np.testing.assert_array_equal(k, want[0])
            np.testing.assert_array_equal(k[-16:], tail_before[la][h])
            np.testing.assert_allclose(v, want[1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(b, want[2], rtol=1e-5, atol=1e-6)
    assert session.generate(max_new_tokens=4) is not None
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="tail_check"):
            session.compact(budget=48, tail_check=bad)  # type: ignore[arg-type]


def test_task_guided_compaction_shares_one_selection_per_layer(session: Session) -> None:
    prefilled(session)
    r = session.compact(ratio=4, task=QUESTION, recent=16)
    assert 0 < r.query_tokens < 40
    # One selection per layer (Latent Briefing): every head of a layer keeps the same count,
    # at most the budget; a strict threshold keeps fewer keys than a loose one.
    assert all(len(set(layer)) == 1 for layer in r.tokens_per_head_after)
    assert all(n <= r.budget for layer in r.tokens_per_head_after for n in layer)
    kept = {}
    for tau in (0.0, 50.0):
        session.reset()
        prefilled(session)
        t = session.compact(
            ratio=4, task="What did the keeper light?", recent=16, task_threshold=tau
        )
        kept[tau] = sum(map(sum, t.tokens_per_head_after))
    assert kept[50.0] < kept[0.0]
    # Without a threshold the heads select on their own (global budgets spend the pool).
    session.reset()
    prefilled(session)
    own = session.compact(
        ratio=4, task="What did the keeper light?", recent=16, task_threshold=None
    )
    assert sum(map(sum, own.tokens_per_head_after)) >= kept[0.0]
    assert session.generate(max_new_tokens=4) is not None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ratio": 0.5}, "ratio must be"),
        ({"ratio": float("nan")}, "ratio must be"),
        ({"budget": 10_000}, "below the cache length"),
        ({"budget": 30}, "sink \\+ recent"),
        ({"ratio": 2, "budget": 50}, "exactly one"),
        ({}, "exactly one"),
        ({"ratio": 2, "method": "magic"}, "unknown method"),
        ({"ratio": 2, "queries": "oracle"}, "unknown query source"),
        ({"ratio": 2, "fit": "weights"}, "fit must be"),
        ({"ratio": 2, "ridge": "firm"}, "ridge must be"),
        ({"ratio": 2, "ridge": -1.0}, "ridge must be"),
        ({"ratio": 2, "head_budgets": "nonsense"}, "is not"),
        ({"ratio": 2, "layers": [7]}, "layers"),
        ({"ratio": 2, "beta_bounds": (3.0, -3.0)}, "beta_bounds"),
        ({"ratio": 2, "head_floor": 2.0}, "head_floor"),
        ({"ratio": 2, "task": "why?", "method": "snapkv"}, "task"),
    ],
)
def test_bad_arguments_leave_the_cache_unchanged(
    session: Session, kwargs: dict[str, object], match: str
) -> None:
    prefilled(session)
    before = session.cache_info()
    with pytest.raises(ValueError, match=match):
        session.compact(**kwargs)  # type: ignore[arg-type]
    assert session.cache_info() == before


def test_malformed_budget_file_and_empty_cache(session: Session, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty cache"):
        session.compact(ratio=2)
    prefilled(session)
    bad = tmp_path / "b.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        session.compact(head_budgets=bad)
    bad.write_text(json.dumps({"budgets": [[1, "x"]]}))
    with pytest.raises(ValueError, match="table of non-negative ints"):
        session.compact(head_budgets=bad)
    bad.write_text(json.dumps({"budgets": [[40, 40]]}))
    with pytest.raises(ValueError, match="table"):
        session.compact(head_budgets=bad, recent=16)


def test_self_study_queries_leave_no_trace_and_compact(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = prefilled(session)
    logits = session.engine.last_logits()
    prompt = session.encode(" Question: what did the keeper do?")
    a = session.engine.generate_scratch(prompt, max_new_tokens=12, temperature=0.8, seed=1)
    b = session.engine.generate_scratch(prompt, max_new_tokens=12, temperature=0.8, seed=1)
    assert a == b and 0 < len(a) <= 12
    assert session.engine.token_ids == ids and session.cache_len == len(ids)
    np.testing.assert_array_equal(session.engine.last_logits(), logits)
    study = session.compact(ratio=4, recent=16, queries="self-study")
    assert study.query_tokens > 3 * 10, "three prompts with their answers"
    # Generating the turns counts as making the reference queries.
    session.reset()
    prefilled(session)
    slow_turns = session._self_study_ids

    def slow(seed: int) -> list[int]:
        time.sleep(0.3)
        return slow_turns(seed)

    monkeypatch.setattr(session, "_self_study_ids", slow)
    assert session.compact(ratio=4, recent=16, queries="self-study").seconds_queries >= 0.3
    monkeypatch.undo()
    session.reset()
    prefilled(session)
    both = session.compact(ratio=4, recent=16, queries="repeat+self-study")
    assert both.query_tokens > len(ids) + study.query_tokens // 2
    assert session.generate(max_new_tokens=4) is not None


def test_inspection_apis_show_the_cache_and_leave_it_unchanged(session: Session) -> None:
    ids = prefilled(session)
    info = session.cache_info()
    qs = session.engine.reference_queries(ids[:10])
    assert len(qs) == info["layers"]
    assert qs[0].shape[1:] == (10, info["head_dim"]) and qs[0].dtype == np.float32
    now = session.cache_info()
    now.pop("capacity_bytes"), info.pop("capacity_bytes")  # the buffer may have grown
    assert now == info, "queries are captured off the cache"
    k, v, b = session.engine.head_cache(1, 0)
    assert k.shape == v.shape == (len(ids), info["head_dim"]) and np.all(b == 0)
    session.compact(ratio=4, recent=16, fit="am")
    rows = session.cache_info()["tokens_per_head"]
    heads = [(la, h) for la in range(info["layers"]) for h in range(info["kv_heads"])]
    biased = 0
    for la, h in heads:
        k1 = k if (la, h) == (1, 0) else None
        k2, _, b2 = session.engine.head_cache(la, h)
        assert len(k2) == len(b2) == rows[la][h]
        biased += bool(np.any(b2 != 0))
        if k1 is not None:  # kept keys are original keys: the fit changes biases and values
            assert all(np.any(np.all(k1 == row, axis=1)) for row in k2)
    assert biased > 0, "the fitted biases are in the cache"
    with pytest.raises(ValueError, match="no head"):
        session.engine.head_cache(99, 0)
    with pytest.raises(ValueError, match="no token ids"):
        session.engine.reference_queries([])


@pytest.mark.parametrize("family", ["llama-odd", "qwen2-odd"])
def test_compaction_works_on_the_other_families(family: str) -> None:
    # No QK-norm (Llama, Qwen2) and q/k/v biases (Qwen2): the reference queries are just the
    # rotated projections; AM and a baseline compact and decoding continues.
    s = Session.from_pretrained(Path(__file__).parent / "fixtures" / "models" / family)
    ids = [int(i) for i in np.random.default_rng(0).integers(2, 512, 300)]
    for method in ("am", "snapkv"):
        s.reset()
        s.prefill(ids[:280], logits=None)
        r = s.compact(ratio=4, method=method)
        assert r.ratio > 3
        assert np.isfinite(s.score(ids[280:])).all()
