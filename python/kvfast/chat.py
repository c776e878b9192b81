"""Chat templates rendered the way transformers renders them (sandboxed Jinja).

Matching transformers matters: a template rendered differently gives the model a prompt it
was not trained on. The environment below mirrors `transformers.utils.chat_template_utils`:
ImmutableSandboxedEnvironment, trim_blocks + lstrip_blocks, the loopcontrols extension,
`raise_exception`, `strftime_now` and a `tojson` filter that keeps non-ASCII text as is.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template itself rejected the conversation (its `raise_exception` was called)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes and sorts keys; templates expect plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> Template:
    # Compiling is the slow part; a session renders the same template many times.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def load_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    """The checkpoint's template source, or None if it has none.

    A `chat_template.jinja` file wins over tokenizer_config's entry, as in transformers (newer
    checkpoints store the template only there). tokenizer_config's entry is a string or a list
    of {"name", "template"}, of which the "default" one is used.
    """
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


def special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str | None]:
    """bos_token / eos_token as strings; tokenizer_config may store them as AddedToken dicts."""
    out: dict[str, str | None] = {}
    for key in ("bos_token", "eos_token"):
        v = tokenizer_config.get(key)
        out[key] = v.get("content") if isinstance(v, dict) else v
    return out


def render(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template`; extra kwargs (bos_token, enable_thinking, tools, ...)
    become template variables."""
    if template is None:
        raise ValueError("this model has no chat template")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    return _compile(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **kwargs
    )
