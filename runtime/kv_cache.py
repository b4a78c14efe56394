"""KV cache: one buffer per layer, updated in place by the graph, grown on demand.

Per-sequence offsets say how many positions are valid; rolling back after rejected draft
tokens only moves an offset, the next step overwrites the stale rows. The buffers start small and
grow (in steps of `GROWTH` positions, up to the cache's `max_len`) as sequences get longer, so
memory follows the context actually used rather than the largest one allowed.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import ModelSpec

GROWTH = 256  # positions added per growth step


class _Offsets:
    """Valid positions per row (`lengths`); moving them never copies cache contents."""

    lengths: np.ndarray

    def reset(self) -> None:
        self.lengths[:] = 0

    def advance(self, counts: np.ndarray) -> None:
        """Mark `counts[b]` new positions of row b as valid."""
        self.lengths += counts.astype(np.int32)

    def rollback(self, lengths: np.ndarray) -> None:
        """Forget every position at or past `lengths[b]` (e.g. rejected draft tokens)."""
        assert np.all(lengths <= self.lengths), "rollback can only shorten a sequence"
        self.lengths[:] = lengths


class KVCache(_Offsets):
    """Key/value buffers [batch, kv_heads, capacity, head_dim] per layer plus per-row offsets.

    The buffers are numpy arrays in host memory, wrapped (not copied) by OrtValues, so one row can
    also be bound on its own (`row`) without copying. They stay on the host for every provider:
    GroupQueryAttention, their only reader and writer, runs on onnxruntime's CPU kernel for these
    float32 graphs (the CUDA kernel takes fp16/bf16 only).

    `capacity` is the number of positions allocated now: at most `max_len + 1` (one scratch slot
    past max_len, which padding positions of a finished row may write). `reserve(n)` grows the
    buffers so every row holds n positions; growing replaces the arrays and bumps `version`, so a
    backend that bound the old ones binds again.
    """

    def __init__(self, spec: ModelSpec, num_layers: int, batch: int, max_len: int, capacity: int | None = None):
        self.batch, self.max_len = batch, max_len
        self._spec, self._num_layers = spec, num_layers
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.version = 0
        self._rows: dict[int, KVCacheRow] = {}
        self._allocate(self._rounded(capacity or GROWTH))

    def _rounded(self, positions: int) -> int:
        return min(-(-positions // GROWTH) * GROWTH, self.max_len + 1)

    def _allocate(self, capacity: int, keep: int = 0) -> None:
        shape = [self.batch, self._spec.num_kv_heads, capacity, self._spec.head_dim]
        old = getattr(self, "arrays", None)
        dtype = np.dtype(self._spec.kv_dtype)
        arrays = ([np.zeros(shape, dtype) for _ in range(self._num_layers)],
                  [np.zeros(shape, dtype) for _ in range(self._num_layers)])
        if old is not None and keep:
            for new_side, old_side in zip(arrays, old):
                for new, prev in zip(new_side, old_side):
                    new[:, :, :keep] = prev[:, :, :keep]
        self.arrays, self.capacity = arrays, capacity
        self.keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays[0]]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays[1]]
        self.version += 1

    def reserve(self, positions: int) -> None:
        """Make room for `positions` positions per row (valid contents are kept).

        Raises:
            ValueError: more than max_len + 1 positions.
        """
        if positions <= self.capacity:
            return
        if positions > self.max_len + 1:
            raise ValueError(f"sequence of {positions} tokens exceeds the cache ({self.max_len}); raise max_context")
        self._allocate(self._rounded(positions), keep=int(self.lengths.max()))

    @property
    def nbytes(self) -> int:
        """Bytes allocated now (keys and values of every layer)."""
        return sum(a.nbytes for side in self.arrays for a in side)

    def bytes_per_position(self) -> int:
        """KV bytes one position of one row takes (all layers, keys and values)."""
        return 2 * self._num_layers * self._spec.num_kv_heads * self._spec.head_dim * self._spec.kv_itemsize

    def free(self) -> np.ndarray:
        """Positions still free per row."""
        return self.max_len - self.lengths

    def row(self, b: int) -> KVCacheRow:
        """A batch-1 view of row b: its buffers and offset, following the cache when it grows."""
        if b not in self._rows:
            self._rows[b] = KVCacheRow(self, b)
        return self._rows[b]

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of row src into row dst and make them dst's contents."""
        self.reserve(n)
        for side in self.arrays:
            for a in side:
                a[dst, :, :n] = a[src, :, :n]
        self.lengths[dst] = n

    def save_row(self, row: int, n: int) -> list[np.ndarray]:
        """A copy of the first n positions of `row` (per layer: keys, then values)."""
        return [a[row, :, :n].copy() for side in self.arrays for a in side]

    def load_row(self, saved: list[np.ndarray], dst: int, n: int) -> None:
        """Write the first n positions of a `save_row` copy into row dst and make them its contents."""
        self.reserve(n)
        for a, s in zip((a for side in self.arrays for a in side), saved):
            a[dst, :, :n] = s[:, :n]
        self.lengths[dst] = n


class KVCacheRow(_Offsets):
    """Row b of a KVCache as a batch-1 cache: shares its buffers (re-sliced when they grow) and its offset."""

    batch = 1

    def __init__(self, parent: KVCache, b: int):
        self.parent, self.b = parent, b
        self.max_len = parent.max_len
        self.lengths = parent.lengths[b:b + 1]  # a view: offsets move together
        self._seen = -1

    def _sync(self) -> None:
        if self._seen != self.parent.version:
            b = self.b
            self.arrays = ([a[b:b + 1] for a in self.parent.arrays[0]], [a[b:b + 1] for a in self.parent.arrays[1]])
            self._keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays[0]]
            self._values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays[1]]
            self._seen = self.parent.version

    @property
    def keys(self) -> list:
        self._sync()
        return self._keys

    @property
    def values(self) -> list:
        self._sync()
        return self._values

    @property
    def version(self) -> int:
        return self.parent.version

    @property
    def capacity(self) -> int:
        return self.parent.capacity

    @property
    def nbytes(self) -> int:
        return self.parent.nbytes // self.parent.batch

    def reserve(self, positions: int) -> None:
        self.parent.reserve(positions)

