"""`Session`: a model, its KV cache and its tokenizer. Compute is native (`kvfast._native`);
this layer adds text: tokenization, chat templates, hub download and text-level stopping."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from kvfast import _native, chat
from kvfast.hub import resolve_model

TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(ids: TokenIds) -> list[int]:
    out = [int(i) for i in np.asarray(ids).reshape(-1)] if not isinstance(ids, list) else ids
    if len(out) == 0:
        raise ValueError("empty prompt: no token ids given")
    return [int(i) for i in out]


class Session:
    """One sequence: `prefill` and `generate` append to its cache; `reset` empties it."""

    def __init__(
        self, engine: _native.Engine, model_path: Path, tokenizer: Tokenizer | None
    ) -> None:
        self.engine = engine
        self.model_path = model_path
        self._tokenizer = tokenizer
        self._tok_config = _read_json(model_path / "tokenizer_config.json")
        self._template = chat.load_template(model_path, self._tok_config)
        self.eos_token_ids = self._eos_ids()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
    ) -> Session:
        """Load a Qwen3 checkpoint: None (embedded qwen3-tiny), a directory, or a hub id."""
        path = resolve_model(model)
        engine = _native.Engine(str(path), device=device, dtype=dtype)
        return cls(engine, path, _load_tokenizer(tokenizer, path))

    # -- properties ---------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ValueError(
                f"no tokenizer: {self.model_path} has no tokenizer.json; pass tokenizer=..."
            )
        return self._tokenizer

    @property
    def config(self) -> dict[str, Any]:
        return self.engine.config

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def cache_len(self) -> int:
        """Tokens the cache has seen (the position of the next token)."""
        return self.engine.cache_len

    # -- text ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's own Jinja chat template."""
        specials = {k: self._tok_config.get(k) for k in ("bos_token", "eos_token")}
        specials = {
            k: (v.get("content") if isinstance(v, dict) else v) for k, v in specials.items()
        }
        return chat.render(self._template, messages, add_generation_prompt, **specials, **kwargs)

    # -- compute ------------------------------------------------------------------------------
    def prefill(
        self, ids: TokenIds, *, logits: Literal["last", "all"] | None = "last"
    ) -> npt.NDArray[np.float32] | None:
        """Append `ids` to the cache; float32 logits `[vocab]`, `[len, vocab]` or None."""
        if logits not in ("last", "all", None):
            raise ValueError(f'logits must be "last", "all" or None, got {logits!r}')
        return self.engine.prefill(_ids(ids), logits)

    def score(self, ids: TokenIds) -> npt.NDArray[np.float32]:
        """NLL of each token given the cache and the tokens before it; appends `ids`."""
        return self.engine.score(_ids(ids))

    def generate(
        self,
        prompt: str | TokenIds | None = None,
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> str | Iterator[str]:
        """Generate after `prompt` (or after the cache); the new text, or its pieces if `stream`.

        Stops at the model's EOS ids (not included in the text), at a `stop` string (cut before
        it), or after `max_new_tokens` tokens. Generated tokens stay in the cache."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError("stop strings must be non-empty strings")
        # Validate everything before touching the cache.
        self._check_sampling(temperature, top_p, min_p, repetition_penalty)
        if prompt is not None:
            ids = self.encode(prompt) if isinstance(prompt, str) else _ids(prompt)
            if not ids:
                raise ValueError("empty prompt")
            self.engine.prefill(ids, None)
        elif self.engine.last_logits() is None:
            raise ValueError("nothing to continue from: the cache is empty; pass a prompt")
        token_stream = self.engine.generate(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            eos_ids=self.eos_token_ids,
        )
        pieces = self._text_pieces(token_stream, stops)
        return pieces if stream else "".join(pieces)

    @staticmethod
    def _check_sampling(temperature: float, top_p: float, min_p: float, rep: float) -> None:
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if not 0 <= min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {min_p}")
        if not rep > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {rep}")

    def _text_pieces(self, tokens: Iterator[int], stops: list[str]) -> Iterator[str]:
        """Incremental detokenization: emit only text that is final (complete UTF-8, and not
        possibly the start of a stop string)."""
        eos = set(self.eos_token_ids)
        ids: list[int] = []
        emitted = 0
        hold = max((len(s) for s in stops), default=1) - 1
        text = ""
        for tok in tokens:
            if tok in eos:
                break
            ids.append(tok)
            text = self.decode(ids)
            cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield text[emitted:cut]
                return
            safe = len(text) - hold
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                safe = min(safe, len(text.rstrip("\ufffd")))
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if len(text) > emitted:
            yield text[emitted:].rstrip("\ufffd") if text.endswith("\ufffd") else text[emitted:]

    def reset(self) -> None:
        self.engine.reset()

    def cache_info(self) -> dict[str, Any]:
        """Tokens per layer/head and bytes of K, V and bias really held."""
        return self.engine.cache_info()

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gen = _read_json(self.model_path / "generation_config.json").get("eos_token_id")
        for v in (gen, self.config.get("eos_token_ids")):
            ids += [v] if isinstance(v, int) else list(v or [])
        tok = self._tok_config.get("eos_token")
        tok = tok.get("content") if isinstance(tok, dict) else tok
        if isinstance(tok, str) and self._tokenizer is not None:
            tid = self._tokenizer.token_to_id(tok)
            if tid is not None:
                ids.append(tid)
        return list(dict.fromkeys(int(i) for i in ids))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Session(model={str(self.model_path)!r}, layers={c['num_hidden_layers']}, "
            f"device={self.device}, dtype={self.dtype}, cache_len={self.cache_len})"
        )


def _load_tokenizer(
    tokenizer: str | os.PathLike[str] | Tokenizer | None, model_path: Path
) -> Tokenizer | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return Tokenizer.from_file(str(path))
    default = model_path / "tokenizer.json"
    return Tokenizer.from_file(str(default)) if default.is_file() else None
