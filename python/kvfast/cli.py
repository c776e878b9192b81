"""The `kvfast` command line."""

from __future__ import annotations

import argparse
import sys
import time

from kvfast import KvfastError, Session, __version__
from kvfast._native import build_features


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or hub id (default: embedded qwen3-tiny)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or metal")
    p.add_argument("--dtype", default=None, help="f32, f16 or bf16 (default: f32 on CPU)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvfast", description="Long-context LLM inference under a memory budget."
    )
    p.add_argument("--version", action="version", version=f"kvfast {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    i = sub.add_parser("info", help="show the model's config, size and memory use")
    _add_model_args(i)
    return p


def _generate(args: argparse.Namespace) -> int:
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    prompt = args.prompt
    if args.chat:
        prompt = s.apply_chat_template([{"role": "user", "content": prompt}])
    ids = s.encode(prompt)
    t0 = time.perf_counter()
    s.prefill(ids, logits=None)
    t1 = time.perf_counter()
    for piece in s.generate(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stream=True,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    t2 = time.perf_counter()
    sys.stdout.write("\n")
    new = s.cache_len - len(ids)
    kv_mib = s.cache_info()["bytes"] / 2**20
    print(
        f"[{len(ids)} prompt tokens in {t1 - t0:.2f}s, {new} new tokens at "
        f"{new / max(t2 - t1, 1e-9):.1f} tok/s; KV cache {kv_mib:.2f} MiB]",
        file=sys.stderr,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    s = Session.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    c = s.config
    e = s.engine
    dsize = {"f32": 4, "f16": 2, "bf16": 2}[e.dtype]
    # K and V rows in the model dtype plus one f32 bias per key, in every layer and KV head.
    heads = c["num_hidden_layers"] * c["num_key_value_heads"]
    kv_per_token = heads * (2 * c["head_dim"] * dsize + 4)
    rows = [
        ("model", str(s.model_path)),
        ("model_type", c["model_type"]),
        ("layers", c["num_hidden_layers"]),
        ("hidden_size", c["hidden_size"]),
        ("heads (q / kv)", f"{c['num_attention_heads']} / {c['num_key_value_heads']}"),
        ("head_dim", c["head_dim"]),
        ("intermediate_size", c["intermediate_size"]),
        ("vocab_size", c["vocab_size"]),
        ("rope_theta", c["rope_theta"]),
        ("tied embeddings", c["tie_word_embeddings"]),
        ("parameters", f"{e.num_parameters:,}"),
        ("device / dtype", f"{e.device} / {e.dtype}"),
        ("weights in memory", f"{e.weight_bytes / 2**20:.1f} MiB"),
        ("KV cache per token", f"{kv_per_token:,} bytes"),
        ("build features", ", ".join(build_features()) or "cpu only"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": _generate, "info": _info}[args.command](args)
    except (KvfastError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"kvfast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
