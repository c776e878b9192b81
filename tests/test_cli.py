"""The `kvfast` command line (in-process through `main`, and `python -m kvfast`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import kvfast
import pytest
from kvfast import Session, cli


def test_generate_streams_the_greedy_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--prompt", "Once upon a time", "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    want = Session.from_pretrained().generate("Once upon a time", max_new_tokens=8)
    assert want and out == want + "\n"
    assert "4 prompt tokens" in err and "tokens/s" in err and err.count("\n") == 1


def test_generate_chat_and_sampling_flags(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--prompt", "Hi", "--chat", "--max-new-tokens", "6"]
    argv += ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "7"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    # What was prefilled is the chat-formatted prompt, not the bare "Hi".
    s = Session.from_pretrained()
    n = len(s.encode(s.apply_chat_template([{"role": "user", "content": "Hi"}])))
    assert f"[{n} prompt tokens" in first.err
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first.out  # seeded


def test_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    s = Session.from_pretrained()
    assert f"{s.engine.num_parameters:,}" in out
    for key, value in [("model_type", "qwen3"), ("layers", "4"), ("head_dim", "64")]:
        assert any(line.split() == [key, value] for line in out.splitlines()), (key, out)
    assert "4 / 2" in out  # query / KV heads
    assert "cpu / f32" in out
    kv_line = next(line for line in out.splitlines() if line.startswith("KV cache per token"))
    per_token = int(kv_line.split()[-2].replace(",", ""))
    assert per_token >= 2 * 4 * 2 * 64 * 4  # K and V, f32, every layer and KV head
    assert "MiB" in out and "build features" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["info", "--dtype", "f8"], "f8"),
        (["info", "--device", "tpu"], "tpu"),
        (["generate", "--model", "/no/such/model", "--prompt", "x"], "/no/such/model"),
        (["generate", "--prompt", ""], "empty prompt"),
        (["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
    ],
)
def test_errors_are_one_line_not_a_traceback(
    capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvfast: error: ") and needle in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["generate"])  # --prompt is required
    assert e.value.code == 2
    assert "--prompt" in capsys.readouterr().err


def test_python_dash_m(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(kvfast.__file__).parents[1]))
    r = subprocess.run(
        [sys.executable, "-m", "kvfast", "info"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "qwen3" in r.stdout


def test_generate_from_a_compacted_context(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("The lighthouse keeper lit the lamp every evening. " * 30)
    argv = ["generate", "--context", str(ctx), "--ratio", "4", "--prompt", " The keeper"]
    assert cli.main([*argv, "--max-new-tokens", "5", "--method", "snapkv"]) == 0
    err = capsys.readouterr().err
    # One line for the context and its compaction, one for the answer.
    assert "context tokens" in err and "snapkv:" in err and "(4.0x)" in err
    assert "KV cache" in err
    assert cli.main([*argv, "--max-new-tokens", "2", "--queries", "repeat"]) == 0
    assert "am:" in capsys.readouterr().err
    # Compacting needs a context; a missing file is one clear line.
    assert cli.main(["generate", "--ratio", "4", "--prompt", "x"]) == 2
    assert "--context" in capsys.readouterr().err
    assert cli.main(["generate", "--context", str(tmp_path / "no.txt"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err


def test_demo_prints_the_side_by_side_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--methods", "am,streaming"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    rows = [line.split()[0] for line in lines[lines.index("") + 2 :]]
    assert rows == ["full", "am", "streaming"]
    assert "4729315" in out.splitlines()[0]
    # The full cache answers (the embedded model retrieves at this length).
    full = next(line for line in lines if line.startswith("full"))
    assert " yes " in full
    assert cli.main(["demo", "--methods", "magic"]) == 2
