"""The interface every inference backend implements, and the registry that finds them.

A backend runs new tokens for a batch of sequences on top of their cached state and returns
logits at chosen positions. Decoding strategies (sampling, speculative, early exit) drive it
token by token; they never see what is behind it (onnxruntime sessions, a llama.cpp context).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

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
    library: str  # the library that computes, as messages name it ("onnxruntime", "llama.cpp")
    weight_bytes: int  # the package's weight bytes as stored (what one step reads, at most)
    manifest: Manifest
    staged: bool  # True: it is also a StagedBackend (runs stage ranges); False: whole model per call
    # True: its shape-invariant kernels are chosen when the model loads (llama.cpp), so only a
    # batch-invariant load can verify drafts exactly; absent or False: InvariantSteps can wrap it
    # for one generation (onnxruntime)
    invariant_at_load: bool

    def new_cache(self, batch: int, max_len: int) -> Cache: ...

    def forward(self, inputs: np.ndarray, cache: Cache, counts: np.ndarray,
                logits_positions: np.ndarray) -> np.ndarray:
        """Append `inputs` (int64 [B, S], right-padded; `counts[b]` real tokens in row b) to
        each sequence and return float32 logits [B, N, vocab] at `logits_positions` [B, N]."""
        ...


class HiddenStates(Protocol):
    """Residual stream between stages as a backend returns it (onnxruntime.OrtValue on the onnx
    backend, possibly on the device): pass it back unchanged to keep it there."""

    def numpy(self) -> np.ndarray: ...  # float32 [B, S, H], copied to the host
    def shape(self) -> list[int]: ...  # [B, S, H]; a method, as on OrtValue


class StagedBackend(Backend, Protocol):
    """A backend that runs any contiguous run of the package's stages (`manifest.stages`) on its
    own: early exit and self-speculation need it. Its `staged` is True."""

    def forward(self, inputs: np.ndarray | HiddenStates, cache: Cache, counts: np.ndarray,
                logits_positions: np.ndarray | None = None, stages: range | None = None,
                start: np.ndarray | None = None) -> np.ndarray | HiddenStates:
        """Run new tokens through `stages` (default: all).

        Args:
            inputs: int64 token ids [B, S] (right-padded) when the run starts at the embedding
                stage; else hidden states [B, S, H]: HiddenStates from an earlier call, or float32.
            cache, counts: as in Backend.forward.
            logits_positions: int64 [B, N] positions to score; used only when the run ends at the
                head stage (None otherwise).
            stages: indices into manifest.stages, contiguous and increasing.
            start: int32 [B] first position of the new tokens per row (default: cache.lengths).
                When given, the caller owns the offsets and the cache does not advance.
        Returns:
            float32 np.ndarray logits [B, N, vocab] when the run ends at the head stage, else
            HiddenStates [B, S, H]. Only a run that ends at the head with `start` unset advances
            cache.lengths by `counts`.
        """
        ...


def require_staged(backend: Backend, feature: str) -> StagedBackend:
    """`backend` itself when it runs stage ranges (see StagedBackend).

    Raises:
        ValueError: it runs the whole model in one call; names the backend and the fix.
    """
    reason = getattr(backend, "unstaged_reason", None)
    if not backend.staged and reason:
        raise ValueError(f"{feature} is not available for this package: {reason}")
    if not backend.staged:
        raise ValueError(f"{feature} needs the onnx backend and a package exported with --exit-layers; the "
                         f"{backend.name} backend ({backend.library}) runs the whole model in one call: "
                         f"load it with backend='onnx' (--backend onnx)")
    return backend


BackendFactory = Callable[[Path, Manifest, str, "int | None"], Backend]
_BACKENDS: dict[str, BackendFactory] = {}
# backends edge-run ships, imported on first use (so onnx users never load llama.cpp and back)
_MODULES = {"onnx": "edgerun.runtime.onnx_backend", "llamacpp": "edgerun.runtime.llamacpp_backend",
            "onnx-generic": "edgerun.runtime.generic_backend"}
BACKEND_NAMES = ("auto", "onnx", "llamacpp")


def register_backend(name: str, factory: BackendFactory) -> None:
    _BACKENDS[name] = factory


KV_CACHE_TYPES = ("f32", "f16", "q8_0")  # q8_0: llama.cpp only
# the CPU kernels are not invariant to the number of new tokens in a step; with float weights the
# difference stays at rounding level, with quantized ones it can flip near-ties (README, "Exactness")
_FLOAT_TYPES = {"float32", "float16", "tied"}


def inexact_verification_types(weights: dict[str, str]) -> list[str]:
    """Weight types whose logits can move enough to change greedy output at near-ties between a
    step of one new token and a step of several, unless the steps run in the invariant form
    (their activations are re-quantized to 8 bits, which turns kernel rounding differences into
    whole quantization steps). Float weights move only at rounding level."""
    types = {t for value in weights.values() for t in value.split("+")}
    return sorted(types - _FLOAT_TYPES)


class InvariantSteps:
    """A backend whose logits do not depend on how many tokens a step carries.

    Both onnxruntime and llama.cpp compute a step of one new token with other CPU kernels than a
    step of several (a matrix-vector product against a tiled matrix product), and with quantized
    weights the rounding difference is amplified by re-quantizing activations to 8 bits: then
    greedy speculative output, or a sequence decoded at batch > 1, can leave plain batch-1 greedy
    where two tokens nearly tie. Steps of two or more tokens agree bit for bit, so here every row
    that runs carries at least two: a row with one new token gets a copy of it at the next
    position (its key/value are dropped again), and a step that scores one position per row also
    scores a neighbour (the last layer and the LM head only run on scored rows). That costs decode
    speed (the step computes twice the tokens) and buys exact reproducibility (figures: README,
    "Design notes: runtime"). Wraps a Backend or a StagedBackend; `staged` is the inner one's.
    A backend with `pads_attention` (ONNX packages whose graphs pick their attention rows, on the
    CPU) gives invariant steps itself with `forward(..., invariant=True)`: only attention gets
    the copy, which costs less.
    """

    def __init__(self, backend: Backend):
        self.inner = backend

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def forward(self, inputs, cache: Cache, counts: np.ndarray, logits_positions: np.ndarray | None = None,
                *args, **kwargs):
        if getattr(self.inner, "pads_attention", False):  # the graphs' own invariant steps: no copied token
            return self.inner.forward(inputs, cache, counts, logits_positions, *args, invariant=True, **kwargs)
        counts = np.asarray(counts)
        short = counts == 1
        lone = logits_positions is not None and logits_positions.shape[1] == 1
        if not short.any() and not lone:
            return self.inner.forward(inputs, cache, counts, logits_positions, *args, **kwargs)
        width = inputs.shape[1] if isinstance(inputs, np.ndarray) else inputs.shape()[1]
        if short.any():
            inputs = inputs if isinstance(inputs, np.ndarray) else inputs.numpy()  # hidden states
            inputs = np.concatenate([inputs, inputs], axis=1) if width == 1 else inputs.copy()
            inputs[short, 1] = inputs[short, 0]
        scored = logits_positions
        if lone:  # score a neighbour too, so the last layer and the head also see >= 2 rows per row
            scored = np.concatenate([scored, np.where(scored > 0, scored - 1, scored + 1)], axis=1)
        before = cache.lengths.copy()
        out = self.inner.forward(inputs, cache, np.where(short, 2, counts), scored, *args, **kwargs)
        if short.any() and not np.array_equal(cache.lengths, before):  # it advanced: drop the copies
            cache.rollback(before + counts)
        if lone:
            return out[:, :1]
        if logits_positions is None and width == 1 and short.any():  # hidden states of the one position asked
            if isinstance(out, np.ndarray):
                return out[:, :1]
            # into memory the OrtValue owns: one that wraps a numpy array (ortvalue_from_numpy) frees it
            # with the Python object, under any `.numpy()` view a caller still holds
            hidden = np.ascontiguousarray(out.numpy()[:, :1])
            owned = type(out).ortvalue_from_shape_and_type(list(hidden.shape), hidden.dtype)
            owned.update_inplace(hidden)
            return owned
        return out


def open_backend(name: str, package_dir: Path, manifest: Manifest, device: str,
                 threads: int | None, kv_cache: str = "f32", batch_invariant: bool = False,
                 speculative: bool = False) -> Backend:
    """Create backend `name` ("auto": the package's first) for a package.

    `kv_cache` is the KV cache's element type: "f32", or on llama.cpp "f16" (half the memory) or
    "q8_0" (a little over a quarter; not batch-invariant).
    `batch_invariant`: logits independent of the step's shape (see InvariantSteps), so greedy
    speculative decoding and any batch size reproduce plain batch-1 greedy output exactly.
    `speculative`: the caller will verify drafts exactly; a backend that chooses its invariant
    kernels at load (`invariant_at_load`) then loads batch-invariant when the weights need it.

    Raises:
        PackageError: the package has no artifact for that backend, or the name is unknown.
    """
    if name == "auto":
        name = manifest.backends[0]
    if name not in BACKEND_NAMES and name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: "
                         f"{', '.join(dict.fromkeys([*BACKEND_NAMES, *_BACKENDS]))}")
    if name not in manifest.backends:
        raise PackageError(f"package {package_dir} has nothing for the {name} backend (it has: "
                           f"{', '.join(manifest.backends)}); export it with the matching --format")
    if name == "onnx" and manifest.generic is not None:
        name = "onnx-generic"  # the package's graph came from a generic exporter (optimum)
    if name not in _BACKENDS and name in _MODULES:
        importlib.import_module(_MODULES[name])  # registers itself
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_CACHE_TYPES)}, got {kv_cache!r}")
    if speculative and getattr(_BACKENDS[name], "invariant_at_load", False):
        batch_invariant = batch_invariant or bool(inexact_verification_types(manifest.weights))
    if not batch_invariant:
        return _BACKENDS[name](package_dir, manifest, device, threads, kv_cache=kv_cache)
    return InvariantSteps(_BACKENDS[name](package_dir, manifest, device, threads, kv_cache=kv_cache,
                                          batch_invariant=True))
