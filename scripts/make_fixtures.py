"""Golden fixtures from HF transformers, the correctness oracle for kvfast.

    python scripts/make_fixtures.py                     # qwen3-odd + qwen3-tiny -> tests/fixtures
    python scripts/make_fixtures.py --model /path/to/qwen3-small --out /tmp/golden-small
    python scripts/make_fixtures.py --families          # llama-odd + qwen2-odd -> tests/fixtures

This script IS the reference. The tests (`tests/test_parity.py`) compare kvfast against the files
it writes, with numpy only, so the test suite needs neither torch nor transformers; install them
(`pip install -e .[bench]`, or `pip install torch transformers`) only to regenerate the fixtures.

What it writes
--------------
`tests/fixtures/models/qwen3-odd/` (default run only): a random-weight Qwen3 of an awkward shape,
seeded (`torch.manual_seed(1234)`), 252,544 float32 parameters (~1 MB):
  vocab 512, hidden 96, 2 layers, 3 query heads x head_dim 40 (q width 120 != hidden 96), 1 KV head
  (GQA group 3), FFN 160, untied lm_head, rms_norm_eps 1e-6, classic top-level `rope_theta`
  10000 (no `rope_parameters`). Linear and embedding weights ~ N(0, 0.02); every RMSNorm weight
  (input/post-attention layernorms, q_norm, k_norm, final norm) ~ 1 + 0.1 N(0, 1) so the norm
  weights are really exercised. Saved SHARDED with the standard HF tensor names, in state-dict
  order split at half the bytes (so layer 1's tensors straddle both files):
  `model-00001-of-00002.safetensors`, `model-00002-of-00002.safetensors`,
  `model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}), `config.json`.
  No tokenizer.

`tests/fixtures/models/{llama,qwen2}-odd/` (`--families`): random-weight models of the other two
families kvfast loads, single-file `model.safetensors` + `config.json`, seeded
(`torch.manual_seed(4321)`), initialised like qwen3-odd (q/k/v biases ~ 0.1 N(0, 1)):
  llama-odd: vocab 512, hidden 96, 2 layers, 4 query heads x head_dim 32, 2 KV heads, FFN 160,
             TIED embeddings (as SmolLM2), no biases, no QK-norm, rope_theta 10000.
  qwen2-odd: vocab 512, hidden 96, 2 layers, 3 query heads x head_dim 32, 1 KV head, FFN 160,
             untied, q/k/v biases (Qwen2 always has them; o_proj none), no QK-norm.

`<out>/<name>.npz` for each model (np.savez_compressed), from `Qwen3ForCausalLM` with
`attn_implementation="eager"`, `torch.set_num_threads(2)`, on CPU:
  input_ids            int64   [48]       the prompt. Models with a tokenizer.json: the first 48
                                          ids of PROMPT (no special tokens; id 0 = EOS does not
                                          occur). qwen3-odd: np.random.default_rng(0) ids in
                                          [2, 512) (0 and 1 avoided; 1 is its EOS).
  positions            int64   [5]        [0, 1, 7, 23, 47]
  logits_f32           float32 [5, V]     logits at `positions`, one full-sequence f32 forward
  logits_bf16          float32 [5, V]     the same with the model loaded in torch.bfloat16
                                          (omitted with --no-bf16)
  greedy_f32           int64   [64]       greedy continuation after input_ids, f32: our own loop,
                                          argmax of a full (uncached) forward over the whole
                                          sequence each step; EOS does not stop it and no
                                          generation defaults (repetition penalty, ...) apply.
  greedy_margins_f32   float32 [64]       top-1 minus top-2 logit gap at each greedy step: how
                                          robust each step is to f32 error (diagnostics).
  nll_f32              float32 [47]       -log_softmax(f32 logits)[t, input_ids[t+1]], t < 47
  transformers_version str     []         library versions, 0-d string arrays
  torch_version        str     []

How the tests use them (tolerances)
-----------------------------------
- f32: max abs logit error <= 1e-3 against `logits_f32`; `greedy_f32` reproduced exactly;
  score() NLL within 1e-3 of `nll_f32`.
- bf16: looser, because bf16 keeps 8 mantissa bits and kvfast rounds at different points than
  transformers (which rounds RMSNorm output before the weight multiply, rounds cos/sin to bf16,
  and casts f32 softmax probabilities back to bf16): max abs error <= 2% of max |logit| of
  `logits_bf16`, argmax agreement >= 80% of positions.

Environment notes
-----------------
Generated with torch 2.15.0+cu132 and transformers 5.24.0 from PyPI (the default CUDA build of
torch with its nvidia-* wheels; it imports and runs on a CPU-only machine, nothing extra was
needed). Transformers 5 reads the classic top-level `rope_theta` of qwen3-odd/qwen3-small and the
v5 `rope_parameters` of qwen3-tiny alike (rope_type "default", attention_scaling 1.0); attention
is scaled by head_dim ** -0.5; all layers are full attention (no sliding window).
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
ODD_DIR = FIXTURES / "models" / "qwen3-odd"
TINY_DIR = ROOT / "python" / "kvfast" / "data" / "qwen3-tiny"  # same bytes as shared/models/

PROMPT = (
    "The old lighthouse keeper climbed the stairs every evening, counting each step aloud, "
    "because his father had told him that a keeper who forgets the count forgets the sea. "
    "Far below, the harbour lights came on one by one."
)
T = 48
POSITIONS = [0, 1, 7, 23, 47]
NEW_TOKENS = 64

# The config.json written for qwen3-odd: classic (transformers 4.x) style, top-level rope_theta.
ODD_CONFIG = {
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
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "sliding_window": None,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "use_cache": True,
    "torch_dtype": "float32",
}
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def make_odd_model(out: Path) -> None:
    """Build, seed and save the random qwen3-odd checkpoint (sharded, classic config)."""
    cfg = {k: v for k, v in ODD_CONFIG.items() if k not in ("architectures", "model_type")}
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    del cfg["rope_scaling"], cfg["torch_dtype"]
    torch.manual_seed(1234)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():  # state-dict order, deterministic
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert "lm_head.weight" in state and len(state) == 3 + 2 * 11, sorted(state)

    # Split in state-dict order at half the bytes: two shards, layer 0 straddling both.
    total = sum(v.numel() * v.element_size() for v in state.values())
    weight_map, acc = {}, 0
    for name, v in state.items():
        weight_map[name] = SHARDS[0] if acc < total // 2 else SHARDS[1]
        acc += v.numel() * v.element_size()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    for shard in SHARDS:
        part = {k: v for k, v in state.items() if weight_map[k] == shard}
        save_file(part, out / shard, metadata={"format": "pt"})
        (out / shard).chmod(0o644)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(ODD_CONFIG, indent=2) + "\n")


FAMILY_CONFIGS = {
    "llama-odd": transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "qwen2-odd": transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=1,
        eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}


def make_family_model(name: str, out: Path) -> None:
    """A seeded random Llama / Qwen2 checkpoint: one safetensors file and its config."""
    torch.manual_seed(4321)
    model = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[name]).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in out.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()  # generation_config.json: not part of the fixture
        else:
            f.chmod(0o644)


def prompt_ids(model_dir: Path, vocab: int) -> list[int]:
    """The first T ids of PROMPT with the model's tokenizer, else seeded random ids."""
    tok = model_dir / "tokenizer.json"
    if tok.is_file():
        ids = Tokenizer.from_file(str(tok)).encode(PROMPT, add_special_tokens=False).ids
        assert len(ids) >= T, f"prompt too short: {len(ids)} tokens"
        ids = ids[:T]
        assert 0 not in ids, "prompt contains id 0 (EOS)"
        return ids
    return [int(i) for i in np.random.default_rng(0).integers(2, vocab, T)]


def load(model_dir: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}  # missing / unexpected / mismatched / errors
    assert not bad, f"{model_dir}: loading problems {bad}"
    assert model.config.rope_parameters["rope_type"] == "default"
    return model.eval()


@torch.inference_mode()
def forward_logits(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one full-sequence forward, no cache."""
    return model(torch.tensor([ids]), use_cache=False).logits[0].float()


def golden(model_dir: Path, with_bf16: bool) -> dict[str, np.ndarray]:
    model = load(model_dir, torch.float32)
    vocab = model.config.vocab_size
    ids = prompt_ids(model_dir, vocab)
    logits = forward_logits(model, ids)
    assert logits.shape == (T, vocab)
    target = torch.tensor(ids[1:])
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, target[:, None])[:, 0]

    # Greedy: argmax over a full uncached forward each step (transparent, no cache code).
    seq, margins = list(ids), []
    for _ in range(NEW_TOKENS):
        last = forward_logits(model, seq)[-1]
        top2 = last.topk(2).values
        margins.append(float(top2[0] - top2[1]))
        seq.append(int(last.argmax()))

    out = {
        "input_ids": np.array(ids, dtype=np.int64),
        "positions": np.array(POSITIONS, dtype=np.int64),
        "logits_f32": logits[POSITIONS].numpy().astype(np.float32),
        "greedy_f32": np.array(seq[T:], dtype=np.int64),
        "greedy_margins_f32": np.array(margins, dtype=np.float32),
        "nll_f32": nll.numpy().astype(np.float32),
    }
    if with_bf16:
        model_bf16 = load(model_dir, torch.bfloat16)
        out["logits_bf16"] = forward_logits(model_bf16, ids)[POSITIONS].numpy()
    out["transformers_version"] = np.array(transformers.__version__)
    out["torch_version"] = np.array(torch.__version__)
    return out


def summary(path: Path, g: dict[str, np.ndarray]) -> str:
    lines = [f"{path} ({path.stat().st_size / 1024:.0f} KB)"]
    for k, v in g.items():
        val = f" = {v.item()}" if v.ndim == 0 else ""
        lines.append(f"  {k:22s} {v.dtype!s:8s} {list(v.shape)}{val}")
    f32 = g["logits_f32"]
    m = g["greedy_margins_f32"]
    lines.append(f"  max |logit_f32| {np.abs(f32).max():.3f}")
    lines.append(f"  smallest greedy margin {m.min():.2e} (step {m.argmin()})")
    if "logits_bf16" in g:
        gap = np.abs(g["logits_bf16"] - f32).max()
        lines.append(f"  transformers bf16-vs-f32 max abs gap {gap:.4f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="checkpoint dir (default: qwen3-odd + qwen3-tiny)")
    p.add_argument("--name", help="fixture name for --model (default: the folder name)")
    p.add_argument("--out", type=Path, default=FIXTURES / "golden", help="npz output folder")
    p.add_argument("--no-bf16", action="store_true", help="skip logits_bf16")
    p.add_argument("--families", action="store_true", help="write llama-odd and qwen2-odd")
    args = p.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()

    if args.families:
        jobs = []
        for name in FAMILY_CONFIGS:
            d = FIXTURES / "models" / name
            make_family_model(name, d)
            print(f"{d}: {sorted(f.name for f in d.iterdir())}")
            jobs.append((name, d))
    elif args.model:
        jobs = [(args.name or args.model.name, args.model)]
    else:
        make_odd_model(ODD_DIR)
        size = sum(f.stat().st_size for f in ODD_DIR.iterdir())
        print(f"{ODD_DIR} ({size / 1024:.0f} KB): {sorted(f.name for f in ODD_DIR.iterdir())}")
        jobs = [("qwen3-odd", ODD_DIR), ("qwen3-tiny", TINY_DIR)]

    args.out.mkdir(parents=True, exist_ok=True)
    for name, model_dir in jobs:
        g = golden(model_dir, with_bf16=not args.no_bf16)
        path = args.out / f"{name}.npz"
        np.savez_compressed(path, **g)
        print(summary(path, g))


if __name__ == "__main__":
    main()
