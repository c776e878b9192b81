"""`Session`: a model, its KV cache and its tokenizer.

Compute is native (`kvfast._native`, token ids only); this layer adds text: tokenization, chat
templates, hub download, and text-level stopping with incremental detokenization.
"""

from __future__ import annotations

import json
import math
import operator
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer

from kvfast import _native, chat, gguf
from kvfast.compaction import (
    AUTO_BIAS_RATIOS,
    AUTO_RIDGE,
    FITS,
    METHODS,
    QUERY_SOURCES,
    REPEAT_INSTRUCTION,
    SELF_STUDY_PROMPTS,
    BudgetProfile,
    CompactionReport,
    load_head_budgets,
    resolve_budget,
)
from kvfast.detok import stream_text
from kvfast.hub import resolve_model

TokenIds = Sequence[int] | npt.NDArray[np.integer[Any]]
LogitsMode = Literal["last", "all"] | None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _ids(ids: TokenIds) -> list[int]:
    """Token ids as a list of Python ints (what the native engine takes); rejects floats,
    which `int()` would silently truncate."""
    flat = np.asarray(ids).reshape(-1) if isinstance(ids, np.ndarray) else ids
    try:
        out = [operator.index(i) for i in flat]
    except TypeError:
        raise TypeError(f"token ids must be integers, got {ids!r:.80}") from None
    if not out:
        raise ValueError("empty prompt: no token ids given")
    return out


def _id_list(value: Any) -> list[int]:
    """A config's eos_token_id: an int, a list of ints, or absent."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


class Session:
    """One sequence: `prefill` and `generate` append to its cache; `reset` empties it."""

    def __init__(
        self,
        engine: _native.Engine,
        model_path: Path,
        tokenizer: Tokenizer | None,
        tokenizer_config: dict[str, Any] | None = None,
    ) -> None:
        self._engine = engine
        self._model_path = model_path
        self._tokenizer = tokenizer
        self._tok_config = (
            tokenizer_config
            if tokenizer_config is not None
            else _read_json(model_path / "tokenizer_config.json")
        )
        self._template = chat.load_template(model_path, self._tok_config)
        self._eos_token_ids = self._find_eos_ids()

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: str | None = None,
        tokenizer: str | os.PathLike[str] | Tokenizer | None = None,
        kv_dtype: str | None = None,
    ) -> Session:
        """Load a Qwen3, Qwen2 or Llama checkpoint: None (embedded qwen3-tiny), a directory, a
        .gguf file (matrices stay quantized; tokenizer and chat template from its metadata), or
        a hub id.

        `device` ("cpu", "cuda", "cuda:N", "metal") and `dtype` ("f32", "f16", "bf16", or a
        weight format to quantize safetensors matrices to on load: "q8_0", "q4_0", "q4_1",
        "q5_0", "q5_1", "q4k", "q5k", "q6k"; None for the engine's default) are checked by the
        engine. `tokenizer` is a Tokenizer, a
        tokenizer.json or a directory holding one; by default the checkpoint's own. Without
        any, the session works on token ids only. `kv_dtype` ("int8", "int4", "int2"; CPU)
        stores the KV cache quantized, KIVI-style (see `Session.kv_dtype`); None keeps it in
        the model dtype.
        """
        path = resolve_model(model)
        if path.is_file():  # GGUF: tokenizer and chat template come from its metadata
            engine = _native.Engine(str(path), device=device, dtype=dtype, kv_dtype=kv_dtype)
            meta = gguf.read_metadata(path)
            tok = (
                _load_tokenizer(tokenizer, path)
                if tokenizer is not None
                else gguf.tokenizer_from_metadata(meta)
            )
            return cls(engine, path, tok, gguf.tokenizer_config(meta))
        tok = _load_tokenizer(tokenizer, path)
        engine = _native.Engine(str(path), device=device, dtype=dtype, kv_dtype=kv_dtype)
        return cls(engine, path, tok)

    # -- properties ---------------------------------------------------------------------------
    @property
    def engine(self) -> _native.Engine:
        """The native engine (token-id level API)."""
        return self._engine

    @property
    def model_path(self) -> Path:
        return self._model_path

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer, or None for an ids-only session."""
        return self._tokenizer

    @property
    def config(self) -> dict[str, Any]:
        """The engine's normalized model config (head_dim, rope_theta, eos_token_ids, ...)."""
        return self._engine.config

    @property
    def device(self) -> str:
        return self._engine.device

    @property
    def dtype(self) -> str:
        return self._engine.dtype

    @property
    def kv_dtype(self) -> str | None:
        """How the KV cache is stored: "int8", "int4", "int2" (KIVI-style: keys per channel
        and values per token in groups of 32, the newest < 32 tokens exact), or None for the
        model dtype. Assigning converts what the cache holds (e.g. compact at full precision,
        then `session.kv_dtype = "int4"`)."""
        return self._engine.kv_dtype

    @kv_dtype.setter
    def kv_dtype(self, value: str | None) -> None:
        self._engine.kv_dtype = value

    @property
    def cache_len(self) -> int:
        """Tokens the cache has seen (the position of the next token)."""
        return self._engine.cache_len

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: generation_config's eos_token_id (else config.json's),
        plus the tokenizer's eos_token."""
        return list(self._eos_token_ids)

    # -- text ---------------------------------------------------------------------------------
    def _require_tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ValueError(
                f"no tokenizer: {self._model_path} has no tokenizer.json; pass tokenizer=..."
            )
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (special tokens written in the text, such as
        those of a rendered chat template, are still recognized)."""
        return list(self._require_tokenizer().encode(text, add_special_tokens=False).ids)

    def decode(self, ids: TokenIds, skip_special_tokens: bool = True) -> str:
        flat = np.asarray(ids).reshape(-1) if isinstance(ids, np.ndarray) else ids
        return self._require_tokenizer().decode(
            [operator.index(i) for i in flat], skip_special_tokens=skip_special_tokens
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's own Jinja chat template, as transformers
        does; extra kwargs (e.g. enable_thinking=False, tools=[...]) reach the template."""
        variables = {**chat.special_tokens(self._tok_config), **kwargs}
        return chat.render(self._template, messages, add_generation_prompt, **variables)

    # -- compute ------------------------------------------------------------------------------
    def prefill(
        self, ids: TokenIds, *, logits: LogitsMode = "last"
    ) -> npt.NDArray[np.float32] | None:
        """Append `ids` to the cache; float32 logits `[vocab]` ("last"), `[len, vocab]`
        ("all") or None."""
        if logits not in ("last", "all", None):
            raise ValueError(f'logits must be "last", "all" or None, got {logits!r}')
        return self._engine.prefill(_ids(ids), logits)

    def score(self, ids: TokenIds) -> npt.NDArray[np.float32]:
        """NLL (nats) of each id given the cache and the ids before it; appends `ids`."""
        return self._engine.score(_ids(ids))

    @overload
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
        stream: Literal[False] = False,
    ) -> str: ...
    @overload
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
        stream: Literal[True],
    ) -> Iterator[str]: ...
    @overload
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
    ) -> str | Iterator[str]: ...
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
        """Generate after `prompt` (text or ids), or after the cache if `prompt` is None.

        Returns the new text, or with `stream=True` an iterator of its pieces (joined, the
        same text). Stops at an EOS id (not in the text), before the first `stop` string, or
        after `max_new_tokens` tokens. temperature 0 is greedy. Arguments are checked and
        the prompt is prefilled at call time; with `stream=True` tokens are then sampled
        only as the iterator is consumed. Generated tokens (EOS included) stay in the cache.
        """
        stops = _check_generate_args(
            max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop
        )
        # Everything that can fail is checked before the cache is touched.
        ids: list[int] | None
        if prompt is None:
            if self._engine.cache_len == 0:
                raise ValueError("nothing to continue from: the cache is empty; pass a prompt")
            ids = None
        elif isinstance(prompt, str):
            ids = self.encode(prompt) if prompt else []
            if not ids:
                raise ValueError("empty prompt")
        else:
            ids = _ids(prompt)
        tokenizer = self._require_tokenizer()
        if ids is not None:
            self._engine.prefill(ids, None)
        tokens = self._engine.generate(
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            min_p=float(min_p),
            repetition_penalty=float(repetition_penalty),
            seed=seed,
            eos_ids=self._eos_token_ids,
        )
        pieces = stream_text(tokenizer, tokens, eos_ids=self._eos_token_ids, stops=stops)
        return pieces if stream else "".join(pieces)

    def compact(
        self,
        *,
        ratio: float | None = None,
        budget: int | None = None,
        method: str = "am",
        queries: str = "repeat",
        task: str | None = None,
        sink: int = 4,
        recent: int = 64,
        head_budgets: str | os.PathLike[str] | list[list[int]] | None = None,
        fit: str = "auto",
        layers: Sequence[int] | None = None,
        seed: int = 0,
        score: str = "max",
        max_queries: int = 4096,
        ridge: float | Literal["auto"] | None = "auto",
        on_policy: bool = False,
        beta_bounds: tuple[float, float] | None = (0.0, 3.0),
        beta_prior: float = 0.0,
        task_threshold: float | None = 3.0,
        chunk_size: int = 4096,
        head_floor: float = 0.0,
        tail_check: int = 0,
    ) -> CompactionReport:
        """Shrink the cache to `budget` keys per (layer, KV head) on average, or by `ratio`.

        The defaults are the setting measured best on our testbeds (docs/compaction.md): the
        paper's repeat queries, keys scored by the largest attention any reference query gives
        them (`score="max"`; "rms" is the paper's), selected off-policy (`on_policy=False`: one
        pass of the reference queries over the original cache), then from 4x to 16x
        (`fit="auto"`) the paper's fit with biases that only raise kept keys
        (`beta_bounds=(0, 3)`) and values pulled lightly to the kept ones (ridge 1); outside
        that range the values alone, pulled firmly (ridge 10). The paper's
        setting is `score="rms", on_policy=True, fit="am", ridge=None, beta_bounds=(-3, 3)`.
        `method`: "am" (Attention Matching: keys with the highest attention from reference
        queries, values by least squares on the attention output and, with `fit="am"`, biases
        by NNLS on the attention mass), "am-omp" (the same fit on keys chosen by orthogonal
        matching pursuit on the attention mass) or a baseline that keeps original keys and
        values with bias 0: "kvzip", "h2o", "snapkv", "tova", "streaming", "uniform", "random".
        `queries` (am): "repeat" (prefill a scratch prompt asking to repeat the context, then
        the context; its queries are the references, computed layer by layer on the already
        compacted layers when `on_policy`), "context" (the context's own queries, re-run),
        "self-study" (the model answers a few prompts about the context on a scratch
        continuation; the queries of those turns) or "repeat+self-study" (both).
        `task`: a question whose queries replace the repeat prompt (task-guided compaction,
        the Latent Briefing variant): the heads of a layer share one selection, the keys whose
        head-averaged score exceeds median + `task_threshold` * MAD, at most the budget (so a
        focused question may keep fewer keys); `task_threshold=None` lets each head select
        its own budget instead.
        `head_budgets`: "global" (one pool over every head by a global top-k of key scores;
        the default for am and kvzip), "uniform" (the default for the other baselines, as
        published), a `[layer][kv_head]` table or a JSON file holding one. `head_floor`
        (global budgets): the share of the average budget every head keeps before the rest of
        the pool goes by score (0, the default: none). `fit`: "auto" (the
        default: "am" from 4x to 16x, "values" outside; the report's `fit` says which ran),
        "am" (the paper's NNLS biases, w = exp(beta), and least-squares values), "values"
        (beta = 0), "beta" or "none" (ablations). `sink` first and `recent` last tokens stay exact.
        `beta_bounds` keeps the fitted log-weights in a range (None: exact NNLS; the default
        (0, 3) never lowers a kept key) and `beta_prior` pulls them to 0. `ridge` pulls the
        fitted values towards the kept keys' own values (relative to the problem's scale;
        "auto", the default: 1 with biases, 10 for values alone; the report's `ridge` says
        which); None picks it per head on held-out reference queries.
        Each head's middle is fitted in chunks of `chunk_size` keys (each chunk matches its own
        mass and output), which bounds the fit's memory on long contexts. `tail_check=n` (0, the
        default: off; when biases are fitted, on a full-precision cache): re-runs the context's
        last `min(n, recent)` tokens in place (their keys and values are restored) and gives
        each head whose biases make those queries' attention worse than the values-only fit
        with ridge 10 that fit instead (the report's `tail_values_only`): continuation queries
        do not copy the context as the repeat prompt's do (docs/results/tail-check).
        Tokens added later get bias 0 and positions continuing the original context. Bad
        arguments raise ValueError and leave the cache unchanged.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if queries not in QUERY_SOURCES:
            raise ValueError(
                f"unknown query source {queries!r}; expected one of {', '.join(QUERY_SOURCES)}"
            )
        if fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(map(repr, FITS))}, got {fit!r}")
        if isinstance(ridge, str) and ridge != "auto":
            raise ValueError(f'ridge must be a number, "auto" or None, got {ridge!r}')
        ints = (("sink", sink), ("recent", recent), ("seed", seed), ("tail_check", tail_check))
        for name, v in ints:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if (
            isinstance(head_floor, bool)
            or not isinstance(head_floor, (int, float))
            or not 0.0 <= head_floor <= 1.0
        ):
            raise ValueError(
                f"head_floor must be in [0, 1] (a share of the average budget), got {head_floor!r}"
            )
        rows = self._engine.cache_info()["tokens_per_head"]
        n_layers = len(rows)
        # Checked here too (not only in the engine) so that a bad call fails before the
        # self-study turns are generated.
        if layers is not None and (
            not layers
            or any(isinstance(i, bool) or not isinstance(i, int) for i in layers)
            or any(not 0 <= i < n_layers for i in layers)
        ):
            raise ValueError(f"layers must be indices in 0..{n_layers - 1}, got {list(layers)}")
        if beta_bounds is not None and not (
            len(beta_bounds) == 2
            and all(math.isfinite(b) for b in beta_bounds)
            and beta_bounds[0] <= beta_bounds[1]
        ):
            raise ValueError(
                f"beta_bounds must be finite (low, high) with low <= high, got {beta_bounds}"
            )
        # A list (from JSON or a CLI) becomes the pair the engine takes.
        bounds = None if beta_bounds is None else (float(beta_bounds[0]), float(beta_bounds[1]))
        table: list[list[int]] | None = None
        policy: str | None = None
        profile: BudgetProfile | None = None
        if isinstance(head_budgets, list):
            table = head_budgets
        elif head_budgets in ("global", "uniform", "entropy"):
            policy = str(head_budgets)
        elif head_budgets is not None:
            profile = load_head_budgets(head_budgets)
            table = profile.table
            if profile.shares is not None and ratio is None and budget is None:
                raise ValueError("a calibrated budget profile (shares) needs ratio= or budget=")
        # The budget is relative to the compacted layers.
        per_head = [n for i in (range(n_layers) if layers is None else layers) for n in rows[i]]
        mean = sum(per_head) / len(per_head) if per_head else 0.0
        if table is not None and ratio is None and budget is None:
            budget = round(sum(map(sum, table)) / max(sum(map(len, table)), 1))
        budget = resolve_budget(mean, ratio, budget, sink, recent)
        if profile is not None and profile.shares is not None:
            table = profile.keys_for(budget, rows)
        if fit == "auto":
            lo, hi = AUTO_BIAS_RATIOS
            fit = "am" if lo <= (ratio or mean / budget) <= hi else "values"
        if ridge == "auto":
            ridge = AUTO_RIDGE[fit]
        suffix: list[int] | None = None
        generating = 0.0
        is_am = method in ("am", "am-omp")
        needs_suffix = method == "kvzip" or (is_am and queries == "repeat")
        study = is_am and task is None and queries in ("self-study", "repeat+self-study")
        if task is not None:
            if not is_am:
                raise ValueError("task= guides Attention Matching only (method='am' or 'am-omp')")
            suffix = self._prompt_ids(task)
        elif study:
            if self._tokenizer is None:
                raise ValueError(f"queries={queries!r} needs a tokenizer")
            t0 = time.perf_counter()
            suffix = self._self_study_ids(seed)
            generating = time.perf_counter() - t0
            if queries == "repeat+self-study":
                suffix = self._repeat_ids() + suffix
        elif needs_suffix:
            suffix = self._repeat_ids()
        report = self._engine.compact(
            budget,
            method=method,
            # The engine's own sources; the others arrive as a suffix to score like "repeat".
            queries=queries if is_am and queries == "context" else "repeat",
            suffix=suffix,
            sink=sink,
            recent=recent,
            head_budgets=table if table is not None else policy,
            fit=fit,
            layers=None if layers is None else list(layers),
            seed=seed,
            score=score,
            ridge=ridge,
            max_queries=max_queries,
            on_policy=on_policy,
            beta_bounds=bounds,
            beta_prior=beta_prior,
            shared_mad=task_threshold if task is not None else None,
            chunk_size=chunk_size,
            head_floor=float(head_floor),
            tail_check=tail_check,
        )
        # Generating the self-study turns is part of making the reference queries.
        report["seconds_queries"] += generating
        return CompactionReport.from_native(method, budget, fit, ridge, report)

    def _prompt_ids(self, text: str) -> list[int]:
        """`text` as a user turn (chat-formatted when the model has a template)."""
        if self._tokenizer is None:
            raise ValueError("task= needs a tokenizer")
        if self._template is not None:
            text = self.apply_chat_template([{"role": "user", "content": text}])
        return self.encode(text)

    def _self_study_ids(self, seed: int, max_new_tokens: int = 64) -> list[int]:
        """Self-study turns: each prompt of SELF_STUDY_PROMPTS with the model's own (seeded,
        sampled) answer, generated on a scratch continuation of the cache."""
        ids: list[int] = []
        for i, text in enumerate(SELF_STUDY_PROMPTS):
            prompt = self._prompt_ids(text)
            answer = self._engine.generate_scratch(
                prompt, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed + i
            )
            ids += prompt + list(answer)
        return ids

    def _repeat_ids(self) -> list[int]:
        """The repeat prompt: the instruction (as a chat turn when there is a template), then
        the context's own tokens. Without a tokenizer, the context alone."""
        context = self._engine.token_ids
        if self._tokenizer is None:
            return list(context)
        return self._prompt_ids(REPEAT_INSTRUCTION) + list(context)

    def reset(self) -> None:
        """Empty the cache (the weights stay loaded)."""
        self._engine.reset()

    def cache_info(self) -> dict[str, Any]:
        """Tokens per layer and KV head, and bytes of K, V and bias held (see the .pyi)."""
        return self._engine.cache_info()

    def _find_eos_ids(self) -> list[int]:
        gen = _id_list(_read_json(self._model_path / "generation_config.json").get("eos_token_id"))
        # The engine parses config.json's eos_token_id (int or list) into eos_token_ids.
        ids = gen or _id_list(self.config.get("eos_token_ids"))
        token = chat.special_tokens(self._tok_config)["eos_token"]
        if token is not None and self._tokenizer is not None:
            tid = self._tokenizer.token_to_id(token)
            if tid is not None:
                ids.append(tid)
        return list(dict.fromkeys(ids))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Session(model={str(self._model_path)!r}, model_type={c.get('model_type')!r}, "
            f"layers={c.get('num_hidden_layers')}, device={self.device!r}, "
            f"dtype={self.dtype!r}, cache_len={self.cache_len})"
        )


def _check_generate_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    repetition_penalty: float,
    seed: int | None,
    stop: str | Sequence[str] | None,
) -> list[str]:
    """Clear ValueErrors in Python terms (the engine would give OverflowError for negative
    ints); returns the stop strings as a list."""

    def is_int(x: object) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    # `not x >= 0` rather than `x < 0` so that NaN is rejected too.
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p!r}")
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty!r}")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be None or an int in [0, 2**64), got {seed!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _load_tokenizer(
    tokenizer: str | os.PathLike[str] | Tokenizer | None, model_path: Path
) -> Tokenizer | None:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path}")
        return Tokenizer.from_file(str(path))
    default = model_path / "tokenizer.json"
    return Tokenizer.from_file(str(default)) if default.is_file() else None
