"""Where kvfast's GPU time goes: per-kernel device time of decode steps and of a prefill.

    python benches/gpu_profile.py --out DIR [--label NAME] [--models 0.6b] [--contexts 512,4096]

Random-weight Qwen3 shapes (benches/configs), bf16, batch 1. torch's profiler (CUPTI) records
every kernel of the process, also those candle and kvfast launch and those inside CUDA-graph
replays. For each case it writes the kernels by total device time, their time per decode step,
and how busy the GPU was between the first kernel's start and the last one's end (the rest is
the gaps between kernels: launch latency and host waits). Writes DIR/profile-LABEL.json and
prints its tables (`--render JSON` prints them again). Profiling adds host overhead, so wall
times here are not speed results (see gpu_speed.py); the kernel durations are.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parent / "configs"

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", type=Path)
p.add_argument("--render", type=Path, help="print the tables of a saved profile JSON and exit")
p.add_argument("--label", default="kvfast")
p.add_argument("--models", default="0.6b")
p.add_argument("--contexts", default="512,4096")
p.add_argument("--steps", type=int, default=32)
p.add_argument("--prefill", type=int, default=8192)
p.add_argument("--modes", default="graph", help="comma list of graph, eager, off")
p.add_argument(
    "--plain",
    action="store_true",
    help="run the cases without torch's profiler (to run under Nsight Compute: ncu)",
)
ARGS = p.parse_args()


def prompt(n: int, vocab: int) -> list[int]:
    return [1 + (i * 7919) % (vocab - 1) for i in range(n)]


def summarize(prof: Any, per: int) -> dict[str, Any]:
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by: dict[str, list[float]] = {}
    for e in kernels:
        by.setdefault(e.name, []).append(e.time_range.elapsed_us())
    rows: list[dict[str, Any]] = [
        {
            "kernel": k[:100],
            "calls_per_step": len(v) / per,
            "us_per_step": sum(v) / per,
            "us_per_call": sum(v) / len(v),
        }
        for k, v in sorted(by.items(), key=lambda kv: -sum(kv[1]))
    ]
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = (
        max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
        if kernels
        else 0.0
    )
    return {
        "kernels_per_step": len(kernels) / per,
        "busy_us_per_step": busy / per,
        "span_us_per_step": span / per,
        "rows": rows,
    }


def decode_case(e: Any, ctx: int, mode: str) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    os.environ["KVFAST_CUDA_GRAPH"] = {"graph": "1", "eager": "eager", "off": "0"}[mode]
    e.reset()
    e.prefill(prompt(ctx, e.vocab_size), logits="last")
    list(e.generate(max_new_tokens=4, eos_ids=[]))  # capture outside the profile
    torch.cuda.synchronize()
    if ARGS.plain:
        sum(1 for _ in e.generate(max_new_tokens=ARGS.steps, eos_ids=[]))
        return {"plain": True}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        n = sum(1 for _ in e.generate(max_new_tokens=ARGS.steps, eos_ids=[]))
        torch.cuda.synchronize()
    out = summarize(prof, n)
    out["decode_info"] = {k: v for k, v in e.decode_info().items() if not isinstance(v, float)}
    return out


def prefill_case(e: Any, n: int) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    e.reset()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        e.prefill(prompt(n, e.vocab_size), logits="last")
        torch.cuda.synchronize()
    return summarize(prof, 1)


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU profile: {results['label']} on {results['device']}", ""]
    for case, r in results["cases"].items():
        if "plain" in r:
            continue
        if "error" in r:
            lines += [f"## {case}", "", f"error: {r['error']}", ""]
            continue
        lines += [
            f"## {case}",
            "",
            f"kernels per step {r['kernels_per_step']:.0f}; busy {r['busy_us_per_step']:.0f} us "
            f"of a {r['span_us_per_step']:.0f} us span per step",
            "",
            "| kernel | calls/step | us/step | us/call |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| `{x['kernel']}` | {x['calls_per_step']:.0f} | {x['us_per_step']:.1f} | "
            f"{x['us_per_call']:.2f} |"
            for x in r["rows"][:25]
        ]
        lines.append("")
    return "\n".join(lines)


def profile_model(model: str, cases: dict[str, Any], save: Any) -> None:
    from kvfast import _native

    e = _native.Engine.random(str(CONFIGS / f"qwen3-{model}.json"), device="cuda", dtype="bf16")
    e.prefill(prompt(600, e.vocab_size), logits="last")  # loads every kernel once
    list(e.generate(max_new_tokens=8, eos_ids=[]))
    todo: list[tuple[str, Any]] = [
        (f"{model} decode @{ctx} ({mode})", lambda c=ctx, m=mode: decode_case(e, c, m))
        for mode in ARGS.modes.split(",")
        for ctx in (int(c) for c in ARGS.contexts.split(",") if c)
    ]
    if ARGS.prefill:
        todo.append((f"{model} prefill {ARGS.prefill}", lambda: prefill_case(e, ARGS.prefill)))
    for name, fn in todo:
        try:
            cases[name] = fn()
        except Exception as ex:  # one failed case must not lose the others
            cases[name] = {"error": f"{type(ex).__name__}: {ex}"}
        save()
        print(f"{name}: done", flush=True)


def main() -> None:
    if ARGS.render:
        print(markdown(json.loads(ARGS.render.read_text())))
        return
    if ARGS.out is None:
        p.error("--out is required")
    import torch  # the machine with the GPU has it; --render needs neither torch nor kvfast
    from kvfast import _native

    os.environ["KVFAST_PACKED_CACHE"] = "1"
    results: dict[str, Any] = {
        "label": ARGS.label,
        "device": torch.cuda.get_device_name(0),
        "kvfast_features": _native.build_features(),
        "cases": {},
    }
    ARGS.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (ARGS.out / f"profile-{ARGS.label}.json").write_text(json.dumps(results, indent=1))

    for model in [m for m in ARGS.models.split(",") if m]:
        profile_model(model, results["cases"], save)
        os.environ["KVFAST_CUDA_GRAPH"] = "1"
        torch.cuda.empty_cache()
    print(markdown(results), flush=True)


if __name__ == "__main__":
    main()
