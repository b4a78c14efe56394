"""KV caches: one buffer per layer, updated in place by the graph, grown on demand (`KVCache`,
for edge-run's own graphs); and the slots of a graph that concatenates past and present
(`SlotKVCache`, for generic exported graphs).

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
    past max_len, which padding positions of a finished row may write) plus `extra_slots`, which
    are always allocated past the positions reserved (a step-invariant graph writes one copied
    token's key/value past the step). `reserve(n)` grows the buffers so every row holds n
    positions; growing replaces the arrays and bumps `version`, so a backend that bound the old
    ones binds again.
    """

    def __init__(self, spec: ModelSpec, num_layers: int, batch: int, max_len: int, capacity: int | None = None,
                 extra_slots: int = 0):
        self.batch, self.max_len, self.extra_slots = batch, max_len, extra_slots
        self._spec, self._num_layers = spec, num_layers
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.version = 0
        self._rows: dict[int, KVCacheRow] = {}
        self._allocate(self._rounded(capacity or GROWTH))

    def _rounded(self, positions: int) -> int:
        return min(-(-(positions + self.extra_slots) // GROWTH) * GROWTH, self.max_len + 1 + self.extra_slots)

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
        if positions + self.extra_slots <= self.capacity:
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



class SlotKVCache(_Offsets):
    """KV cache of a graph that returns its past and the new keys/values concatenated (`present`),
    as optimum's exported decoders do: the present of one step is the past of the next, unchanged.

    Every step appends one slot per new token to all rows (a row with fewer new tokens gets padding
    slots), so a row's positions can lie anywhere in the slot axis: `slot_positions[b, t]` is the
    position slot t holds for row b, or -1 for padding and rolled-back slots, and the graph's
    attention mask hides those. Rollback marks slots free (no key/value is copied); when free slots
    pile up (`SLACK`), or the next step would pass max_len + 1 slots, the valid slots are packed to
    the front (one copy of the cache). Positions are passed to the graph explicitly, so the holes do
    not shift them.
    """

    SLACK = 64  # free slots tolerated before packing

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, batch: int, max_len: int,
                 dtype: str = "float32"):
        self.batch, self.max_len = batch, max_len
        self._num_layers, self._row_shape, self._dtype = num_layers, (kv_heads, head_dim), np.dtype(dtype)
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence and drop the buffers."""
        self.lengths[:] = 0
        self.arrays = [self._empty(self.batch, 0)] * (2 * self._num_layers)  # keys, values per layer
        self.slot_positions = np.full((self.batch, 0), -1, dtype=np.int32)

    def _empty(self, batch: int, slots: int) -> np.ndarray:
        return np.zeros((batch, self._row_shape[0], slots, self._row_shape[1]), self._dtype)

    @property
    def slots(self) -> int:
        """Slots held now (valid, padding and rolled back)."""
        return self.slot_positions.shape[1]

    def rollback(self, lengths: np.ndarray) -> None:
        """Forget every position at or past `lengths[b]`: their slots are marked free."""
        super().rollback(lengths)
        self.slot_positions[self.slot_positions >= self.lengths[:, None]] = -1

    def step_inputs(self, counts: np.ndarray, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """Position ids [B, seq] and attention mask [B, slots + seq] (int64) of a step that appends
        `seq` tokens per row, `counts[b]` of them real (right-padded).

        A padding token takes its row's last real position and may see every slot before it (so its
        softmax is never empty); real tokens never see it, being earlier in causal order.

        Raises:
            ValueError: a row would pass max_len positions.
        """
        counts = np.asarray(counts, dtype=np.int64)
        longest = int((self.lengths + counts).max())
        if longest > self.max_len + 1:
            raise ValueError(f"sequence of {longest} tokens exceeds the cache ({self.max_len}); raise max_context")
        if self.slots - int(self.lengths.max()) >= self.SLACK or self.slots + seq > self.max_len + 1 + self.SLACK:
            self.pack()
        offsets = np.minimum(np.arange(seq)[None, :], np.maximum(counts - 1, 0)[:, None])
        positions = np.minimum(self.lengths[:, None] + offsets, max(self.max_len - 1, 0)).astype(np.int64)
        mask = np.concatenate([self.slot_positions >= 0, np.ones((self.batch, seq), bool)], axis=1)
        return positions, mask.astype(np.int64)

    def append(self, presents: list[np.ndarray], counts: np.ndarray) -> None:
        """Take a step's presents (keys, values per layer: [B, heads, slots + seq, head_dim]) as the
        cache and mark the first `counts[b]` new slots of row b valid."""
        seq = presents[0].shape[2] - self.slots
        new = np.arange(seq, dtype=np.int32)[None, :]
        positions = np.where(new < np.asarray(counts)[:, None], self.lengths[:, None] + new, -1).astype(np.int32)
        self.arrays = list(presents)
        self.slot_positions = np.concatenate([self.slot_positions, positions], axis=1)
        self.advance(np.asarray(counts))

    def pack(self) -> None:
        """Move every row's valid slots to the front, in position order, and drop the rest."""
        keep = int(self.lengths.max())
        order = np.argsort(np.where(self.slot_positions >= 0, self.slot_positions, np.iinfo(np.int32).max),
                           axis=1, kind="stable")[:, :keep]
        positions = np.take_along_axis(self.slot_positions, order, axis=1)
        index = order[:, None, :, None]
        self.arrays = [np.take_along_axis(a, index, axis=2) for a in self.arrays]
        self.slot_positions = positions

    def _rows(self, row: int, n: int) -> np.ndarray:
        """Slots of `row` holding positions 0..n-1, in position order."""
        slots = np.flatnonzero((self.slot_positions[row] >= 0) & (self.slot_positions[row] < n))
        return slots[np.argsort(self.slot_positions[row, slots])]

    @property
    def nbytes(self) -> int:
        """Bytes held now (keys and values of every layer, every slot)."""
        return sum(a.nbytes for a in self.arrays)

    def bytes_per_position(self) -> int:
        """KV bytes one position of one row takes (all layers, keys and values)."""
        return 2 * self._num_layers * self._row_shape[0] * self._row_shape[1] * self._dtype.itemsize

    def free(self) -> np.ndarray:
        """Positions still free per row."""
        return self.max_len - self.lengths

    def save_row(self, row: int, n: int) -> list[np.ndarray]:
        """A copy of positions 0..n-1 of `row` (per layer and side: [heads, n, head_dim])."""
        slots = self._rows(row, n)
        return [a[row][:, slots] for a in self.arrays]  # fancy indexing copies

    def load_row(self, saved: list[np.ndarray], dst: int, n: int) -> None:
        """Make the first n positions of a `save_row` copy row dst's contents (in n new slots)."""
        self.slot_positions[dst] = -1
        self.lengths[dst] = n
        if n == 0:
            return
        self.arrays = [np.concatenate([a, self._empty(self.batch, n)], axis=2) for a in self.arrays]
        for a, s in zip(self.arrays, saved):
            a[dst, :, -n:] = s[:, :n]
        positions = np.full((self.batch, n), -1, dtype=np.int32)
        positions[dst] = np.arange(n)
        self.slot_positions = np.concatenate([self.slot_positions, positions], axis=1)

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Copy the first n positions of row src into row dst and make them dst's contents."""
        self.load_row(self.save_row(src, n), dst, n)
