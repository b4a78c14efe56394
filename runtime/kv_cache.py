"""KV cache: one buffer per layer allocated once at max length, updated in place by the graph.

Per-sequence offsets say how many positions are valid; rolling back after rejected draft
tokens only moves an offset, the next step overwrites the stale rows.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .manifest import ModelSpec


class KVCache:
    """Key/value buffers [batch, kv_heads, max_len, head_dim] per layer plus per-row offsets."""

    def __init__(self, spec: ModelSpec, num_layers: int, batch: int, max_len: int, ort_device: str = "cpu"):
        self.batch, self.max_len = batch, max_len
        # one scratch slot past max_len: finished rows keep re-writing it while others decode
        shape = [batch, spec.num_kv_heads, max_len + 1, spec.head_dim]
        alloc = lambda: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, ort_device, 0)  # noqa: E731
        self.keys = [alloc() for _ in range(num_layers)]
        self.values = [alloc() for _ in range(num_layers)]
        self.lengths = np.zeros(batch, dtype=np.int32)
        self._layer_bytes = int(np.prod(shape)) * 4

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
