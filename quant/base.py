"""Numeric quantization formats: the shared base, the registry and the quantized tensor.

A format turns blocks of a float matrix [out, in] (blocks run along `in`, the reduction axis)
into integer codes plus a scale (and, for asymmetric formats, an offset) per block. Each format
class implements only three block-level functions:

    params(blocks)              -> BlockParams  (scale/offset per block, reducing the last axis)
    encode(x, params)           -> integer codes
    decode(codes, scale, offset) -> float32 values

The base does the rest: checks, splitting rows into blocks, the ragged last block (computed on
the real elements only; its codes are padded to the block size), scale rounding, dequantization.
Packing codes into a target layout (ORT `MatMulNBits`, GGUF blocks) lives in `pack_ort` and
`pack_gguf`; nothing here knows about either.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

log = logging.getLogger(__name__)

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what ORT MatMulNBits and GGUF can hold; 0 = one block per row
SCALE_DTYPES = ("float16", "float32")


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero, exactly as C `roundf` (and ggml) does."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def safe_inverse(d: np.ndarray) -> np.ndarray:
    """1/d, with 0 where d == 0 (an all-zero block encodes to zero codes)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


@dataclass(frozen=True)
class BlockParams:
    """Per-block parameters, shaped [..., 1] so they broadcast over a block's elements.

    Attributes:
        scale: stored dequantization scale (already rounded to the format's scale dtype).
        offset: stored offset: an integer zero point (uint8) or a float minimum; None when symmetric.
        inv_scale: what `encode` multiplies by (ggml computes codes with the unrounded scale).
        enc_offset: what `encode` subtracts (ggml's Q4_1 uses the unrounded minimum).
    """

    scale: np.ndarray
    offset: np.ndarray | None = None
    inv_scale: np.ndarray | None = None
    enc_offset: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A matrix [out, in] in one numeric format.

    Attributes:
        fmt: the format instance that made it (knows how to decode).
        shape: the original float shape (out, in).
        codes: integer codes [out, n_blocks, block_size]; the last block is padded when `in`
            is not a multiple of the block size (padding decodes to 0 where the format can).
        scales: float32 [out, n_blocks], values exactly representable in fmt.scale_dtype.
        offsets: [out, n_blocks] zero points (uint8) or float32 minimums; None when symmetric.
        method: how the codes were chosen ("rtn" round-to-nearest, "gptq", ...).
    """

    fmt: QuantFormat
    shape: tuple[int, int]
    codes: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None
    method: str = "rtn"

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[2])

    @property
    def n_blocks(self) -> int:
        return int(self.codes.shape[1])

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [out, in] these codes stand for."""
        return self.fmt.dequantize(self)

    def bits_per_weight(self) -> float:
        """Storage cost of codes + scales + offsets in the format's own terms, per real weight."""
        out, k = self.shape
        return self.fmt.storage_bytes(self.shape) * 8 / (out * k)

    def describe(self) -> str:
        return f"{self.fmt.describe()}[{self.method}]"


class QuantFormat:
    """Base class of a numeric format; subclasses set the class attributes and the block math.

    Args:
        block_size: elements per block along the input axis (one of BLOCK_SIZES), 0 for one
            block per output row (per channel), None for the format's default.
        scale_dtype: "float16" (GGUF-compatible) or "float32"; None for the format's default.
    Raises:
        ValueError: a block size or scale dtype the format does not support.
    """

    name: ClassVar[str]
    bits: ClassVar[int]  # bits per code as packed (ternary packs as 2)
    qmin: ClassVar[int]
    qmax: ClassVar[int]
    offset_kind: ClassVar[str | None] = None  # None (symmetric), "int" (zero point) or "float" (minimum)
    default_block_size: ClassVar[int] = 32
    block_sizes: ClassVar[tuple[int, ...]] = BLOCK_SIZES + (0,)
    default_scale_dtype: ClassVar[str] = "float16"

    def __init__(self, block_size: int | None = None, scale_dtype: str | None = None):
        block_size = self.default_block_size if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
                or block_size not in self.block_sizes:
            allowed = ", ".join("0 (per channel)" if b == 0 else str(b) for b in self.block_sizes)
            raise ValueError(f"format {self.name!r} does not support block size {block_size!r}; "
                             f"use one of: {allowed}")
        scale_dtype = scale_dtype or self.default_scale_dtype
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale dtype {scale_dtype!r} is not supported; use one of {SCALE_DTYPES}")
        self.block_size = int(block_size)
        self.scale_dtype = scale_dtype

    # -- the block math each format implements -------------------------------------------------
    def params(self, blocks: np.ndarray) -> BlockParams:
        """Scale/offset of every block (reducing the last axis of float32 `blocks`)."""
        raise NotImplementedError

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        """Codes of values `x` under fixed block parameters `p` (broadcast against x)."""
        raise NotImplementedError

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        """float32 values of `codes` (scale/offset broadcast against codes)."""
        raise NotImplementedError

    def quantize_blocks(self, blocks: np.ndarray) -> tuple[np.ndarray, BlockParams]:
        """Round-to-nearest codes and parameters of `blocks`; formats may refine the scale."""
        p = self.params(blocks)
        return self.encode(blocks, p), p

    def pad_code(self, offset: np.ndarray | None) -> np.ndarray | int:
        """The code that fills the padding of a ragged last block (decodes to 0 where possible)."""
        return offset if self.offset_kind == "int" else 0

    # -- shared machinery ------------------------------------------------------------------------
    @property
    def code_dtype(self) -> type:
        return np.int8 if self.qmin < 0 else np.uint8

    def round_scale(self, scale: np.ndarray) -> np.ndarray:
        """Round scales to the storage dtype, returned as float32; rejects non-finite results."""
        with np.errstate(over="ignore"):  # an overflow is reported below, with the fix
            stored = scale.astype(np.float16).astype(np.float32) if self.scale_dtype == "float16" \
                else scale.astype(np.float32)
        if not np.isfinite(stored).all():
            raise ValueError(f"format {self.describe()}: a block scale overflows {self.scale_dtype} "
                             f"(weights up to {float(np.abs(scale).max()):.3g}); use scale_dtype float32")
        return stored

    def storage_bytes(self, shape: tuple[int, int]) -> float:
        """Bytes of codes + scales + offsets of a [out, in] matrix in this format (what
        `QuantizedTensor.bits_per_weight` counts), for budgeting before quantizing."""
        out, k = shape
        bs = self.block_size_for(k)
        scale_bits = 16 if self.scale_dtype == "float16" else 32
        offset_bits = {None: 0, "int": self.bits, "float": scale_bits}[self.offset_kind]
        return out * -(-k // bs) * (bs * self.bits + scale_bits + offset_bits) / 8

    def block_size_for(self, in_features: int) -> int:
        """The block length used for rows of `in_features` elements."""
        return self.block_size or in_features

    def check_shape(self, shape: tuple[int, ...], name: str = "tensor") -> None:
        """Raise ValueError when a tensor of `shape` cannot be quantized with this format."""
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"{name}: only 2-D matrices [out, in] can be quantized, got shape {tuple(shape)}")
        if self.block_size > shape[1]:
            fits = [str(b) for b in self.block_sizes if 0 < b <= shape[1]] + ["0 (per channel)"]
            raise ValueError(f"{name} {tuple(shape)}: block size {self.block_size} of {self.describe()} "
                             f"exceeds the row length {shape[1]}; use a block size of {', '.join(fits)}")

    def quantize(self, weight: np.ndarray, name: str = "tensor") -> QuantizedTensor:
        """Round-to-nearest quantization of a float matrix [out, in].

        Raises:
            ValueError: not a finite 2-D float matrix, or a block size that does not fit it.
        """
        w = np.asarray(weight)
        self.check_shape(w.shape, name)
        if not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"{name}: expected a float matrix, got dtype {w.dtype}")
        w = w.astype(np.float32, copy=False)
        if not np.isfinite(w).all():
            raise ValueError(f"{name}: holds NaN or infinite values; fix the checkpoint before quantizing")
        rows, k = w.shape
        bs = self.block_size_for(k)
        full, tail = divmod(k, bs)
        parts = []
        if full:
            parts.append(self.quantize_blocks(w[:, :full * bs].reshape(rows, full, bs)))
        if tail:
            parts.append(self.quantize_blocks(w[:, full * bs:].reshape(rows, 1, tail)))
        return self.assemble((rows, k), [c for c, _ in parts], [p for _, p in parts])

    def assemble(self, shape: tuple[int, int], codes: list[np.ndarray], params: list[BlockParams],
                 method: str = "rtn") -> QuantizedTensor:
        """Build a QuantizedTensor from code blocks [out, nb_i, len_i] and their parameters.

        All parts but the last hold full blocks; a shorter last part is padded with `pad_code`.
        """
        rows, k = shape
        bs = self.block_size_for(k)
        n_blocks = -(-k // bs)
        out = np.empty((rows, n_blocks, bs), dtype=self.code_dtype)
        scales = np.concatenate([p.scale.reshape(rows, -1) for p in params], axis=1)
        offsets = None
        if self.offset_kind is not None:
            offsets = np.concatenate([p.offset.reshape(rows, -1) for p in params], axis=1)
        at = 0
        for c in codes:
            nb, length = c.shape[1], c.shape[2]
            out[:, at:at + nb, :length] = c
            if length < bs:
                pad = self.pad_code(None if offsets is None else offsets[:, at:at + nb, None])
                out[:, at:at + nb, length:] = pad
            at += nb
        assert at == n_blocks and scales.shape == (rows, n_blocks)
        return QuantizedTensor(self, (rows, k), out, scales.astype(np.float32), offsets, method)

    def dequantize(self, qt: QuantizedTensor) -> np.ndarray:
        """float32 [out, in] of a QuantizedTensor made by this format."""
        offset = None if qt.offsets is None else qt.offsets[..., None]
        values = self.decode(qt.codes, qt.scales[..., None], offset)
        return values.reshape(qt.shape[0], -1)[:, :qt.shape[1]]

    def describe(self) -> str:
        block = "channel" if self.block_size == 0 else f"b{self.block_size}"
        return f"{self.name}({block}{'' if self.scale_dtype == self.default_scale_dtype else ', ' + self.scale_dtype})"

    def spec(self) -> dict[str, Any]:
        """The settings that reproduce this format (for the package manifest)."""
        return {"format": self.name, "bits": self.bits, "block_size": self.block_size,
                "scale_dtype": self.scale_dtype}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantFormat) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(self.spec().items()))

    def __repr__(self) -> str:
        return self.describe()


_FORMATS: dict[str, type[QuantFormat]] = {}


def register_format(cls: type[QuantFormat]) -> type[QuantFormat]:
    """Class decorator: make a format available by its `name`."""
    if cls.name in _FORMATS:
        raise ValueError(f"format {cls.name!r} is registered twice")
    _FORMATS[cls.name] = cls
    return cls


def format_names() -> list[str]:
    return sorted(_FORMATS)


def get_format(name: str, block_size: int | None = None, scale_dtype: str | None = None) -> QuantFormat:
    """An instance of the format registered as `name`.

    Raises:
        ValueError: unknown name (listing the known ones), or unsupported settings.
    """
    try:
        cls = _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown quantization format {name!r}; known formats: "
                         f"{', '.join(format_names())}") from None
    return cls(block_size, scale_dtype)
