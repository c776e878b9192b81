"""`--peer kvpress`: NVIDIA kvpress's presses run through transformers on the same checkpoint,
token ids and ratios as kvfast's methods, so a user sees an independent implementation beside
ours. Optional: needs torch, transformers and kvpress (`pip install kvpress`); nothing else in
kvfast imports them.

kvpress masks the keys it drops instead of freeing them, so a press holds the full cache's bytes
at every ratio; the rows say so.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

#: `--peer-presses` name -> kvpress class.
PRESSES = {
    "snapkv": "SnapKVPress",
    "streaming": "StreamingLLMPress",
    "tova": "TOVAPress",
    "kvzip": "KVzipPress",
    "expected_attention": "ExpectedAttentionPress",
    "knorm": "KnormPress",
}
DEFAULT_PRESSES = "snapkv,streaming,tova,kvzip,expected_attention"


class Peer(Protocol):
    """What the subcommands need from a peer implementation."""

    name: str

    def generate(
        self, press: str, ratio: float, context: Sequence[int], question: Sequence[int], n: int
    ) -> str: ...

    def nll(
        self, press: str, ratio: float, context: Sequence[int], continuation: Sequence[int]
    ) -> list[float]: ...

    def kv_bytes(self, tokens: int) -> int: ...


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peer", choices=("kvpress",), default=None, help="also run kvpress's presses")
    p.add_argument(
        "--peer-presses",
        default=DEFAULT_PRESSES,
        help=f"kvpress presses (default {DEFAULT_PRESSES}; also: {', '.join(PRESSES)})",
    )


def presses(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.peer_presses.split(",") if n.strip()]
    bad = [n for n in names if n not in PRESSES]
    if bad:
        raise ValueError(f"--peer-presses: unknown {bad}; expected some of {', '.join(PRESSES)}")
    return names


def open_peer(args: argparse.Namespace, model: Path, device: str, dtype: str) -> Peer | None:
    if args.peer is None:
        return None
    presses(args)  # check the names before loading anything
    return Kvpress(model, device, dtype)


class Kvpress:
    """kvpress's `kv-press-text-generation` pipeline on a transformers copy of the model."""

    name = "kvpress"

    def __init__(self, model: Path, device: str, dtype: str):
        try:
            import kvpress  # type: ignore[import-not-found]
            import torch  # type: ignore[import-not-found]
            import transformers  # type: ignore[import-not-found]
        except ImportError as e:
            raise RuntimeError(
                f"--peer kvpress needs torch, transformers and kvpress installed ({e})"
            ) from e
        self.torch, self.kvpress = torch, kvpress
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype]
        tok = transformers.AutoTokenizer.from_pretrained(model)
        self.model = (
            transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
            .to(self.device)
            .eval()
        )
        self.pipe = transformers.pipeline(
            "kv-press-text-generation", model=self.model, tokenizer=tok, device=self.device
        )
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        elem = torch.finfo(torch_dtype).bits // 8
        self.bytes_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elem
        self.version = getattr(kvpress, "__version__", "?")

    def _press(self, name: str, ratio: float) -> Any:
        if name == "full" or ratio <= 1:
            return None
        return getattr(self.kvpress, PRESSES[name])(compression_ratio=1 - 1 / ratio)

    def generate(
        self, press: str, ratio: float, context: Sequence[int], question: Sequence[int], n: int
    ) -> str:
        t = self.torch
        inputs = {
            "context_ids": t.tensor([list(context)], device=self.device),
            "questions_ids": [t.tensor([list(question)], device=self.device)],
        }
        with t.inference_mode():
            out = self.pipe._forward(inputs, max_new_tokens=n, press=self._press(press, ratio))
        return str(out[0])

    def nll(
        self, press: str, ratio: float, context: Sequence[int], continuation: Sequence[int]
    ) -> list[float]:
        """NLL of `continuation` after `context` was prefilled (and compressed by the press)."""
        t = self.torch
        from transformers import DynamicCache  # type: ignore[import-not-found]

        cache = DynamicCache()
        p = self._press(press, ratio)
        ctx = t.tensor([list(context)], device=self.device)
        cont = t.tensor([list(continuation)], device=self.device)
        with t.inference_mode():
            with p(self.model) if p is not None else contextlib.nullcontext():
                first = self.model(ctx, past_key_values=cache, use_cache=True).logits[0, -1:]
            # The press shortened the cache: positions must continue from the context's length
            # (as kvpress's own pipeline does), not from the number of keys kept.
            pos = t.arange(len(context), len(context) + cont.shape[1] - 1, device=self.device)
            # Presses with per-head budgets (KVzip, AdaKV) mask dropped keys with a "fake key"
            # that must score below every query at once; kvpress searches for one per step and
            # fails for a block of 255 tokens' queries. One token per step is how its own
            # pipeline decodes, and there the search always succeeds.
            x = cont[:, :-1]
            step = 1 if self._masks_keys() else max(x.shape[1], 1)
            rest = t.cat(
                [
                    self.model(
                        x[:, i : i + step],
                        past_key_values=cache,
                        use_cache=True,
                        position_ids=pos[None, i : i + step],
                    ).logits[0]
                    for i in range(0, x.shape[1], step)
                ]
            )
            logp = t.log_softmax(t.cat([first, rest]).float(), dim=-1)
            nll = -logp.gather(1, cont[0].unsqueeze(1)).squeeze(1)
        return [float(x) for x in nll]

    def _masks_keys(self) -> bool:
        """Whether the last prefill's press left per-head masks (kvpress's `masked_key_indices`;
        its attention patch clears them at every prefill)."""
        return any(getattr(m, "masked_key_indices", None) is not None for m in self.model.modules())

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token
