"""edge-run: run language models on the device in front of you.

    >>> import edgerun
    >>> engine = edgerun.load("smollm2-135m")
    >>> for r in engine.generate("The capital of France is", max_new_tokens=8):
    ...     print(r.text, end="")
"""
from __future__ import annotations

__version__ = "0.1.0"

# absolute: pytest imports this file on its own when it collects the checkout (as `__init__` when
# the folder name is not an identifier), and a relative import would fail there
from edgerun.runtime.engine import Engine, GenerationResponse, load  # noqa: E402

__all__ = ["Engine", "GenerationResponse", "load", "__version__"]
