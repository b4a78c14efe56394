"""The numeric formats, one class each, registered by name.

| name           | codes            | per block                      | same numbers as            |
|----------------|------------------|--------------------------------|----------------------------|
| `int8_block`   | int8 [-128, 127] | scale = absmax / 127           | GGUF Q8_0 (block 32, fp16) |
| `int8_channel` | int8 [-128, 127] | scale = absmax / 127 per row   | (ORT only)                 |
| `int4_sym`     | int4 [-8, 7]     | scale = (signed absmax) / -8   | GGUF Q4_0 (block 32, fp16) |
| `int4_asym`    | uint4 [0, 15]    | scale + integer zero point     | ORT MatMulNBits with zp    |
| `int4_min`     | uint4 [0, 15]    | scale + float minimum          | GGUF Q4_1 (block 32, fp16) |
| `ternary`      | {-1, 0, +1}      | absmean threshold, LSQ scale   | GGUF TQ1_0/TQ2_0 (b256)    |

Where a GGUF type exists the rounding follows ggml's reference quantizer bit for bit, so a
round-to-nearest tensor packs to exactly the bytes `gguf.quants.quantize` would write.
"""
from __future__ import annotations

import numpy as np

from .base import BlockParams, QuantFormat, register_format, round_half_away, safe_inverse


@register_format
class Int8Block(QuantFormat):
    """Symmetric 8-bit, absmax / 127 per block (GGUF Q8_0 numerics)."""

    name, bits, qmin, qmax = "int8_block", 8, -128, 127

    def params(self, blocks: np.ndarray) -> BlockParams:
        d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
        return BlockParams(scale=self.round_scale(d), inv_scale=safe_inverse(d))

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        return np.clip(round_half_away(x * p.inv_scale), self.qmin, self.qmax).astype(np.int8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        return codes.astype(np.float32) * scale


@register_format
class Int8Channel(Int8Block):
    """Symmetric 8-bit with one float32 scale per output row."""

    name = "int8_channel"
    default_block_size, block_sizes, default_scale_dtype = 0, (0,), "float32"


@register_format
class Int4Sym(QuantFormat):
    """Symmetric 4-bit in [-8, 7]: the largest-magnitude value maps to -8 (GGUF Q4_0 numerics)."""

    name, bits, qmin, qmax = "int4_sym", 4, -8, 7

    def params(self, blocks: np.ndarray) -> BlockParams:
        at = np.abs(blocks).argmax(axis=-1)[..., None]
        d = np.take_along_axis(blocks, at, axis=-1) / np.float32(-8)
        return BlockParams(scale=self.round_scale(d), inv_scale=safe_inverse(d))

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        # ggml: trunc(x / d + 8.5) clipped to [0, 15], i.e. round half up, stored with an offset of 8
        q = np.trunc(x * p.inv_scale + np.float32(8.5))
        return (np.clip(q, 0, 15) - 8).astype(np.int8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        return codes.astype(np.float32) * scale


@register_format
class Int4Asym(QuantFormat):
    """Asymmetric 4-bit with an integer zero point; the range always includes 0 exactly."""

    name, bits, qmin, qmax = "int4_asym", 4, 0, 15
    offset_kind = "int"

    def params(self, blocks: np.ndarray) -> BlockParams:
        lo = np.minimum(blocks.min(axis=-1, keepdims=True), 0)
        hi = np.maximum(blocks.max(axis=-1, keepdims=True), 0)
        scale = self.round_scale((hi - lo) / np.float32(self.qmax))
        inv = safe_inverse(scale)
        zero = np.clip(round_half_away(-lo * inv), 0, self.qmax).astype(np.uint8)
        return BlockParams(scale=scale, offset=zero, inv_scale=inv)

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        q = round_half_away(x * p.inv_scale) + p.offset
        return np.clip(q, 0, self.qmax).astype(np.uint8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        return (codes.astype(np.float32) - offset.astype(np.float32)) * scale


@register_format
class Int4Min(QuantFormat):
    """Asymmetric 4-bit: value = scale * code + minimum, both float (GGUF Q4_1 numerics)."""

    name, bits, qmin, qmax = "int4_min", 4, 0, 15
    offset_kind = "float"

    def params(self, blocks: np.ndarray) -> BlockParams:
        lo = blocks.min(axis=-1, keepdims=True)
        d = (blocks.max(axis=-1, keepdims=True) - lo) / np.float32(15)
        return BlockParams(scale=self.round_scale(d), offset=self.round_scale(lo),
                           inv_scale=safe_inverse(d), enc_offset=lo)

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        q = np.trunc((x - p.enc_offset) * p.inv_scale + np.float32(0.5))
        return np.clip(q, 0, self.qmax).astype(np.uint8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        return scale * codes.astype(np.float32) + offset


@register_format
class Ternary(QuantFormat):
    """Ternary {-1, 0, +1} x scale, BitNet b1.58 style.

    Codes are round(w / mean|w|) clipped to [-1, 1] (the absmean threshold); the stored scale is
    then the least-squares one for those codes, mean |w| over the non-zero codes. A block that is
    already ternary (w = s * q) therefore comes back exactly: codes q and scale s.
    """

    name, bits, qmin, qmax = "ternary", 2, -1, 1
    default_block_size = 64

    def params(self, blocks: np.ndarray) -> BlockParams:
        # encode thresholds at half the absmean; decode with the least-squares scale of those codes
        absmean = np.abs(blocks).mean(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
        inv = safe_inverse(absmean)
        nonzero = np.clip(round_half_away(blocks * inv), -1, 1) != 0
        count = nonzero.sum(axis=-1, keepdims=True)
        total = np.where(nonzero, np.abs(blocks), 0).sum(axis=-1, keepdims=True, dtype=np.float64)
        fitted = np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float32)
        return BlockParams(scale=self.round_scale(fitted), inv_scale=inv)

    def encode(self, x: np.ndarray, p: BlockParams) -> np.ndarray:
        return np.clip(round_half_away(x * p.inv_scale), -1, 1).astype(np.int8)

    def decode(self, codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
        return codes.astype(np.float32) * scale
