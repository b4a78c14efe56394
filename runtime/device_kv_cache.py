"""KV cache in an execution provider's memory: GPU-resident decoding, written against a device name.

The buffers are onnxruntime OrtValues allocated on `device` ("cuda" on the CUDA provider; "cpu"
runs the same code on the CPU provider, which is how the tests exercise it). The backend binds
them once by address, with past and present of a layer on the same buffer (GroupQueryAttention's
shared-buffer mode), so a decode step moves no KV bytes between host and device. Rows are bound
by address too (row b of a [batch, kv_heads, capacity, head_dim] buffer is contiguous), so the
row-by-row steps of batched speculative verification copy nothing either.

What needs the contents on the host (prompt-cache save and restore) copies explicitly through a
one-node Identity session on the same provider and counts each tensor moved in `host_copies`;
moving a row to another row (`copy_row`) stays on the device.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .kv_cache import _Offsets
from .manifest import ModelSpec


@dataclass(frozen=True)
class DeviceSpan:
    """One contiguous tensor in `device` memory, bound to a session by its address (never copied).

    Attributes:
        device: OrtValue device type ("cpu", "cuda").
        device_id: the device's index.
        dtype: element type.
        shape: the tensor's shape.
        ptr: address of its first element.
    """

    device: str
    device_id: int
    dtype: np.dtype
    shape: tuple[int, ...]
    ptr: int

    def bind_input(self, io: ort.IOBinding, name: str) -> None:
        io.bind_input(name, self.device, self.device_id, self.dtype, list(self.shape), self.ptr)

    def bind_output(self, io: ort.IOBinding, name: str) -> None:
        io.bind_output(name, self.device, self.device_id, self.dtype, list(self.shape), self.ptr)


def identity_model(dtype: np.dtype) -> bytes:
    """A one-node ONNX graph y = Identity(x) of any shape, for copies on a provider."""
    from onnx import helper

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "edgerun_copy",
                              [helper.make_tensor_value_info("x", elem, None)],
                              [helper.make_tensor_value_info("y", elem, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what onnxruntime releases of the last two years load
    return model.SerializeToString()


class SpanCopier:
    """Copies between DeviceSpans, and between a span and host memory, with an Identity session.

    Args:
        open_session: makes an InferenceSession of a serialized model on the cache's provider
            (the same one the stage graphs run on, so the copy runs on that device).
        dtype: element type of the tensors copied.
    """

    def __init__(self, open_session: Callable[[bytes], ort.InferenceSession], dtype: np.dtype):
        self.session = open_session(identity_model(dtype))
        self.io = self.session.io_binding()

    def device_to_device(self, src: DeviceSpan, dst: DeviceSpan) -> None:
        assert src.shape == dst.shape and src.dtype == dst.dtype
        src.bind_input(self.io, "x")
        dst.bind_output(self.io, "y")
        self.session.run_with_iobinding(self.io)

    def to_host(self, src: DeviceSpan) -> np.ndarray:
        """A host copy of `src`."""
        src.bind_input(self.io, "x")
        self.io.bind_output("y", "cpu")  # onnxruntime allocates it and copies device -> host
        self.session.run_with_iobinding(self.io)
        return self.io.get_outputs()[0].numpy()

    def from_host(self, values: np.ndarray, dst: DeviceSpan) -> None:
        """Write host array `values` (dst's shape and type) into `dst`."""
        assert values.shape == dst.shape and values.dtype == dst.dtype
        self.io.bind_cpu_input("x", np.ascontiguousarray(values))  # copied host -> device when bound
        dst.bind_output(self.io, "y")
        self.session.run_with_iobinding(self.io)


class DeviceKVCache(_Offsets):
    """Key/value buffers [batch, kv_heads, max_len + 1 + extra_slots, head_dim] per layer in `device` memory.

    Allocated once at full length (one scratch slot past max_len, which padding positions of a
    finished row may write, and `extra_slots` as kv_cache.KVCache) and zeroed; it never grows,
    since growing would copy device memory.
    Rollback moves `lengths` only. Same interface as kv_cache.KVCache, except that `keys` and
    `values` are DeviceSpans and row contents reach the host only through `save_row`.

    Args:
        spec: the model (KV heads, head size, KV float type).
        num_layers: layers with a KV cache.
        batch, max_len: rows and positions per row.
        device, device_id: where the buffers live (an OrtValue device type: "cuda", "cpu").
        copier: copies on that device (see SpanCopier).
    Raises:
        RuntimeError: onnxruntime cannot allocate the buffers on `device`.
    """

    def __init__(self, spec: ModelSpec, num_layers: int, batch: int, max_len: int, device: str,
                 device_id: int, copier: SpanCopier, extra_slots: int = 0):
        self.batch, self.max_len, self.capacity = batch, max_len, max_len + 1 + extra_slots
        self.kv_device, self.device_id, self.copier = device, device_id, copier
        self.dtype = np.dtype(spec.kv_dtype)
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.version = 1  # the buffers never change, so a binding of them stays valid
        self.host_copies = 0  # KV tensors moved between host and device (save_row, load_row)
        self._spec, self._num_layers = spec, num_layers
        shape = [batch, spec.num_kv_heads, self.capacity, spec.head_dim]
        zeros = np.zeros(shape, self.dtype)  # once at allocation: the provider's memory is not cleared
        self._owned = []
        for _ in range(2 * num_layers):
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, device, device_id)
            value.update_inplace(zeros)
            self._owned.append(value)
        self._row_shape = (1, *shape[1:])
        self._row_bytes = int(np.prod(self._row_shape)) * self.dtype.itemsize
        self.keys = [self._span(v, None) for v in self._owned[:num_layers]]
        self.values = [self._span(v, None) for v in self._owned[num_layers:]]
        self._rows: dict[int, DeviceKVCacheRow] = {}

    def _span(self, value: ort.OrtValue, row: int | None) -> DeviceSpan:
        if row is None:
            return DeviceSpan(self.kv_device, self.device_id, self.dtype, tuple(value.shape()), value.data_ptr())
        return DeviceSpan(self.kv_device, self.device_id, self.dtype, self._row_shape,
                          value.data_ptr() + row * self._row_bytes)

    def row_spans(self, row: int) -> tuple[list[DeviceSpan], list[DeviceSpan]]:
        """Keys and values of one row as [1, kv_heads, capacity, head_dim] spans (no copy)."""
        n = self._num_layers
        return ([self._span(v, row) for v in self._owned[:n]], [self._span(v, row) for v in self._owned[n:]])

    def reserve(self, positions: int) -> None:
        """Check that `positions` positions per row fit (the buffers are allocated at full length).

        Raises:
            ValueError: more than max_len + 1 positions.
        """
        if positions > self.max_len + 1:
            raise ValueError(f"sequence of {positions} tokens exceeds the cache ({self.max_len}); raise max_context")

    @property
    def nbytes(self) -> int:
        """Bytes allocated on the device (keys and values of every layer)."""
        return 2 * self._num_layers * self.batch * self._row_bytes

    def bytes_per_position(self) -> int:
        """KV bytes one position of one row takes (all layers, keys and values)."""
        return 2 * self._num_layers * self._spec.num_kv_heads * self._spec.head_dim * self._spec.kv_itemsize

    def free(self) -> np.ndarray:
        """Positions still free per row."""
        return self.max_len - self.lengths

    def row(self, b: int) -> DeviceKVCacheRow:
        """A batch-1 view of row b: its buffers by address and its offset."""
        if b not in self._rows:
            self._rows[b] = DeviceKVCacheRow(self, b)
        return self._rows[b]

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Make the first n positions of row src row dst's contents (a copy on the device)."""
        self.reserve(n)
        for value in self._owned:
            self.copier.device_to_device(self._span(value, src), self._span(value, dst))
        self.lengths[dst] = n

    def save_row(self, row: int, n: int) -> list[np.ndarray]:
        """A host copy of the first n positions of `row` (per layer: keys, then values; each
        [kv_heads, n, head_dim]). Counted in `host_copies`."""
        saved = [self.copier.to_host(self._span(value, row))[0, :, :n].copy() for value in self._owned]
        self.host_copies += len(saved)
        return saved

    def load_row(self, saved: list[np.ndarray], dst: int, n: int) -> None:
        """Write the first n positions of a `save_row` copy into row dst and make them its contents.
        Counted in `host_copies`."""
        self.reserve(n)
        host = np.zeros(self._row_shape, self.dtype)
        for value, part in zip(self._owned, saved):
            host[0, :, :n] = part[:, :n]
            self.copier.from_host(host, self._span(value, dst))
        self.host_copies += len(saved)
        self.lengths[dst] = n


class DeviceKVCacheRow(_Offsets):
    """Row b of a DeviceKVCache as a batch-1 cache: its buffers by address, its offset shared."""

    batch = 1

    def __init__(self, parent: DeviceKVCache, b: int):
        self.parent, self.b = parent, b
        self.max_len, self.capacity, self.version = parent.max_len, parent.capacity, parent.version
        self.kv_device = parent.kv_device
        self.lengths = parent.lengths[b:b + 1]  # a view: offsets move together
        self.keys, self.values = parent.row_spans(b)

    @property
    def nbytes(self) -> int:
        return self.parent.nbytes // self.parent.batch

    def reserve(self, positions: int) -> None:
        self.parent.reserve(positions)
