"""Golden fixtures from HF transformers, the correctness oracle for kvfast.

    python scripts/make_fixtures.py                      # qwen3-odd + qwen3-tiny -> tests/fixtures
    python scripts/make_fixtures.py --model DIR --name qwen3-small --out /tmp/golden

This script IS the reference: the tests compare kvfast against the files it writes, so the test
suite needs neither torch nor transformers (install them with `pip install -e .[bench]`).

It writes
- `tests/fixtures/models/qwen3-odd/`: a random-weight Qwen3 of an awkward shape (hidden 96, 3 query
  heads x head_dim 40 so q width 120 != hidden, 1 KV head, untied lm_head, classic top-level
  `rope_theta` = 10000, f32, sharded in two safetensors files plus the index), seeded.
- `tests/fixtures/golden/<name>.npz` for each model, from `Qwen3ForCausalLM` with eager attention:
  `input_ids` [48]; `positions` [5]; `logits_f32` / `logits_bf16` [5, vocab] at those positions
  from one full-sequence forward in float32 / bfloat16; `greedy_f32` [64] (argmax loop with the
  KV cache, EOS ignored); `nll_f32` [47] (NLL of input_ids[1:]); library versions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
EMBEDDED = ROOT / "python" / "kvfast" / "data" / "qwen3-tiny"
PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening, counting each step aloud, "
    "because his father had told him that a keeper who forgets the count forgets the sea. "
    "Far below, the harbour lights came on one by one."
)
T = 48
POSITIONS = [0, 1, 7, 23, 47]
NEW_TOKENS = 64


def make_odd_model(out: Path) -> None:
    """Random Qwen3 of an odd shape, saved sharded with a classic config."""
    cfg = transformers.Qwen3Config(
        vocab_size=512,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=40,
        intermediate_size=160,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(1234)
    model = transformers.Qwen3ForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # exercise the norm weights
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p) * (4 if "embed" in name else 1))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, out / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 512,
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "head_dim": 40,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def prompt_ids(model_dir: Path, vocab: int) -> list[int]:
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        ids = Tokenizer.from_file(str(tok)).encode(PROMPT, add_special_tokens=False).ids
        assert len(ids) >= T, f"prompt too short: {len(ids)} tokens"
        return ids[:T]
    return [int(i) for i in np.random.default_rng(0).integers(2, vocab, T)]


def load(model_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager"
    )
    return model.eval()


@torch.inference_mode()
def golden(model_dir: Path, with_bf16: bool) -> dict[str, np.ndarray]:
    model = load(model_dir, torch.float32)
    ids = prompt_ids(model_dir, model.config.vocab_size)
    x = torch.tensor([ids])
    logits = model(x).logits[0].float()
    out = {
        "input_ids": np.array(ids, dtype=np.int64),
        "positions": np.array(POSITIONS, dtype=np.int64),
        "logits_f32": logits[POSITIONS].numpy().astype(np.float32),
        "nll_f32": torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
        .numpy()
        .astype(np.float32),
    }
    # Greedy continuation: our own argmax loop over the KV cache, so no generation defaults
    # (EOS stopping, repetition penalty, ...) can interfere.
    res = model(x, use_cache=True)
    cache, nxt, new = res.past_key_values, int(res.logits[0, -1].argmax()), []
    for _ in range(NEW_TOKENS):
        new.append(nxt)
        res = model(torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
    out["greedy_f32"] = np.array(new, dtype=np.int64)
    if with_bf16:
        mb = load(model_dir, torch.bfloat16)
        out["logits_bf16"] = mb(x).logits[0, POSITIONS].float().numpy().astype(np.float32)
    out["transformers_version"] = np.array(transformers.__version__)
    out["torch_version"] = np.array(torch.__version__)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a checkpoint directory (default: odd + tiny)")
    p.add_argument("--name", help="fixture name for --model")
    p.add_argument("--out", type=Path, default=FIXTURES / "golden")
    p.add_argument("--no-bf16", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.model:
        jobs = [(args.name or args.model.name, args.model)]
    else:
        odd = FIXTURES / "models" / "qwen3-odd"
        make_odd_model(odd)
        jobs = [("qwen3-odd", odd), ("qwen3-tiny", EMBEDDED)]
    args.out.mkdir(parents=True, exist_ok=True)
    for name, model_dir in jobs:
        g = golden(model_dir, with_bf16=not args.no_bf16)
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **g)
        shapes = {k: v.shape for k, v in g.items() if v.ndim}
        print(f"{path} ({path.stat().st_size / 1024:.0f} KB): {shapes}")


if __name__ == "__main__":
    main()
