"""Where an engine's memory goes: weights, KV cache, runtime, activations, and the process itself.

Figures are resident bytes (RSS) from the operating system, split by when they appeared: before
the engine loaded (the interpreter and libraries), while it loaded (weights and the runtime's own
structures), and since (KV cache and activation buffers). The parts add up to the process's RSS.
"""
from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

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
        kv_cache: bytes of the KV cache allocated now (it grows with the context used).
        runtime: what loading added beyond the weights (onnxruntime's pre-packed weight layouts,
            graph structures, the tokenizer; llama.cpp's buffers); negative when weights are
            memory-mapped and not all resident.
        activations: what decoding added since loading beyond the KV cache (activation buffers).
        process: the interpreter and libraries before the engine loaded.
        rss: the process's resident bytes now; the sum of the parts above.
    """

    weights: int
    kv_cache: int
    runtime: int
    activations: int
    process: int
    rss: int

    def summary(self) -> str:
        """One line, in MB."""
        return (f"weights {self.weights / MB:.0f} MB + KV cache {self.kv_cache / MB:.0f} MB + runtime "
                f"{self.runtime / MB:.0f} MB + activations {self.activations / MB:.0f} MB + Python and "
                f"libraries {self.process / MB:.0f} MB = {self.rss / MB:.0f} MB resident")


class MemoryMeter:
    """Measures an engine's memory: create it before loading, call `loaded` after, `use` any time."""

    def __init__(self) -> None:
        self.before = process_rss()
        self.after_load = self.before
        self.weights = 0

    def loaded(self, weight_bytes: int) -> None:
        self.after_load, self.weights = process_rss(), weight_bytes

    def use(self, kv_bytes: int) -> MemoryUse:
        rss = process_rss()
        runtime = self.after_load - self.before - self.weights
        activations = rss - self.after_load - kv_bytes
        return MemoryUse(self.weights, kv_bytes, runtime, activations, self.before, rss)


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
