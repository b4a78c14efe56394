"""The interface every inference backend implements, and the registry that finds them.

A backend runs new tokens for a batch of sequences on top of their cached state and returns
logits at chosen positions. Decoding strategies (sampling, speculative, early exit) drive it
token by token; they never see what is behind it (onnxruntime sessions, a llama.cpp context).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from .manifest import Manifest, PackageError


class Cache(Protocol):
    """Per-sequence decoding state. Rollback only moves offsets; it never copies."""

    batch: int
    max_len: int
    lengths: np.ndarray  # int32 [batch]: valid positions per sequence

    def reset(self) -> None: ...
    def rollback(self, lengths: np.ndarray) -> None: ...
    @property
    def nbytes(self) -> int: ...


class Backend(Protocol):
    name: str

    def new_cache(self, batch: int, max_len: int) -> Cache: ...

    def forward(self, inputs: np.ndarray, cache: Cache, counts: np.ndarray,
                logits_positions: np.ndarray) -> np.ndarray:
        """Append `inputs` (int64 [B, S], right-padded; `counts[b]` real tokens in row b) to
        each sequence and return float32 logits [B, N, vocab] at `logits_positions` [B, N]."""
        ...


BackendFactory = Callable[[Path, Manifest, str, "int | None"], Backend]
_BACKENDS: dict[str, BackendFactory] = {}
# backends edge-run ships, imported on first use (so onnx users never load llama.cpp and back)
_MODULES = {"onnx": "edgerun.runtime.onnx_backend", "llamacpp": "edgerun.runtime.llamacpp_backend"}
BACKEND_NAMES = ("auto", *_MODULES)


def register_backend(name: str, factory: BackendFactory) -> None:
    _BACKENDS[name] = factory


KV_CACHE_TYPES = ("f32", "f16")


def open_backend(name: str, package_dir: Path, manifest: Manifest, device: str,
                 threads: int | None, kv_cache: str = "f32") -> Backend:
    """Create backend `name` ("auto": the package's first) for a package.

    `kv_cache` is the KV cache's element type: "f32", or "f16" (llama.cpp only; half the memory).

    Raises:
        PackageError: the package has no artifact for that backend, or the name is unknown.
    """
    if name == "auto":
        name = manifest.backends[0]
    if name not in _BACKENDS and name in _MODULES:
        importlib.import_module(_MODULES[name])  # registers itself
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: auto, {', '.join(dict.fromkeys([*_MODULES, *_BACKENDS]))}")
    if name not in manifest.backends:
        raise PackageError(f"package {package_dir} has nothing for the {name} backend (it has: "
                           f"{', '.join(manifest.backends)}); export it with the matching --format")
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
    return _BACKENDS[name](package_dir, manifest, device, threads, kv_cache=kv_cache)
