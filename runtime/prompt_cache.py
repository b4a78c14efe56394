"""Prompt cache: a new request reuses the KV of an earlier sequence that shares its prefix.

Sources are the rows of the scheduler's KV cache (running sequences, and finished ones whose row
has not been taken since) and copies of finished sequences kept in host memory, up to a byte
budget, least recently used evicted first. Reuse copies the prefix's keys and values into the
request's row; nothing is recomputed.
"""
from __future__ import annotations

import collections
import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MIN_MATCH = 4  # shorter shared prefixes are recomputed (the copy is not worth the bookkeeping)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class _CacheRows:
    """Row operations of a cache that has them itself (kv_cache.KVCache: numpy buffers)."""

    def __init__(self, cache):
        self.copy, self.save, self.load = cache.copy_row, cache.save_row, cache.load_row


class _LlamaSequences:
    """Row operations on a llama.cpp context (one sequence per row, a KV stream each)."""

    def __init__(self, cache):
        import llama_cpp  # this adapter runs only for llama.cpp caches

        self.llc, self.cache = llama_cpp, cache

    def _truncate(self, row: int, n: int) -> None:
        lengths = self.cache.lengths.copy()
        lengths[row] = min(n, int(lengths[row]))
        self.cache.rollback(lengths)

    def copy(self, src: int, dst: int, n: int) -> None:
        # llama.cpp copies between streams only whole (the copy runs with the next decode), then
        # the tail past the prefix is dropped
        self.llc.llama_memory_seq_rm(self.cache.memory, dst, -1, -1)
        self.llc.llama_memory_seq_cp(self.cache.memory, src, dst, -1, -1)
        self.cache.lengths[dst] = self.cache.lengths[src]
        self._truncate(dst, n)

    def save(self, row: int, n: int) -> tuple[bytes, int]:
        self._truncate(row, n)
        size = self.llc.llama_state_seq_get_size(self.cache.ctx, row)
        buffer = (ctypes.c_uint8 * size)()
        written = self.llc.llama_state_seq_get_data(self.cache.ctx, buffer, size, row)
        return bytes(buffer[:written]), n

    def load(self, saved: tuple[bytes, int], dst: int, n: int) -> None:
        data, total = saved
        self.llc.llama_memory_seq_rm(self.cache.memory, dst, -1, -1)
        self.cache.lengths[dst] = 0
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if self.llc.llama_state_seq_set_data(self.cache.ctx, buffer, len(data), dst) == 0:
            raise RuntimeError(f"llama.cpp could not restore a cached prompt of {total} tokens into sequence {dst}")
        self.cache.lengths[dst] = total  # the whole saved sequence is back; keep its first n positions
        self._truncate(dst, n)


def _rows_of(cache):
    """The row operations for a KV cache (its own, or a llama.cpp context's)."""
    if all(hasattr(cache, name) for name in ("copy_row", "save_row", "load_row")):
        return _CacheRows(cache)
    if hasattr(cache, "ctx") and hasattr(cache, "memory"):
        return _LlamaSequences(cache)
    raise TypeError(f"the prompt cache cannot copy rows of a {type(cache).__name__}; pass prompt_cache_bytes=0")


@dataclass
class _Stored:
    tokens: list[int]
    saved: object
    nbytes: int


@dataclass
class PromptCacheStats:
    hits: int = 0  # requests that reused a prefix
    reused_tokens: int = 0
    stored: int = 0  # sequences in host memory now
    stored_bytes: int = 0
    evicted: int = 0


class PromptCache:
    """Finds the longest cached prefix of a prompt and puts it in the row the prompt will use.

    Args:
        cache: the scheduler's KV cache (rows).
        budget_bytes: host memory for copies of finished sequences (LRU); rows are free of charge.
        min_match: shortest prefix worth reusing.
    """

    def __init__(self, cache, budget_bytes: int, min_match: int = MIN_MATCH):
        self.cache, self.rows, self.budget, self.min_match = cache, _rows_of(cache), budget_bytes, min_match
        self.idle: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # free row -> its tokens
        self.store: collections.OrderedDict[int, _Stored] = collections.OrderedDict()  # least recent first
        self.stats = PromptCacheStats()
        self._next_key = 0

    def retire(self, row: int, tokens: list[int]) -> None:
        """A finished sequence left its row; its KV (of `tokens`) stays there until the row is taken."""
        self.idle.pop(row, None)
        if tokens:
            self.idle[row] = list(tokens)

    def place(self, prompt: list[int], free_rows: list[int], live: dict[int, list[int]]) -> tuple[int, int]:
        """Choose a free row for `prompt` and fill it with the longest cached prefix.

        Args:
            prompt: the new request's tokens.
            free_rows: rows no sequence runs in.
            live: running rows -> the tokens their KV holds.
        Returns:
            (row, reused): the row, holding KV for prompt[:reused] (at most len(prompt) - 1: the
            last prompt token is always run, for its logits).
        """
        limit = len(prompt) - 1
        best, kind, source = 0, None, None
        # ties go to an idle row (no copy), then a running row, then host memory
        for k, candidates in (("idle", self.idle.items()), ("live", live.items()),
                              ("stored", ((key, e.tokens) for key, e in self.store.items()))):
            for key, tokens in candidates:
                n = common_prefix(prompt, tokens, limit)
                if n > best:
                    best, kind, source = n, k, key
        if best < self.min_match:
            best, kind = 0, None
        if kind == "idle":
            row = source
        else:  # an empty free row, else the one left longest ago
            empty = [r for r in free_rows if r not in self.idle]
            row = empty[0] if empty else next(r for r in self.idle if r in free_rows)
        # a stored source leaves the store while the row is prepared: keeping the row's old sequence
        # may evict entries (or supersede them) to make room
        held = self._take(source) if kind == "stored" else None
        if row in self.idle:
            self._keep(row, self.idle.pop(row), best if kind == "idle" else 0)
        if kind == "live":
            self.rows.copy(source, row, best)
        elif held is not None:
            self.rows.load(held.saved, row, best)
            self._put(held)  # back, as the most recently used
        else:
            self._truncate(row, best)
        if best:
            self.stats.hits += 1
            self.stats.reused_tokens += best
        return row, best

    def _truncate(self, row: int, n: int) -> None:
        lengths = self.cache.lengths.copy()
        lengths[row] = min(n, int(lengths[row]))
        self.cache.rollback(lengths)

    def _keep(self, row: int, tokens: list[int], reused: int) -> None:
        """Copy an idle row's sequence to host memory before its row is overwritten (unless the new
        request keeps all of it, host memory holds it already, or it does not fit the budget)."""
        nbytes = len(tokens) * self._bytes_per_token()
        if len(tokens) <= reused or nbytes > self.budget or self._contains(tokens):
            return
        self._put(_Stored(tokens, self.rows.save(row, len(tokens)), nbytes))

    def _contains(self, tokens: list[int]) -> bool:
        """Host memory holds `tokens`, or a longer sequence starting with them."""
        return any(common_prefix(e.tokens, tokens, len(tokens)) == len(tokens) for e in self.store.values())

    def _put(self, entry: _Stored) -> None:
        """Store `entry` as the most recently used, dropping the sequences it extends and, least
        recently used first, whatever exceeds the budget."""
        if entry.nbytes > self.budget or self._contains(entry.tokens):
            return
        n = len(entry.tokens)
        for key in [k for k, e in self.store.items() if common_prefix(e.tokens, entry.tokens, n) == len(e.tokens)]:
            self._take(key)
        while self.store and self.stats.stored_bytes + entry.nbytes > self.budget:
            self._take(next(iter(self.store)))
            self.stats.evicted += 1
        self.store[self._next_key] = entry
        self._next_key += 1
        self.stats.stored += 1
        self.stats.stored_bytes += entry.nbytes

    def _take(self, key: int) -> _Stored:
        """Remove an entry from host memory and return it."""
        entry = self.store.pop(key)
        self.stats.stored -= 1
        self.stats.stored_bytes -= entry.nbytes
        return entry

    def _bytes_per_token(self) -> int:
        if hasattr(self.cache, "bytes_per_position"):
            return self.cache.bytes_per_position()
        return max(1, self.cache.nbytes // max(1, self.cache.batch * self.cache.max_len))
