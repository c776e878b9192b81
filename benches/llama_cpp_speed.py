"""CPU prefill and decode speed of kvfast vs llama.cpp (llama-cpp-python) on the same GGUF file,
same threads, same prompt ids, same process.

    python benches/llama_cpp_speed.py MODEL.gguf [--requantize q4_0,q8_0] [--out DIR]

For each file (the given one, plus copies requantized by llama.cpp's own quantizer when
`--requantize` is given) both engines prefill the same `--prompt` token ids and decode `--decode`
greedy tokens; engines alternate for `--rounds` rounds and the median is reported, because the
machine is shared and noisy. The table gives tokens/s and kvfast / llama.cpp, and how many
leading greedy tokens the two engines agree on (a check that they run the same model).
Needs `pip install .[llama]` (llama-cpp-python, built from source by pip): a benchmark
dependency only. On CPUs with AMX (Sapphire Rapids and later) llama.cpp's AMX weight buffers
segfault in the first decode (ggml-org/llama.cpp#20824); build it without them:
`CMAKE_ARGS="-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" pip install
--no-cache-dir llama-cpp-python` (its other repacked CPU kernels stay on).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("model", type=Path)
p.add_argument("--requantize", default="", help="also measure these formats (q4_0,q8_0,...)")
p.add_argument("--prompt", type=int, default=512)
p.add_argument("--decode", type=int, default=64)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
p.add_argument("--out", type=Path, default=None)
args = p.parse_args()
# Before kvfast starts its worker pool.
os.environ["RAYON_NUM_THREADS"] = str(args.threads)

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from kvfast import Session  # noqa: E402

TEXT = (Path(__file__).resolve().parents[1] / "python/kvfast/data/moby_dick_ch1.txt").read_text()


def requantize(src: Path, fmt: str, folder: Path) -> Path:
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt.upper()}")
    dst = folder / f"{src.stem}.{fmt}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = args.threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not requantize {src} to {fmt} (rc {rc})")
    return dst


def run_kvfast(s: Session, ids: list[int]) -> tuple[float, float, list[int]]:
    s.reset()
    t0 = time.perf_counter()
    s.prefill(ids, logits="last")
    prefill = len(ids) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    out = list(s.engine.generate(max_new_tokens=args.decode, eos_ids=[]))
    decode = len(out) / (time.perf_counter() - t0)
    return prefill, decode, out


def _last_logits(llm: Any) -> Any:
    # Without logits_all, llama-cpp-python keeps no scores: read the context's last row.
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def run_llama(llm: Any, ids: list[int]) -> tuple[float, float, list[int]]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill = len(ids) / (time.perf_counter() - t0)
    out: list[int] = []
    t0 = time.perf_counter()
    tok = int(np.argmax(_last_logits(llm)))
    for _ in range(args.decode):
        out.append(tok)
        llm.eval([tok])
        tok = int(np.argmax(_last_logits(llm)))
    decode = len(out) / (time.perf_counter() - t0)
    return prefill, decode, out


def measure(path: Path, fmt: str) -> dict[str, Any]:
    s = Session.from_pretrained(path)
    ids = s.encode(TEXT)[: args.prompt]
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=args.prompt + args.decode + 8,
        n_batch=args.prompt,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    res: dict[str, list[float]] = {k: [] for k in ("kp", "kd", "lp", "ld")}
    outs: dict[str, list[int]] = {}
    run_kvfast(s, ids[:16])  # warm-up: first-call costs out of the timings
    run_llama(llm, ids[:16])
    for _ in range(args.rounds):
        kp, kd, outs["kvfast"] = run_kvfast(s, ids)
        lp, ld, outs["llama"] = run_llama(llm, ids)
        for k, v in zip(("kp", "kd", "lp", "ld"), (kp, kd, lp, ld), strict=True):
            res[k].append(v)
    agree = next(
        (i for i, (a, b) in enumerate(zip(outs["kvfast"], outs["llama"], strict=True)) if a != b),
        args.decode,
    )
    med = {k: statistics.median(v) for k, v in res.items()}
    return {
        "file": path.name,
        "format": fmt,
        "mib": path.stat().st_size / 2**20,
        "kvfast_prefill": med["kp"],
        "llama_prefill": med["lp"],
        "kvfast_decode": med["kd"],
        "llama_decode": med["ld"],
        "greedy_agree": agree,
        "rounds": res,
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = [(args.model, "as shipped")]
        for fmt in [f.strip() for f in args.requantize.split(",") if f.strip()]:
            files.append((requantize(args.model, fmt, Path(tmp)), fmt))
        for path, fmt in files:
            rows.append(measure(path, fmt))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    head = (
        f"CPU ({platform.processor() or platform.machine()}), {args.threads} threads, prompt "
        f"{args.prompt} tokens, {args.decode} greedy decode steps, median of {args.rounds} "
        f"alternating rounds; llama-cpp-python {llama_cpp.__version__}.\n\n"
        "| file | format | MiB | prefill tok/s kvfast / llama.cpp | ratio | decode tok/s "
        "kvfast / llama.cpp | ratio | greedy tokens agreeing |\n|---|---|---|---|---|---|---|---|\n"
    )
    table = head + "".join(
        f"| {r['file']} | {r['format']} | {r['mib']:.1f} | {r['kvfast_prefill']:.0f} / "
        f"{r['llama_prefill']:.0f} | {r['kvfast_prefill'] / r['llama_prefill']:.2f}x | "
        f"{r['kvfast_decode']:.1f} / {r['llama_decode']:.1f} | "
        f"{r['kvfast_decode'] / r['llama_decode']:.2f}x | {r['greedy_agree']} / {args.decode} |\n"
        for r in rows
    )
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "llama_cpp_speed.json").write_text(json.dumps(rows, indent=1))
        (args.out / "llama_cpp_speed.md").write_text(table)


if __name__ == "__main__":
    main()
