"""Head-budget calibration: the greedy allocation, a profile measured on the embedded model,
loading it back (scaled to another budget), and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvfast import Session, cli
from kvfast.calibrate import calibrate_budgets, greedy_allocation, write_profile
from test_compact import CONTEXT


def test_greedy_spends_the_pool_where_keys_buy_the_most():
    steep = [(10, 5.0), (20, 3.0), (40, 2.0)]  # 0.2 then 0.05 nats per key
    flat = [(10, 5.0), (20, 4.9), (40, 4.8)]  # 0.01 then 0.005
    assert greedy_allocation([steep, flat], pool=50) == [40, 10]
    assert greedy_allocation([steep, flat], pool=40) == [20, 20], "steep's next step won't fit"
    assert greedy_allocation([flat, steep], pool=60) == [20, 40]
    # A curve that only drops after a plateau (or rises first) still gets its keys.
    bumpy = [(10, 5.0), (20, 5.5), (40, 1.0)]
    assert greedy_allocation([bumpy, flat], pool=50) == [40, 10]
    assert greedy_allocation([flat, flat], pool=100) == [40, 40], "never more than the top"


def test_profile_on_the_embedded_model_loads_and_scales(session: Session, tmp_path: Path):
    ids = session.encode(CONTEXT)
    profile = calibrate_budgets(
        session, ids, ratio=4, recent=16, levels=(0.5, 1, 2), progress=False
    )
    rows = len(profile["budgets"]), len(profile["budgets"][0])
    heads = rows[0] * rows[1]
    keys = [n for r in profile["budgets"] for n in r]
    assert sum(keys) <= profile["budget"] * heads
    assert all(n >= 20 for n in keys), "every head keeps at least sink + recent"
    assert len(profile["curves"]) == heads and profile["nll_full"] > 0
    for curve in profile["curves"].values():
        budgets = [b for b, _ in curve]
        assert budgets == sorted(budgets) and all(0 < nll < 20 for _, nll in curve)
    path = write_profile(profile, tmp_path / "profile.json")
    assert json.loads(path.read_text())["shares"]
    session.prefill(ids, logits=None)
    r = session.compact(ratio=4, recent=16, head_budgets=path)
    assert r.tokens_per_head_after == profile["budgets"]
    session.reset()
    session.prefill(ids, logits=None)
    half = session.compact(ratio=8, recent=8, head_budgets=path)
    assert sum(map(sum, half.tokens_per_head_after)) < sum(keys), "shares scale to the budget"
    session.reset()
    session.prefill(ids, logits=None)
    with pytest.raises(ValueError, match="needs ratio= or budget="):
        session.compact(head_budgets=path)


def test_cli_writes_a_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT * 2)
    out = tmp_path / "p.json"
    argv = ["calibrate-budgets", "--context", str(ctx), "--length", "300", "--ratio", "2"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads(out.read_text())["budgets"]
    assert cli.main([*argv[:2], str(tmp_path / "missing.txt"), "--out", str(out)]) == 2
