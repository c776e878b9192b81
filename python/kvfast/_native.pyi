"""Type stubs for the native (Rust) module `kvfast._native`.

The native module works on token ids only; tokenization, chat templates, hub download and
text-level stop strings live in the thin Python layer (`kvfast.session`).
"""

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__version__: str
#: The value ridge with fitted biases (light) and of a values-only fit (firm).
DEFAULT_RIDGE: float
VALUES_RIDGE: float

class KvfastError(Exception):
    """Base class of every error raised by the native module."""

class ModelLoadError(KvfastError, ValueError):
    """A checkpoint could not be loaded: bad config, missing or misshapen tensor, truncated file."""

class Engine:
    """A loaded Qwen3 / Qwen2 / Llama model plus its KV cache (one sequence)."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str | None = None,
        kv_dtype: str | None = None,
    ) -> None:
        """Load a checkpoint directory (config.json + *.safetensors, single or sharded) or a
        .gguf file. `dtype`: "f32", "f16", "bf16", or a weight format to quantize the
        safetensors matrices to on load ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4k",
        "q5k", "q6k"; computed with f32 activations). `kv_dtype`: "int8", "int4", "int2" to
        store the KV cache quantized (CPU only), None for the model dtype.

        Raises FileNotFoundError (missing path/file), ModelLoadError (a ValueError: bad config,
        missing/misshapen tensor, truncated file), ValueError (unknown device or dtype),
        RuntimeError (device not compiled into this build or not present).
        """
    @staticmethod
    def random(
        config_path: str,
        device: str = "cpu",
        dtype: str | None = None,
        seed: int = 0,
        kv_dtype: str | None = None,
    ) -> Engine:
        """A random-weight model with the shape of a `config.json` (for speed benchmarks)."""
    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def num_parameters(self) -> int: ...
    @property
    def weight_bytes(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def kv_dtype(self) -> str | None:
        """The cache's storage format ("int8", "int4", "int2"), None for the model dtype."""
    @kv_dtype.setter
    def kv_dtype(self, value: str | None) -> None:
        """Converts what the cache holds (ValueError: unknown format, or not on the CPU)."""
    @property
    def cache_len(self) -> int:
        """Number of tokens the cache has seen (the RoPE position of the next token)."""
    @property
    def token_ids(self) -> list[int]:
        """Every token id appended to the cache so far, in order."""
    def prefill(
        self, ids: list[int], logits: Literal["last", "all"] | None = "last"
    ) -> npt.NDArray[np.float32] | None:
        """Append `ids` to the cache; f32 logits `[vocab]` ("last") or `[len, vocab]` ("all")."""
    def score(self, ids: list[int]) -> npt.NDArray[np.float32]:
        """NLL of each id given the cache and the ids before it; appends `ids` to the cache.

        The first id is scored with the logits kept from the last cached token (ValueError if
        the cache is empty)."""
    def last_logits(self) -> npt.NDArray[np.float32] | None:
        """Logits after the last cached token, or None for an empty cache."""
    def generate(
        self,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_ids: list[int] | None = None,
    ) -> TokenStream:
        """Sample continuing from the last logits (needs a non-empty cache).

        Each step of the returned iterator samples one token, appends it to the cache and
        yields its id; it stops after an EOS id (which is yielded and cached) or
        `max_new_tokens` ids."""
    def compact(
        self,
        budget: int,
        *,
        method: str = "am",
        queries: str = "repeat",
        suffix: list[int] | None = None,
        sink: int = 4,
        recent: int = 64,
        head_budgets: str | list[list[int]] | None = None,
        fit: str = "am",
        layers: list[int] | None = None,
        seed: int = 0,
        score: str = "max",
        ridge: float | None = 1.0,
        max_queries: int = 4096,
        on_policy: bool = False,
        window: int = 64,
        kernel: int = 5,
        beta_bounds: tuple[float, float] | None = (0.0, 3.0),
        weighted: bool = True,
        beta_prior: float = 0.0,
        shared_mad: float | None = None,
        chunk_size: int = 4096,
        head_floor: float = 0.0,
        tail_check: int = 0,
    ) -> dict[str, Any]:
        """Compact the cache to `budget` keys per head on average; returns a report dict
        (tokens_before/after per [layer][head], bytes_before/after, seconds_queries,
        seconds_fit, query_tokens, fidelity [layer][head] -> (mass, output) rel. errors or
        None, nnls_converged, tail_values_only). `suffix`: the repeat prompt's ids
        (am/repeat, kvzip)."""
    def reset(self) -> None: ...
    def generate_scratch(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> list[int]:
        """Generate from `prompt` on top of the cache and return the new ids; the cache,
        token history and last logits are restored afterwards."""
    def reference_queries(self, ids: Sequence[int]) -> list[npt.NDArray[np.float32]]:
        """Per layer, the queries `[n_heads, len(ids), head_dim]` (after QK-norm and RoPE) of
        `ids` run on top of the cache; the cache is left unchanged."""
    def head_cache(
        self, layer: int, head: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """One (layer, KV head)'s keys, values `[n, head_dim]` and biases `[n]` (copies)."""
    def decode_info(self) -> dict[str, Any]:
        """The CUDA-graph decode path's counters: {"mode": "graph" | "eager" | "off"
        (KVFAST_CUDA_GRAPH), "setups": int, "captures": int, "replays": int,
        "static_eager_steps": int, "capture_seconds": float, "replay_seconds": float (wall time
        of replayed steps, inputs written to logits on the host) and its parts
        "replay_inputs_seconds", "replay_launch_seconds", "replay_gpu_seconds" (CUDA events),
        "replay_wait_seconds", "replay_copy_seconds", "fused": bool (the last static
        step ran the fused CUDA kernels; KVFAST_FUSED), "error": str | None (why graphs were
        turned off for this engine)}."""
        ...
    def cache_info(self) -> dict[str, Any]:
        """{"tokens": int, "layers": int, "kv_heads": int, "head_dim": int, "dtype": str,
        "kv_dtype": str | None, "kv_group": int | None,
        "tokens_per_head": list[list[int]] ([layer][kv_head]), "bytes": int (K+V+bias in use,
        codes and scales included), "capacity_bytes": int (allocated), "bytes_per_token": float
        (bytes / tokens seen)}"""

class TokenStream(Iterator[int]):
    def __iter__(self) -> TokenStream: ...
    def __next__(self) -> int: ...

def cuda_available() -> bool:
    """Whether this build has the `cuda` feature and a CUDA device can be opened."""

def load_blas(path: str, prefix: str = "") -> None:
    """Use `{prefix}cblas_sgemm` from the shared library at `path` for CPU prefill products."""

def fit_head(
    q: npt.NDArray[np.float32],
    k: npt.NDArray[np.float32],
    v: npt.NDArray[np.float32],
    keep: Sequence[int] | None = None,
    *,
    budget: int | None = None,
    bias: npt.NDArray[np.float32] | None = None,
    scale: float | None = None,
    fit: str = "am",
    ridge: float | None = None,
    beta_bounds: tuple[float, float] | None = (0.0, 3.0),
) -> dict[str, Any]:
    """The Attention-Matching fit of one head: `q [m, d]`, `k`/`v` `[n, d]`, and either the kept
    key indices or `budget` keys chosen by root-mean-square attention. Returns {"keep": [t],
    "bias": [t], "values": [t, d], "mass_rel_err", "out_rel_err", "nnls_converged"}."""

def blas_available() -> bool:
    """Whether a BLAS was loaded (see `kvfast._blas`)."""

def build_features() -> list[str]:
    """Cargo features compiled in ("cuda", "metal")."""

def gguf_metadata(path: str) -> dict[str, Any]:
    """A GGUF file's metadata (tokenizer vocabulary, merges, chat template, ...) as Python
    values; the tensors are not read. Raises FileNotFoundError / ModelLoadError."""
