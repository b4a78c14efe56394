"""edge-run: run language models on the device in front of you.

    >>> import edgerun
    >>> engine = edgerun.load("smollm2-135m")
    >>> for r in engine.generate("The capital of France is", max_new_tokens=8):
    ...     print(r.text, end="")
"""
from __future__ import annotations

__version__ = "0.1.0"

from .runtime.engine import Engine, GenerationResponse, load  # noqa: E402

__all__ = ["Engine", "GenerationResponse", "load", "__version__"]
