"""KV cache: one buffer per layer allocated once at max length, updated in place by the graph.

Per-sequence offsets say how many positions are valid; rolling back after rejected draft
tokens only moves an offset, the next step overwrites the stale rows.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import ModelSpec


class KVCache:
    """Key/value buffers [batch, kv_heads, max_len + 1, head_dim] per layer plus per-row offsets.

    The buffers are numpy arrays in host memory, wrapped (not copied) by OrtValues, so one row can
    also be bound on its own (`row`) without copying. They stay on the host for every provider:
    GroupQueryAttention, their only reader and writer, runs on onnxruntime's CPU kernel for these
    float32 graphs (the CUDA kernel takes fp16/bf16 only), so a CUDA-side cache would be copied
    both ways at every step, which costs more than it saves (README, "Design notes: runtime").
    """

    def __init__(self, spec: ModelSpec, num_layers: int, batch: int, max_len: int,
                 _arrays: tuple[list, list] | None = None, _lengths: np.ndarray | None = None):
        self.batch, self.max_len = batch, max_len
        # one scratch slot past max_len: finished rows keep re-writing it while others decode
        shape = [batch, spec.num_kv_heads, max_len + 1, spec.head_dim]
        self.arrays = _arrays if _arrays is not None else (
            [np.zeros(shape, np.float32) for _ in range(num_layers)],
            [np.zeros(shape, np.float32) for _ in range(num_layers)])
        self.keys = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays[0]]
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in self.arrays[1]]
        self.lengths = np.zeros(batch, dtype=np.int32) if _lengths is None else _lengths
        self._layer_bytes = int(np.prod(shape)) * 4
        self._spec, self._rows = spec, {}

    @property
    def nbytes(self) -> int:
        return 2 * len(self.keys) * self._layer_bytes

    def reset(self) -> None:
        self.lengths[:] = 0

    def advance(self, counts: np.ndarray) -> None:
        """Mark `counts[b]` new positions of row b as valid."""
        self.lengths += counts.astype(np.int32)

    def rollback(self, lengths: np.ndarray) -> None:
        """Forget every position at or past `lengths[b]` (e.g. rejected draft tokens)."""
        assert np.all(lengths <= self.lengths), "rollback can only shorten a sequence"
        self.lengths[:] = lengths

    def free(self) -> np.ndarray:
        """Positions still free per row."""
        return self.max_len - self.lengths

    def row(self, b: int) -> KVCache:
        """A batch-1 cache sharing row b's buffers and offset."""
        if b not in self._rows:
            arrays = ([a[b:b + 1] for a in self.arrays[0]], [a[b:b + 1] for a in self.arrays[1]])
            self._rows[b] = KVCache(self._spec, len(self.keys), 1, self.max_len, arrays, self.lengths[b:b + 1])
        return self._rows[b]
