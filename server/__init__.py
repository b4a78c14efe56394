"""`edge-run serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine's
continuous-batching scheduler."""
from __future__ import annotations

from .app import ServeOptions, create_app, serve

__all__ = ["ServeOptions", "create_app", "serve"]
