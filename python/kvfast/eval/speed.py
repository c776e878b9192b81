"""`kvfast eval speed`: prefill and decode tokens/s, compaction seconds and KV bytes.

For each `--lengths` context: prefill tokens/s; decode tokens/s (`--decode` greedy steps) from
the full cache and from each method x ratio's compacted cache; the compaction's seconds (to
show how its cost grows with the context) and the KV bytes really held; the process's peak
resident memory. With `--transformers` (needs torch and transformers) the same prefill and
decode run through transformers (eager, same dtype and device, same threads) in the same run,
and the table gives kvfast's ratio to it.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path
from typing import Any

from kvfast import Session
from kvfast.eval import common

DEFAULT_METHODS = "full,am,kvzip,snapkv,streaming"


def add_args(p: argparse.ArgumentParser) -> None:
    common.add_common(p, DEFAULT_METHODS, "8")
    p.add_argument("--text", type=Path, default=common.DEFAULT_TEXT)
    p.add_argument("--lengths", default="512,1024,2048", help="context lengths in tokens")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps timed")
    p.add_argument("--transformers", action="store_true", help="also time transformers")


def _peak_rss() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _ids(s: Session, text: str, n: int) -> list[int]:
    ids = s.encode(text)
    return (ids * (n // max(len(ids), 1) + 1))[:n]  # repeat a short text up to n tokens


def run(args: argparse.Namespace, s: Session, results: common.Results) -> None:
    text = common.load_text(args.text)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    s.reset()
    s.prefill(_ids(s, text, 64), logits="last")  # warm-up: first-call costs out of the timings
    jobs = [(n, c) for n in lengths for c in common.cells(args)]
    todo = [(n, c) for n, c in jobs if not results.done(f"{c.key} @{n}")]
    for n, cell in common.progress(todo, len(todo), "speed"):
        ids = _ids(s, text, n)
        cell.reset(s)
        t0 = time.perf_counter()
        s.prefill(ids, logits="last")
        prefill_s = time.perf_counter() - t0
        rep = cell.compact(s, seed=args.seed)
        kv = s.cache_info()["bytes"]
        t0 = time.perf_counter()
        steps = sum(1 for _ in s.engine.generate(max_new_tokens=args.decode, eos_ids=[]))
        decode_s = time.perf_counter() - t0
        row = common.cell_row(
            cell,
            length=n,
            prefill_tok_s=n / prefill_s,
            decode_tok_s=steps / decode_s,
            seconds_compact=rep.seconds if rep else 0.0,
            seconds_queries=rep.seconds_queries if rep else 0.0,
            kv_bytes=kv,
            peak_rss=_peak_rss(),
        )
        row["key"] = f"{cell.key} @{n}"
        results.add(row)
    s.reset()
    if args.transformers:
        for n in lengths:
            if not results.done(f"transformers @{n}"):
                results.add(_transformers(args, s, _ids(s, text, n)))


def _transformers(args: argparse.Namespace, s: Session, ids: list[int]) -> dict[str, Any]:
    try:
        import torch  # type: ignore[import-not-found]
        import transformers  # type: ignore[import-not-found]
    except ImportError as e:
        raise RuntimeError("--transformers needs torch and transformers installed") from e
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[s.dtype]
    device = "cuda" if s.device.startswith("cuda") else "cpu"
    m = (
        transformers.AutoModelForCausalLM.from_pretrained(
            s.model_path, dtype=dtype, attn_implementation="eager"
        )
        .to(device)
        .eval()
    )

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        x = torch.tensor([ids], device=device)
        m(x[:, :16])
        sync()
        t0 = time.perf_counter()
        out = m(x, use_cache=True, logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - t0
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.decode):
            out = m(nxt, past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            nxt.item()
        decode_s = time.perf_counter() - t0
    return {
        "key": f"transformers @{len(ids)}",
        "method": f"transformers {transformers.__version__} eager",
        "ratio": None,
        "budget": None,
        "length": len(ids),
        "prefill_tok_s": len(ids) / prefill_s,
        "decode_tok_s": args.decode / decode_s,
    }


def report(args: argparse.Namespace, results: common.Results) -> Path:
    hf = {r["length"]: r for r in results.rows if r["key"].startswith("transformers")}
    rows: list[list[Any]] = []
    comp: common.Series = {}
    for r in sorted(results.rows, key=lambda r: (r["length"], r["key"])):
        ref = hf.get(r["length"])
        mine = not r["key"].startswith("transformers")
        rows.append(
            [
                r["method"],
                f"{r['ratio']:g}x" if r.get("ratio") else (r.get("budget") or ""),
                r["length"],
                f"{r['prefill_tok_s']:.0f}",
                f"{r['decode_tok_s']:.1f}",
                f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}x" if ref and mine else "",
                r.get("seconds_compact"),
                common.mib(r.get("kv_bytes")),
                common.mib(r.get("peak_rss")),
            ]
        )
        if mine and r.get("ratio") and r["seconds_compact"]:
            comp.setdefault(f"{r['method']} {r['ratio']:g}x", []).append(
                (r["length"], r["seconds_compact"])
            )
    header = [
        "engine / method",
        "ratio",
        "context",
        "prefill tok/s",
        "decode tok/s",
        "decode vs transformers",
        "compact s",
        "KV MiB held",
        "peak RSS MiB",
    ]
    body = common.markdown_table(header, rows)
    body += f"\n\n{args.decode} greedy decode steps after each prefill (and compaction)."
    plot = common.plot_lines(
        args.out / "speed-compaction.png",
        "compaction time vs context length",
        "seconds",
        comp,
        xlabel="context tokens",
    )
    return common.write_markdown(args.out, "Speed", results, body, [plot] if plot else [])
