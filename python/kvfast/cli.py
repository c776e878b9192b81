"""The `kvfast` command line: `kvfast generate ...`, `kvfast demo`, `kvfast calibrate-budgets ...`,
`kvfast eval ...` and `kvfast info ...`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvfast import KvfastError, Session, __version__, calibrate, demo
from kvfast import eval as evaluation
from kvfast._native import build_features
from kvfast.compaction import METHODS, QUERY_SOURCES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or hub id (default: the embedded qwen3-tiny)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or metal (default: cpu)")
    p.add_argument("--dtype", default=None, help="f32, f16 or bf16 (default: f32 on CPU)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvfast", description="Long-context LLM inference under a memory budget."
    )
    p.add_argument("--version", action="version", version=f"kvfast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeat for several)")
    g.add_argument(
        "--context",
        type=Path,
        default=None,
        help="a text file prefilled (and compacted with --ratio/--budget) before the prompt",
    )
    g.add_argument("--ratio", type=float, default=None, help="compact the context by this ratio")
    g.add_argument("--budget", type=int, default=None, help="compact to this many keys per head")
    g.add_argument(
        "--method", default="am", choices=METHODS, help="compaction method (default: am)"
    )
    g.add_argument(
        "--queries",
        default="repeat",
        choices=QUERY_SOURCES,
        help="am's reference queries (default: repeat)",
    )

    d = sub.add_parser(
        "demo",
        help="hide a fact in a ~2k-token text; answer from the full and the compacted caches",
    )
    _add_model_args(d)
    d.add_argument("--ratio", type=float, default=8.0)
    d.add_argument(
        "--methods", default="am,snapkv", help="comma-separated compaction methods to compare"
    )

    c = sub.add_parser(
        "calibrate-budgets",
        help="measure each head's need for keys and write a head-budget profile (JSON)",
    )
    _add_model_args(c)
    c.add_argument("--context", type=Path, default=None, help="text file (default: the demo text)")
    c.add_argument("--length", type=int, default=2048, help="context tokens to use")
    c.add_argument("--ratio", type=float, default=8.0)
    c.add_argument("--method", default="am", choices=METHODS)
    c.add_argument("--out", type=Path, required=True, help="where to write the profile")

    e = sub.add_parser(
        "eval",
        help="evaluate compaction: ppl, needle, qa, fidelity, speed; report",
        description=evaluation.__doc__,
    )
    evaluation.add_subcommands(e.add_subparsers(dest="eval_command", required=True))

    i = sub.add_parser("info", help="show the model's config, size and memory use")
    _add_model_args(i)
    return p


def _generate(args: argparse.Namespace) -> int:
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    prompt: str = args.prompt
    context: list[int] = []
    if args.chat:
        prompt = s.apply_chat_template([{"role": "user", "content": prompt}])
    compacting = args.ratio is not None or args.budget is not None
    if compacting and args.context is None:
        raise ValueError("--ratio/--budget compact a --context file; give one")
    summary = ""
    if args.context is not None:
        if not args.context.is_file():
            raise FileNotFoundError(f"context file not found: {args.context}")
        context = s.encode(args.context.read_text(encoding="utf-8"))
        if not context:
            raise ValueError(f"context file {args.context} is empty")
        t0 = time.perf_counter()
        s.prefill(context, logits=None)
        summary = f"{len(context)} context tokens in {time.perf_counter() - t0:.2f}s"
        if compacting:
            r = s.compact(
                ratio=args.ratio, budget=args.budget, method=args.method, queries=args.queries
            )
            summary += f"; {r}"
        print(f"[{summary}]", file=sys.stderr)
    ids = s.encode(prompt)
    # Prefill separately from generate() so that the summary can time the two phases apart.
    t0 = time.perf_counter()
    s.prefill(ids, logits=None)
    t1 = time.perf_counter()
    pieces = s.generate(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        stream=True,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()  # show each piece as it is generated
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    sys.stdout.flush()
    new = s.cache_len - len(ids) - len(context)
    kv = s.cache_info()["bytes"] / 2**20
    print(
        f"[{len(ids)} prompt tokens in {t1 - t0:.2f}s; {new} tokens generated in "
        f"{t2 - t1:.2f}s, {new / max(t2 - t1, 1e-9):.1f} tokens/s; KV cache {kv:.2f} MiB]",
        file=sys.stderr,
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
    rows = demo.run(
        args.model, ratio=args.ratio, methods=methods, device=args.device, dtype=args.dtype
    )
    print(demo.format_table(rows, args.ratio))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    if args.context is not None and not args.context.is_file():
        raise FileNotFoundError(f"context file not found: {args.context}")
    text = args.context.read_text(encoding="utf-8") if args.context else demo.demo_text()
    ids = s.encode(text)[: args.length]
    profile = calibrate.calibrate_budgets(s, ids, ratio=args.ratio, method=args.method)
    path = calibrate.write_profile(profile, args.out)
    keys = [n for row in profile["budgets"] for n in row]
    print(
        f"wrote {path}: {len(keys)} heads, {min(keys)}-{max(keys)} keys per head "
        f"(average budget {profile['budget']} at {args.ratio:g}x on {len(ids)} tokens); "
        f'use it with session.compact(ratio=..., head_budgets="{path}")'
    )
    return 0


def _kv_bytes_per_token(s: Session) -> int:
    # Measured rather than computed from the config, so it counts what the engine really
    # stores per token (K and V in the cache dtype plus the per-key bias).
    s.reset()
    s.prefill([0], logits=None)
    per_token = int(s.cache_info()["bytes"])
    s.reset()
    return per_token


def _info(args: argparse.Namespace) -> int:
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    c = s.config
    e = s.engine
    rows: list[tuple[str, object]] = [
        ("model", s.model_path),
        ("model_type", c.get("model_type")),
        ("layers", c.get("num_hidden_layers")),
        ("hidden_size", c.get("hidden_size")),
        ("heads (q / kv)", f"{c.get('num_attention_heads')} / {c.get('num_key_value_heads')}"),
        ("head_dim", c.get("head_dim")),
        ("intermediate_size", c.get("intermediate_size")),
        ("vocab_size", c.get("vocab_size")),
        ("rope_theta", c.get("rope_theta")),
        ("tied embeddings", c.get("tie_word_embeddings")),
        ("parameters", f"{e.num_parameters:,}"),
        ("device / dtype", f"{e.device} / {e.dtype}"),
        ("weights in memory", f"{e.weight_bytes / 2**20:.1f} MiB"),
        ("KV cache per token", f"{_kv_bytes_per_token(s):,} bytes"),
        ("build features", ", ".join(build_features()) or "cpu only"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kvfast` script; returns the exit status."""
    args = _parser().parse_args(argv)
    command = {
        "generate": _generate,
        "demo": _demo,
        "calibrate-budgets": _calibrate,
        "eval": evaluation.run,
        "info": _info,
    }[args.command]
    try:
        return command(args)
    # Expected failures (bad path, bad option value, device missing) get one line, not a
    # traceback; anything else is a bug and keeps its traceback.
    except (KvfastError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kvfast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
