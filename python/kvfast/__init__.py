"""kvfast: long-context LLM inference under a memory budget.

from kvfast import Session
s = Session.from_pretrained()          # the embedded qwen3-tiny
print(s.generate("Once upon a time", max_new_tokens=32))
"""

from kvfast._native import KvfastError, ModelLoadError, __version__
from kvfast.session import Session

__all__ = ["KvfastError", "ModelLoadError", "Session", "__version__"]
