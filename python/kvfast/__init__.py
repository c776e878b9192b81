"""kvfast: long-context LLM inference under a memory budget.

from kvfast import Session
s = Session.from_pretrained()          # the embedded qwen3-tiny
print(s.generate("Once upon a time", max_new_tokens=32))
"""

from kvfast._blas import load_default_blas
from kvfast._native import KvfastError, ModelLoadError, __version__
from kvfast.session import Session

load_default_blas()

__all__ = ["KvfastError", "ModelLoadError", "Session", "__version__"]
