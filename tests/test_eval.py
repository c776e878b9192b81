"""`kvfast eval`: every subcommand at a tiny size on the embedded model, its results.json schema
and sanity (the full cache's numbers equal Session's own, fidelity 0 for the full cache), resume,
the report, and bad input."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from kvfast import Session
from kvfast.cli import main as cli_main
from kvfast.eval import main as eval_main
from kvfast.eval.common import DEFAULT_TEXT, parse_methods
from kvfast.eval.needle import make_cases
from kvfast.eval.qa import exact_match, f1, normalize

SHARED = Path(__file__).resolve().parents[2] / "shared"
RUN_KEYS = {
    *"subcommand kvfast command config model model_hash device dtype rows".split(),
}


def run(tmp: Path, *argv: str) -> dict[str, Any]:
    assert eval_main([*argv, "--out", str(tmp)]) == 0
    data = json.loads((tmp / "results.json").read_text())
    assert RUN_KEYS <= set(data), f"results.json lacks {RUN_KEYS - set(data)}"
    assert data["subcommand"] == argv[0]
    assert (tmp / "results.md").is_file()
    for row in data["rows"]:
        assert {"key", "method", "ratio", "budget"} <= set(row), row
    return data


def rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in data["rows"]}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval")


def test_method_specs_parse_options_and_reject_typos() -> None:
    (bounded,) = parse_methods("am:fit=am:beta_bounds=0/3")
    assert bounded.options == {"fit": "am", "beta_bounds": (0.0, 3.0)}
    with pytest.raises(ValueError, match="low/high"):
        parse_methods("am:beta_bounds=3")
    (fit_none,) = parse_methods("am:fit=none:score=max")
    assert fit_none.options == {"fit": "none", "score": "max"}  # words stay words
    full, am = parse_methods("full, am:queries=context:head_budgets=uniform:ridge=none")
    assert full.is_full and am.method == "am"
    assert am.options == {"queries": "context", "head_budgets": "uniform", "ridge": None}
    # ridge defaults to the word "auto" but takes numbers.
    ridges = parse_methods("am:ridge=10,am:ridge=0.5,am:ridge=auto")
    assert [m.options["ridge"] for m in ridges] == [10, 0.5, "auto"]
    with pytest.raises(ValueError, match="unknown method 'amm'"):
        parse_methods("amm")
    with pytest.raises(ValueError, match="bad option 'querys=context'"):
        parse_methods("am:querys=context")
    # kv= picks the cache's storage for the cell; it is not a compaction option.
    fk, ak = parse_methods("full:kv=int4,am:kv=int2:queries=context")
    assert fk.is_full and fk.kv_dtype == "int4" and fk.name == "full:kv=int4"
    assert ak.kv_dtype == "int2" and ak.options == {"queries": "context"}
    with pytest.raises(ValueError, match="'full' takes no options"):
        parse_methods("full:queries=context")


def test_ppl_kv_cells_store_the_cache_quantized(out: Path) -> None:
    folder = out / "ppl-kv"
    data = run(
        folder,
        *"ppl --methods full,full:kv=int2,streaming:kv=int4 --ratios 4 --context 256 "
        "--continuation 16 --windows 1".split(),
    )
    r = rows(data)
    # int2 codes: well under a quarter of the f32 cache; int4 at 4x: under a sixteenth.
    assert r["full:kv=int2"]["kv_bytes"] < 0.25 * r["full"]["kv_bytes"]
    assert r["streaming:kv=int4@4x"]["kv_bytes"] < r["full"]["kv_bytes"] / 16
    assert r["full:kv=int2"]["ppl"] != r["full"]["ppl"]
    assert "full:kv=int2" in (folder / "results.md").read_text()


def test_ppl_full_equals_session_score_and_compaction_holds_fewer_bytes(out: Path) -> None:
    args = (
        *(
            "ppl --methods full,streaming --ratios 4 --context 256 --continuation 32 --windows 2"
        ).split(),
    )
    data = run(out / "ppl", *args)
    r = rows(data)
    assert set(r) == {"full", "streaming@4x", "sliding-window"}
    # The full cache's NLL is exactly Session.score's on the same window.
    s = Session.from_pretrained()
    ids = s.encode(DEFAULT_TEXT.read_text())
    s.prefill(ids[:256], logits=None)
    want = float(np.mean(s.score(ids[256:288])))
    assert r["full"]["window_nll"][0] == pytest.approx(want, abs=1e-6)
    assert len(r["full"]["window_nll"]) == 2 and r["full"]["tokens"] == 64
    assert math.isfinite(r["full"]["ppl"]) and r["full"]["ppl"] > 1
    assert r["streaming@4x"]["kv_bytes"] < 0.3 * r["full"]["kv_bytes"]
    assert math.isfinite(r["sliding-window"]["ppl"]) and r["sliding-window"]["tokens"] == 575
    assert (out / "ppl" / "ppl.png").stat().st_size > 1000
    assert "| streaming | 4x |" in (out / "ppl" / "results.md").read_text()


def test_a_rerun_resumes_and_measures_only_new_cells(out: Path) -> None:
    folder = out / "resume"
    args = (*"ppl --methods full --ratios 4 --context 128 --continuation 16 --windows 1".split(),)
    run(folder, *args)
    data = json.loads((folder / "results.json").read_text())
    data["rows"][0]["ppl"] = -1.0  # a marker: a resumed run must not measure "full" again
    data["note"] = "relabelled by hand"
    (folder / "results.json").write_text(json.dumps(data))
    again = run(folder, *args[:2], "full,random", *args[3:])
    assert rows(again)["full"]["ppl"] == -1.0
    assert json.loads((folder / "results.json").read_text())["note"] == "relabelled by hand"
    assert "random@4x" in rows(again)
    # Other cases (another context length) cannot be mixed into the same file.
    assert eval_main([*args[:6], "64", *args[7:], "--out", str(folder)]) == 2


def test_a_folder_of_another_run_is_refused(out: Path, model_copy: Path) -> None:
    folder = out / "other"
    run(
        folder,
        *"ppl --methods full --context 128 --continuation 16 --windows 1".split(),
    )
    (model_copy / "config.json").write_text(
        (model_copy / "config.json")
        .read_text()
        .replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    )
    code = eval_main(
        [
            "ppl",
            "--model",
            str(model_copy),
            *"--methods full --context 128 --continuation 16 --out".split(),
            str(folder),
        ]
    )
    assert code == 2


def test_needle_cases_hide_every_needle_and_the_run_scores_them(out: Path) -> None:
    s = Session.from_pretrained()

    class A:
        haystack, lengths, depths = DEFAULT_TEXT, "512", "0.5"
        tasks, cases, seed, limit = "single,multikey,multivalue", 1, 0, None

    cases = make_cases(s, A)  # type: ignore[arg-type]
    assert [c["task"] for c in cases] == ["single", "multikey", "multivalue"]
    for c in cases:
        text = s.decode(c["context"])
        assert len(c["context"]) + len(c["question"]) <= 512
        assert all(f"is: {v}." in text for v in c["answers"])
    assert s.decode(cases[1]["context"]).count("special magic number") == 4
    assert len(cases[2]["answers"]) == 3
    data = run(
        out / "needle",
        *(
            "needle --methods full,streaming --ratios 4 --lengths "
            "512 --depths 0.5 --tasks single,multikey,multivalue --cases 1"
        ).split(),
    )
    r = rows(data)
    for row in r.values():
        assert 0 <= row["accuracy"] <= 1
        assert set(row["by_task"]) == {"single", "multikey", "multivalue"}
        assert len(row["cases"]) == 3 and all("output" in c for c in row["cases"])
    assert r["streaming@4x"]["kv_bytes"] < r["full"]["kv_bytes"]
    assert (out / "needle" / "needle-full.png").is_file()


def test_full_cache_retrieves_needles_on_qwen3_small(out: Path) -> None:
    model = SHARED / "models" / "qwen3-small"
    essays = SHARED / "data" / "ruler" / "PaulGrahamEssays.json"
    assert model.is_dir() and essays.is_file(), f"needs ../shared ({model}, {essays})"
    data = run(
        out / "needle-small",
        "needle",
        "--model",
        str(model),
        "--methods",
        "full",
        "--haystack",
        str(essays),
        *"--lengths 2048 --depths 0.25,0.75 --cases 2".split(),
    )
    assert rows(data)["full"]["accuracy"] > 0


def test_fidelity_is_zero_for_the_full_cache_and_not_for_compaction(out: Path) -> None:
    data = run(
        out / "fidelity",
        *(
            "fidelity --methods full,am:queries=repeat,streaming --ratios 4 "
            "--context 256 --heldout 16 --windows 1"
        ).split(),
    )
    r = rows(data)
    full = r["full"]
    assert full["out_rel_err"] < 1e-9 and full["mass_rel_err"] < 1e-9 and full["kl"] < 1e-9
    assert full["cosine"] == pytest.approx(1.0)
    c = Session.from_pretrained().config
    shape = [c["num_hidden_layers"], c["num_key_value_heads"]]
    for key in ("am:queries=repeat@4x", "streaming@4x"):
        assert 0 < r[key]["out_rel_err"] < 10 and r[key]["kl"] > 0
        assert list(np.shape(r[key]["out_rel_err_per_head"])) == shape


def test_fidelity_on_questions_uses_needle_cases(out: Path) -> None:
    # --haystack: each window is a needle case, its question the held-out tokens.
    from kvfast.eval import fidelity

    s = Session.from_pretrained()
    args = argparse.Namespace(haystack=DEFAULT_TEXT, context=384, windows=3, limit=None, seed=0)
    wins = fidelity._windows(args, s)
    assert len(wins) == 3
    for ctx, question in wins:
        assert "special magic number" in s.decode(ctx)
        assert s.decode(question).strip().startswith("What is the special magic number")
        assert len(ctx) + len(question) <= 384
    data = run(
        out / "fidelity-q",
        *(
            "fidelity --methods full,streaming --ratios 4 --context 384 --windows 2 "
            f"--haystack {DEFAULT_TEXT}"
        ).split(),
    )
    r = rows(data)
    assert r["full"]["out_rel_err"] < 1e-9 and r["streaming@4x"]["out_rel_err"] > 0
    assert "question of a needle case" in (out / "fidelity-q" / "results.md").read_text()


def test_qa_scoring_follows_squad() -> None:
    assert normalize("The  Eiffel Tower!") == "eiffel tower"
    assert normalize("Eiffel-Tower") == "eiffeltower"  # punctuation dropped, as SQuAD does
    assert exact_match("the Eiffel Tower.", ["Eiffel Tower"]) == 1.0
    assert f1("in Paris France", ["Paris"]) == pytest.approx(0.5)
    assert f1("nothing", ["Paris", "nothing at all"]) == pytest.approx(0.5)


def test_qa_runs_agnostic_and_task_guided(out: Path) -> None:
    data = run(
        out / "qa",
        *(
            "qa --methods full,am:queries=repeat,streaming --ratios 4 "
            "--mode both --cases 2 --length 256"
        ).split(),
    )
    r = rows(data)
    assert set(r) == {
        "full",
        "am:queries=repeat@4x [agnostic]",
        "am:queries=repeat@4x [task]",
        "streaming@4x [agnostic]",
    }
    for row in r.values():
        assert 0 <= row["exact_match"] <= row["f1"] <= 1
        assert len(row["cases"]) == 2


def test_speed_times_prefill_decode_and_compaction(out: Path) -> None:
    data = run(
        out / "speed",
        *"speed --methods full,streaming --ratios 4 --lengths 128,256 --decode 4".split(),
    )
    r = rows(data)
    assert set(r) == {"full @128", "full @256", "streaming@4x @128", "streaming@4x @256"}
    for row in r.values():
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["peak_rss"] > 0
    assert r["streaming@4x @256"]["kv_bytes"] < r["full @256"]["kv_bytes"]


def test_report_renders_all_folders_with_tables_and_plots(out: Path) -> None:
    folders = [out / n for n in ("ppl", "needle", "fidelity", "qa", "speed")]
    missing = [f for f in folders if not (f / "results.json").is_file()]
    assert not missing, f"run the subcommand tests first (missing {missing})"
    dest = out / "report"
    assert cli_main(["eval", "report", *map(str, folders), "--out", str(dest)]) == 0
    md = (dest / "report.md").read_text()
    for title in (
        "Perplexity",
        "Needle in a haystack",
        "Attention fidelity",
        "Question answering",
        "Speed",
    ):
        assert f"## {title}" in md
    assert (dest / "ppl-ppl.png").is_file() and "![ppl.png](ppl-ppl.png)" in md
    page = (dest / "report.html").read_text()
    assert page.count("<table>") == 5 and '<img src="ppl-ppl.png"' in page


def test_bad_input_is_one_clear_error(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_main(["ppl", "--methods", "nope", "--out", str(out / "bad")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert eval_main(["ppl", "--text", "/no/such.txt", "--out", str(out / "bad")]) == 2
    assert "text file not found: /no/such.txt" in capsys.readouterr().err
    assert eval_main(["ppl", "--context", "100000", "--out", str(out / "bad")]) == 2
    assert "fewer than one window" in capsys.readouterr().err


class FakePeer:
    """Stands in for kvpress: the subcommands' peer plumbing, without torch."""

    name = "fake"

    def generate(self, press: str, ratio: float, context: Any, question: Any, n: int) -> str:
        assert press in ("snapkv", "tova") and ratio == 4 and len(question) > 3
        return "no idea"

    def nll(self, press: str, ratio: float, context: Any, continuation: Any) -> list[float]:
        if press == "tova":
            raise RuntimeError("the peer failed")  # recorded, and the run goes on
        return [1.0] * len(continuation)

    def kv_bytes(self, tokens: int) -> int:
        return 100 * tokens


def test_peer_rows_sit_beside_kvfast_rows(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvfast.eval import peers

    monkeypatch.setattr(peers, "open_peer", lambda *a: FakePeer())
    peer = ("--peer", "kvpress", "--peer-presses", "snapkv,tova")
    n = run(
        out / "needle-peer",
        *"needle --methods full --ratios 4 --lengths 256 --depths 0.5 --cases 1".split(),
        *peer,
    )
    r = rows(n)
    assert set(r) == {"full", "fake:snapkv@4x", "fake:tova@4x"}
    assert r["fake:tova@4x"]["accuracy"] == 0 and r["fake:tova@4x"]["method"] == "fake tova"
    assert r["fake:tova@4x"]["kv_bytes"] > 0
    p = run(
        out / "ppl-peer",
        *"ppl --methods full --ratios 4 --context 128 --continuation 16 --windows 1".split(),
        *peer,
    )
    r = rows(p)
    assert r["fake:full"]["ppl"] == pytest.approx(math.e) and r["fake:full"]["tokens"] == 16
    assert r["fake:snapkv@4x"]["kv_bytes"] == 100 * 128
    assert r["fake:tova@4x"]["error"] == "RuntimeError: the peer failed"
    assert math.isnan(r["fake:tova@4x"]["ppl"])
    assert "fake tova at 4x failed" in (out / "ppl-peer" / "results.md").read_text()
    q = run(
        out / "qa-peer",
        *"qa --methods full --ratios 4 --cases 1 --length 256".split(),
        *peer,
    )
    assert rows(q)["fake:snapkv@4x [agnostic]"]["f1"] == 0


def test_peer_kvpress_names_what_it_needs(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    args = [
        *(
            "ppl --peer kvpress --methods full --context 128 --continuation 16 --windows 1 --out"
        ).split(),
        str(out / "kvpress"),
    ]
    assert eval_main([*args, "--peer-presses", "snapkv,nope"]) == 2
    assert "--peer-presses: unknown ['nope']" in capsys.readouterr().err
    if importlib.util.find_spec("kvpress") is None:
        assert eval_main(args) == 2
        assert "needs torch, transformers and kvpress" in capsys.readouterr().err
    else:  # where kvpress is installed, the peer really runs
        assert eval_main([*args, "--peer-presses", "snapkv", "--ratios", "4"]) == 0
