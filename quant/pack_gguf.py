"""Pack quantized tensors into GGUF/ggml block layouts (for a GGUF writer), in numpy.

| GGML type | our format                    | bytes per block (elements)                     |
|-----------|-------------------------------|------------------------------------------------|
| Q8_0      | int8_block, block 32, fp16    | d:f16, qs:int8[32]                     34 (32) |
| Q4_0      | int4_sym, block 32, fp16      | d:f16, qs:u8[16] (j | j+16 << 4)       18 (32) |
| Q4_1      | int4_min, block 32, fp16      | d:f16, m:f16, qs:u8[16]                20 (32) |
| TQ2_0     | ternary, block 256, fp16      | qs:u8[64] (2-bit, 4 per byte), d:f16   66 (256)|
| TQ1_0     | ternary, block 256, fp16      | qs:u8[48] + qh:u8[4] (base 3), d:f16   54 (256)|

Each packer takes the codes as they are (round-to-nearest or GPTQ), so `gguf.quants.dequantize`
of the bytes equals `QuantizedTensor.dequantize()` exactly (checked in tests/test_quant.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

from .base import QuantFormat, QuantizedTensor

_BLOCK = {"Q8_0": ("int8_block", 32), "Q4_0": ("int4_sym", 32), "Q4_1": ("int4_min", 32),
          "TQ2_0": ("ternary", 256), "TQ1_0": ("ternary", 256)}


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 [n, 1] holding float16 values -> their 2 bytes each [n, 2]."""
    return a.astype(np.float16).view(np.uint8).reshape(a.shape[0], 2)


def _q8_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    return np.concatenate([_f16(d), codes.astype(np.int8).view(np.uint8)], axis=1)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, 32] codes in 0..15 -> [n, 16] bytes: element j in the low nibble, j + 16 in the high one."""
    return codes[:, :16] | (codes[:, 16:] << np.uint8(4))


def _q4_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    return np.concatenate([_f16(d), _nibbles((codes.astype(np.int16) + 8).astype(np.uint8))], axis=1)


def _q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    return np.concatenate([_f16(d), _f16(m), _nibbles(codes.astype(np.uint8))], axis=1)


def _tq2_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    # two chunks of 128: byte j of a chunk holds elements j, j+32, j+64, j+96 at bits 0, 2, 4, 6
    q = (codes.astype(np.int8) + 1).astype(np.uint8).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return np.concatenate([packed.reshape(-1, 64), _f16(d)], axis=1)


def _base3(q: np.ndarray, digits: int) -> np.ndarray:
    """[n, digits, width] trits -> [n, width] bytes: a base-3 number scaled to 0..255 (rounded up)."""
    weights = (3 ** np.arange(digits - 1, -1, -1, dtype=np.uint16))[None, :, None]
    if digits == 4:
        weights = weights * 3  # qh holds 4 trits in the top digits of 5
    value = (q.astype(np.uint16) * weights).sum(axis=1)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _tq1_0(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    # 256 trits: 160 as 5 x 32 (32 bytes), 80 as 5 x 16 (16 bytes), 16 as 4 x 4 (4 bytes qh)
    q = (codes.astype(np.int8) + 1).astype(np.uint8)
    n = q.shape[0]
    qs0 = _base3(q[:, :160].reshape(n, 5, 32), 5)
    qs1 = _base3(q[:, 160:240].reshape(n, 5, 16), 5)
    qh = _base3(q[:, 240:].reshape(n, 4, 4), 4)
    return np.concatenate([qs0, qs1, qh, _f16(d)], axis=1)


_PACKERS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]] = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "TQ2_0": _tq2_0, "TQ1_0": _tq1_0}


def gguf_types_of(fmt: QuantFormat) -> list[str]:
    """GGML types whose blocks hold format `fmt` exactly (empty when none does)."""
    if fmt.scale_dtype != "float16":
        return []
    return [t for t, (name, block) in _BLOCK.items() if fmt.name == name and fmt.block_size == block]


def gguf_formats() -> str:
    """The formats a GGUF can hold, for error messages."""
    return ", ".join(f"{name} block {block} float16 scales ({t})" for t, (name, block) in _BLOCK.items())


def gguf_type_for(fmt: QuantFormat, shape: tuple[int, ...], name: str = "tensor", prefer: str | None = None) -> str:
    """The GGML type that stores tensor `name` of `shape` in format `fmt` exactly.

    Args:
        prefer: the type to use when several hold the format (ternary: TQ2_0, the default, or TQ1_0).
    Raises:
        ValueError: no GGML type holds the format, rows are not a whole number of blocks, or
            `prefer` is not one of the types that hold it.
    """
    types = gguf_types_of(fmt)
    if not types:
        raise ValueError(f"{name}: no GGUF type holds {fmt.describe()} (scales {fmt.scale_dtype}); "
                         f"GGUF holds {gguf_formats()}")
    if len(shape) != 2 or shape[1] % fmt.block_size:
        raise ValueError(f"{name} {tuple(shape)}: GGUF {types[0]} needs rows that are a multiple of "
                         f"{fmt.block_size} elements")
    if prefer is not None and prefer not in types:
        raise ValueError(f"{name}: gguf_type {prefer!r} does not hold {fmt.describe()}; use one of {types}")
    return prefer or types[0]  # ternary: TQ2_0 (listed first), llama.cpp's faster kernel


def gguf_types_for(qt: QuantizedTensor) -> list[str]:
    """GGML types that hold `qt` exactly (empty when none does)."""
    return gguf_types_of(qt.fmt) if qt.shape[1] % qt.block_size == 0 else []


def pack_gguf(qt: QuantizedTensor, ggml_type: str) -> tuple[GGMLQuantizationType, np.ndarray]:
    """Bytes of `qt` in ggml block layout.

    Args:
        qt: a quantized tensor [out, in] in a format listed in this module's table.
        ggml_type: "Q8_0", "Q4_0", "Q4_1", "TQ1_0" or "TQ2_0".
    Returns:
        (the GGML type, uint8 array [out, in / block * bytes_per_block]) for a GGUF writer.
    Raises:
        ValueError: unknown type, or a tensor that type cannot hold exactly (wrong format, block
            size, scale dtype, or rows that are not a whole number of blocks).
    """
    if ggml_type not in _BLOCK:
        raise ValueError(f"unsupported GGML type {ggml_type!r}; numpy packers exist for {', '.join(_BLOCK)}")
    name, block = _BLOCK[ggml_type]
    fmt = qt.fmt
    if fmt.name != name or fmt.block_size != block or fmt.scale_dtype != "float16":
        raise ValueError(f"{ggml_type} holds {name}(b{block}) with float16 scales, not {fmt.describe()} "
                         f"(scales {fmt.scale_dtype}); quantize with format {name!r}, block_size {block}")
    out, k = qt.shape
    if k % block:
        raise ValueError(f"{ggml_type} needs rows that are a multiple of {block} elements; this tensor "
                         f"has {k} (shape {qt.shape}); keep it in another type such as Q8_0 or F16")
    codes = qt.codes.reshape(-1, block)
    scales = qt.scales.reshape(-1, 1)
    offsets = None if qt.offsets is None else qt.offsets.reshape(-1, 1)
    data = _PACKERS[ggml_type](codes, scales, offsets)
    return GGMLQuantizationType[ggml_type], data.reshape(out, -1)
