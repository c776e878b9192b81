"""Chat templates: the real Qwen3 template renders exactly as transformers renders it.

tests/fixtures/qwen3_tokenizer_config.json is Qwen3's tokenizer_config.json (with its chat
template), copied so that this suite needs no shared assets. The expected strings are derived
by reading that template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers import FIXTURES
from jinja2.exceptions import SecurityError
from kvfast import chat

QWEN3_CONFIG: dict[str, Any] = json.loads(
    (FIXTURES / "qwen3_tokenizer_config.json").read_text(encoding="utf-8")
)


def qwen3(messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any) -> str:
    template = chat.load_template(Path("/nonexistent"), QWEN3_CONFIG)
    variables = {**chat.special_tokens(QWEN3_CONFIG), **kw}
    return chat.render(template, messages, add_generation_prompt, **variables)


def test_qwen3_system_user_no_thinking() -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert qwen3(messages, enable_thinking=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Thinking on (the default, or enable_thinking=True): no empty think block.
    on = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen3(messages) == on
    assert qwen3(messages, enable_thinking=True) == on
    assert qwen3(messages, add_generation_prompt=False, enable_thinking=False) == on.removesuffix(
        "<|im_start|>assistant\n"
    )


def test_qwen3_drops_reasoning_of_earlier_turns() -> None:
    answer = "<think>\nLet me greet.\n</think>\n\nHello!"
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Bye"},
    ]
    assert qwen3(messages) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # ...but keeps the reasoning of the turn after the last user message.
    assert qwen3(messages[:2], add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nLet me greet.\n</think>\n\nHello!<|im_end|>\n"
    )


def test_qwen3_tools_use_transformers_tojson() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo du jour",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    call = {"function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "12°C"},
    ]
    # json.dumps with ensure_ascii=False and default separators, keys in insertion order.
    assert qwen3(messages, tools=[tool]) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML "
        'tags:\n<tools>\n{"type": "function", "function": {"name": "get_weather", '
        '"description": "Météo du jour", "parameters": {"type": "object", "properties": '
        '{"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return a json '
        "object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Zürich"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n12°C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_trim_and_lstrip_blocks() -> None:
    template = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
    template += "    {% endif %}\n{% endfor %}"
    out = chat.render(template, [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}])
    assert out == "[a]\n"


def test_raise_exception_reaches_the_caller() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}"
    template += "{% endif %}ok"
    assert chat.render(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(chat.ChatTemplateError, match="first must be user"):
        chat.render(template, [{"role": "system", "content": "x"}])
    assert issubclass(chat.ChatTemplateError, ValueError)


def test_loopcontrols_and_strftime_now() -> None:
    template = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
    template += "{{ m.content }}{% endfor %}|{{ strftime_now('%Y') | length }}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert chat.render(template, msgs) == "a|4"


def test_sandbox_is_immutable() -> None:
    with pytest.raises(SecurityError):
        chat.render("{% set x = [] %}{{ x.append(1) }}", [])
    with pytest.raises(SecurityError):
        chat.render("{{ messages.append({}) }}", [])
    # Private attributes are invisible: no route from a string to Python's internals.
    assert chat.render("{{ ''.__class__ }}", []) == ""


def test_template_sources(tmp_path: Path) -> None:
    assert chat.load_template(tmp_path, {"chat_template": "A"}) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert chat.load_template(tmp_path, {"chat_template": named}) == "D"
    assert chat.load_template(tmp_path, {}) is None
    # chat_template.jinja takes precedence, as in transformers.
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert chat.load_template(tmp_path, {"chat_template": "A"}) == "J"


def test_no_template_and_bad_messages() -> None:
    with pytest.raises(ValueError, match="this model has no chat template"):
        chat.render(None, [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="list of"):
        chat.render("x", {"role": "user"})  # type: ignore[arg-type]


def test_special_tokens_accept_added_token_dicts() -> None:
    cfg = {"bos_token": None, "eos_token": {"content": "<|im_end|>", "special": True}}
    assert chat.special_tokens(cfg) == {"bos_token": None, "eos_token": "<|im_end|>"}
    assert chat.special_tokens(QWEN3_CONFIG)["eos_token"] == "<|im_end|>"
