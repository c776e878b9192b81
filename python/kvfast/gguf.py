"""GGUF files on the Python side: the tokenizer and chat template from the file's metadata (the
engine reads the weights and the config itself)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from kvfast import _native

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) -> the split its regexes make, as
# tokenizers pre-tokenizers; all are byte-level BPE. From llama.cpp's llama-vocab.cpp.
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> Any:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("gpt2", "default", "mpt", "olmo"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact", "codeshell"):  # digits one by one, then GPT-2
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = {"qwen2": _QWEN2, "llama-bpe": _LLAMA3, "llama3": _LLAMA3}.get(pre)
    if regex is None:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (gpt2, smollm, qwen2 and llama-bpe "
            "are); pass tokenizer= with the model's tokenizer.json"
        )
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def read_metadata(path: Path) -> dict[str, Any]:
    return _native.gguf_metadata(str(path))


def tokenizer_from_metadata(meta: dict[str, Any]) -> Tokenizer:
    """The byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.*`)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE, 'gpt2', is); "
            "pass tokenizer= with the model's tokenizer.json"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "gpt2")))
    tok.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are special: matched whole, skipped when decoding.
    types: list[int] = meta.get("tokenizer.ggml.token_type", [])
    specials = [tokens[i] for i, t in enumerate(types) if t == 3]
    tok.add_special_tokens(specials)
    return tok


def tokenizer_config(meta: dict[str, Any]) -> dict[str, Any]:
    """What the session reads from a checkpoint's tokenizer_config.json, from GGUF metadata."""
    tokens: list[str] = meta.get("tokenizer.ggml.tokens", [])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return {
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
    }
