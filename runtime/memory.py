"""Where an engine's memory goes: weights, KV cache, runtime, activations, and the process itself.

Figures are resident bytes (RSS) from the operating system, split by when they appeared: before
the engine loaded (the interpreter and libraries), while it loaded (weights and the runtime's own
structures), and since (KV cache and activation buffers). The parts add up to the process's RSS.
"""
from __future__ import annotations

import ctypes
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from .manifest import ModelSpec

log = logging.getLogger(__name__)
MB = 1e6


def process_rss() -> int:
    """Resident bytes of this process now."""
    return psutil.Process().memory_info().rss


@dataclass(frozen=True)
class MemoryUse:
    """An engine's share of the process's resident memory, in bytes.

    Attributes:
        weights: the package's weight bytes as stored (what the backend reads per token, at most).
        weights_resident: the part of them loading made resident: all of them, or what loading
            added when that is less (memory-mapped weights not all paged in).
        kv_cache: bytes of the KV cache allocated now (it grows with the context used).
        runtime: what loading added beyond the resident weights (onnxruntime's pre-packed weight
            layouts, graph structures, the tokenizer; llama.cpp's buffers); never negative.
        activations: what decoding added since loading beyond the KV cache (activation buffers).
        process: the interpreter and libraries before the engine loaded.
        rss: the process's resident bytes now: weights_resident + kv_cache + runtime +
            activations + process + drafts.
        drafts: what the engine's draft models added (their loading and KV caches), 0 without.
    """

    weights: int
    kv_cache: int
    runtime: int
    activations: int
    process: int
    rss: int
    weights_resident: int
    drafts: int = 0

    def summary(self) -> str:
        """One line, in MB."""
        weights = f"weights {self.weights / MB:.0f} MB"
        if self.weights - self.weights_resident > max(0.1 * self.weights, 16 * MB):  # not RSS noise
            weights += f" ({self.weights_resident / MB:.0f} MB resident, the rest mapped from the file)"
        drafts = f" + draft model {self.drafts / MB:.0f} MB" if self.drafts else ""
        return (f"{weights} + KV cache {self.kv_cache / MB:.0f} MB + runtime {self.runtime / MB:.0f} MB + "
                f"activations {self.activations / MB:.0f} MB{drafts} + Python and libraries "
                f"{self.process / MB:.0f} MB = {self.rss / MB:.0f} MB resident")


class MemoryMeter:
    """Measures an engine's memory: create it before loading, call `loaded` after, `use` any time."""

    def __init__(self) -> None:
        self.before = process_rss()
        self.after_load = self.before
        self.weights = 0

    def loaded(self, weight_bytes: int) -> None:
        self.after_load, self.weights = process_rss(), weight_bytes

    @property
    def loaded_bytes(self) -> int:
        """What loading the engine added to the process's resident memory."""
        return self.after_load - self.before

    def use(self, kv_bytes: int, draft_bytes: int = 0) -> MemoryUse:
        """The split now, given the KV cache's bytes and what draft models loaded after the engine hold."""
        rss = process_rss()
        resident = min(self.weights, max(self.loaded_bytes, 0))
        activations = rss - self.after_load - kv_bytes - draft_bytes
        return MemoryUse(self.weights, kv_bytes, self.loaded_bytes - resident, activations, self.before, rss,
                         resident, draft_bytes)


def release_mapped_pages(files: list[Path]) -> int:
    """Drop this process's resident, unmodified pages of file mappings of `files` (Linux).

    onnxruntime memory-maps external weight files and reads them once to build its pre-packed
    kernel layouts; the pages it read stay resident while mapped although most are never read
    again. Only mappings without a modified page are touched: dropping clean file-backed pages
    loses nothing, a later read faults them back in from the file. Returns the number of
    mappings released (0 off Linux).
    """
    if not sys.platform.startswith("linux"):
        return 0
    names = {str(Path(f).resolve()) for f in files}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed = 4
    released = 0
    for low, high, name in _clean_mappings(names):
        if libc.madvise(low, high - low, madv_dontneed) == 0:
            released += 1
        else:
            log.debug("madvise failed on %s: errno %d", name, ctypes.get_errno())
    return released


def _clean_mappings(names: set[str]) -> list[tuple[int, int, str]]:
    """(start, end, file) of this process's mappings of `names` that hold no modified page: dropping
    such pages loses nothing (a copy-on-write page that was written to is anonymous and is kept)."""
    found, current = [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):  # a mapping's first line
                name = head[5].strip() if len(head) > 5 else ""
                low, high = (int(x, 16) for x in head[0].split("-"))
                current = (low, high, name) if name in names else None
            elif current is not None and head[0] == "Anonymous:":
                if int(head[1]) == 0:
                    found.append(current)
                current = None
    return found


# -- memory budget: the context length and KV cache type that fit --------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "k": 10**3, "mb": 10**6, "m": 10**6, "gb": 10**9, "g": 10**9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
# context lengths a budget chooses between (capped by the model's and the caller's maximum)
CONTEXT_STEPS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
KV_ITEMSIZE = {"f32": 4, "f16": 2, "q8_0": 34 / 32}  # q8_0: 32 int8 + an fp16 scale per block


def parse_size(text: str | int) -> int:
    """Bytes in "400MB", "1.5GB", "512MiB", "300m" or a plain number of bytes.

    Raises:
        ValueError: naming the text and the accepted form.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        value, unit = (float(match[1]), match[2].lower()) if match else (0.0, "?")
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"--max-memory must be a size such as 400MB, 1.5GB or 512MiB, got {text!r}")
    return int(value * _UNITS[unit])


def weight_file_bytes(folder: Path, stage_files: list[str], gguf: Path | None = None) -> int:
    """Bytes of a package's weight files: its stage graphs with their external data, else its GGUF."""
    files = [Path(folder) / f for f in stage_files]
    onnx = sum(f.stat().st_size for f in files + [f.with_name(f.name + ".data") for f in files] if f.is_file())
    return onnx or (gguf.stat().st_size if gguf is not None else 0)


def activation_bytes(spec: ModelSpec, context: int, batch: int = 1) -> int:
    """Peak activation buffers of a prompt that fills `context` positions (fp32), per the graphs' shapes.

    The largest are the attention probabilities [batch, heads, S, context] of the prompt step and the
    MLP's [batch, S, 2 x intermediate]; the rest is a few hidden-sized rows and one row of logits.
    """
    per_token = 4 * (2 * spec.intermediate_size + 6 * spec.hidden_size + spec.num_heads * context)
    return batch * (context * per_token + 4 * spec.vocab_size)


@dataclass(frozen=True)
class MemoryFit:
    """A context length and KV cache type that fit a memory budget, with the parts of the sum (bytes).

    Attributes:
        max_context: KV cache positions per sequence.
        kv_cache: "f32", "f16" or "q8_0" (llama.cpp).
        loaded: weights plus what loading adds (measured after load; the weights' size before).
        kv_bytes: the KV cache at `max_context`.
        activation_bytes: see `activation_bytes`.
    """

    max_context: int
    kv_cache: str
    loaded: int
    kv_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.loaded + self.kv_bytes + self.activation_bytes

    def summary(self) -> str:
        return (f"{self.total / MB:.0f} MB (weights and runtime {self.loaded / MB:.0f} MB + {self.kv_cache} KV cache "
                f"{self.kv_bytes / MB:.0f} MB + activations {self.activation_bytes / MB:.0f} MB at "
                f"{self.max_context} tokens)")


def memory_need(spec: ModelSpec, loaded: int, context: int, kv_cache: str = "f32", batch: int = 1) -> MemoryFit:
    """What a package needs at `context` positions: `loaded` (weights + runtime) + KV cache + activations."""
    return MemoryFit(context, kv_cache, loaded, spec.kv_bytes(batch, context + 1, KV_ITEMSIZE[kv_cache]),
                     activation_bytes(spec, context, batch))


def fit_memory(spec: ModelSpec, budget: int, loaded: int, kv_types: tuple[str, ...] = ("f32",),
               max_context: int | None = None, batch: int = 1) -> MemoryFit:
    """The longest context (then the widest KV type) whose need fits `budget`.

    Args:
        spec: the package's model.
        budget: bytes the engine may use (weights, runtime, KV cache, activations).
        loaded: weights plus what loading adds, in bytes (measured, or the weights' size before loading).
        kv_types: KV cache types the backend takes, preferred first ("f32", "f16").
        max_context: the longest context to consider (default: the model's).
    Raises:
        ValueError: nothing fits; names the smallest fit and the fixes.
    """
    cap = min(max_context or spec.context_length, spec.context_length)
    contexts = sorted({c for c in CONTEXT_STEPS if c <= cap} | {cap}, reverse=True)
    for context in contexts:
        for kv in kv_types:
            need = memory_need(spec, loaded, context, kv, batch)
            if need.total <= budget:
                return need
    smallest = memory_need(spec, loaded, contexts[-1], kv_types[-1], batch)
    raise ValueError(f"nothing fits --max-memory {budget / MB:.0f} MB: the smallest fit needs {smallest.summary()}; "
                     f"raise --max-memory to {math.ceil(smallest.total / MB)}MB or use a smaller package "
                     f"(--quant int4)")
