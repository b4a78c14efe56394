"""edge-run: run language models on the device in front of you.

    >>> import edgerun
    >>> engine = edgerun.load("smollm2-135m")
    >>> for r in engine.generate("The capital of France is", max_new_tokens=8):
    ...     print(r.text, end="")
"""
from __future__ import annotations

# absolute: pytest imports this file on its own when it collects the checkout (as `__init__` when
# the folder name is not an identifier), and a relative import would fail there
from edgerun.hub import load
from edgerun.runtime.engine import Engine, GenerationResponse
from edgerun.version import __version__

__all__ = ["Engine", "GenerationResponse", "load", "__version__"]
