"""Shared parts of the two-step peer scripts (`crosscheck_reference.py`, `kvpress_peer.py`):
step 1 (`dump`) runs with kvfast, step 2 with torch in another environment, so nothing here
imports kvfast or torch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def dump_parser(sub: Any, **defaults: int) -> argparse.ArgumentParser:
    """The `dump` subcommand: model, data folder, context length, output file, plus integer
    options given as `name=default`."""
    d = sub.add_parser("dump")
    d.add_argument("--model", required=True)
    d.add_argument("--data", type=Path, required=True)
    d.add_argument("--length", type=int, default=2048)
    for name, value in defaults.items():
        d.add_argument(f"--{name}", type=int, default=value)
    d.add_argument("--out", type=Path, required=True)
    return d


def haystack(session: Any, data: Path) -> list[int]:
    """The Paul Graham essays (RULER's haystack) as token ids."""
    text = json.loads((data / "ruler" / "PaulGrahamEssays.json").read_text())["text"]
    return list(session.encode(text))
