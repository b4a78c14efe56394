"""Pack quantized tensors for onnxruntime's `MatMulNBits` / `GatherBlockQuantized` (com.microsoft).

Layout (ORT contrib op spec): for weight W [N, K] quantized in blocks of `block_size` along K,
  B            uint8 [N, k_blocks, block_size * bits / 8], codes packed low bits first along K
  scales       float [N, k_blocks]
  zero_points  uint8 [N, ceil(k_blocks * bits / 8)], packed the same way (optional; absent
               means 2^(bits-1), e.g. 8 for 4-bit)
and the kernel computes A @ ((code - zero_point) * scale)^T. Symmetric codes are stored with the
default zero point added; a per-channel tensor repeats its scale over hardware-sized blocks.
A float minimum (int4_min, GGUF Q4_1 numerics: value = scale * code + minimum) becomes a float
zero point -minimum / scale, which onnxruntime evaluates as (code - zero_point) * scale: equal to
our dequantization up to float rounding (one or two ulp), not bit for bit.
`GatherBlockQuantized` reads the same B (quantize_axis = 2) with scales [N, k_blocks, 1], so a
tied embedding and LM head can share one packed copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import BLOCK_SIZES, QuantizedTensor


@dataclass(frozen=True, eq=False)
class MatMulNBitsWeight:
    """The initializers and attributes of one MatMulNBits weight (N = out, K = in)."""

    qweight: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)], float32 [N, k_blocks], or None
    bits: int
    block_size: int
    K: int
    N: int

    def attributes(self, accuracy_level: int) -> dict[str, int]:
        return {"K": self.K, "N": self.N, "bits": self.bits, "block_size": self.block_size,
                "accuracy_level": accuracy_level}

    def gather_zero_points(self) -> np.ndarray | None:
        """Zero points as GatherBlockQuantized wants them for B viewed as [N, k_blocks, blob]."""
        if self.zero_points is None:
            return None
        if self.zero_points.dtype != np.uint8:
            raise ValueError("GatherBlockQuantized takes integer zero points only; quantize the embedding "
                             "with int4_asym, int4_sym or int8_block instead of a float-minimum format")
        return unpack_codes(self.zero_points, self.bits)[:, :self.qweight.shape[1], None]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (< 2**bits) along the last axis, low bits first, 8 // bits per byte."""
    per = 8 // bits
    if codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes of {bits} bits into whole bytes")
    grouped = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= grouped[..., i] << np.uint8(bits * i)
    return out


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of pack_codes: uint8 codes, 8 // bits per input byte."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)


def hardware_block(k: int) -> int:
    """Largest supported block size dividing K (blocks of a per-channel tensor repeat its scale)."""
    return next((b for b in reversed(BLOCK_SIZES) if k % b == 0), 32)


def pack_matmulnbits(qt: QuantizedTensor) -> MatMulNBitsWeight:
    """Lay out `qt` for MatMulNBits.

    """
    fmt = qt.fmt
    bits = fmt.bits
    n, k = qt.shape
    codes, scales, offsets = qt.codes, qt.scales, qt.offsets
    if qt.block_size not in BLOCK_SIZES:  # per channel: repeat the row's scale over hardware blocks
        block = hardware_block(k)
        nb = -(-k // block)
        fill = offsets[:, :1] if fmt.offset_kind == "int" else 0
        flat = np.empty((n, nb * block), dtype=codes.dtype)
        flat[:, :k] = codes[:, 0, :k]
        flat[:, k:] = fill
        codes = flat.reshape(n, nb, block)
        scales = np.repeat(scales[:, :1], nb, axis=1)
        offsets = None if offsets is None else np.repeat(offsets[:, :1], nb, axis=1)
    if fmt.offset_kind is None:  # symmetric: store code + default zero point 2^(bits-1)
        stored = (codes.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
        zero_points = None
    elif fmt.offset_kind == "float":  # scale * code + minimum == (code - (-minimum / scale)) * scale
        flat = scales == 0  # constant block: every code decodes to the minimum -> (0 + 1) * minimum
        stored = np.where(flat[..., None], 0, codes).astype(np.uint8)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero_points = np.where(flat, np.float32(-1), -offsets / scales).astype(np.float32)
        scales = np.where(flat, offsets, scales)
    else:
        stored = codes.astype(np.uint8)
        nb = offsets.shape[1]
        per = 8 // bits
        padded = np.zeros((n, -(-nb // per) * per), dtype=np.uint8)
        padded[:, :nb] = offsets
        zero_points = pack_codes(padded, bits)
    return MatMulNBitsWeight(qweight=pack_codes(stored, bits), scales=np.ascontiguousarray(scales, np.float32),
                             zero_points=zero_points, bits=bits, block_size=int(codes.shape[2]), K=k, N=n)


def concat_rows(parts: list[MatMulNBitsWeight]) -> MatMulNBitsWeight:
    """Stack weights with the same K, bits and block size along N (e.g. a packed QKV projection).

    Raises:
        ValueError: when the parts do not share K, bits, block size and zero-point presence.
    """
    keys = {_layout(p) for p in parts}
    if len(keys) != 1:
        raise ValueError(f"cannot stack MatMulNBits weights with different layouts {sorted(keys, key=str)}")
    zps = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return MatMulNBitsWeight(qweight=np.concatenate([p.qweight for p in parts]),
                             scales=np.concatenate([p.scales for p in parts]), zero_points=zps,
                             bits=parts[0].bits, block_size=parts[0].block_size, K=parts[0].K,
                             N=sum(p.N for p in parts))


def _layout(p: MatMulNBitsWeight) -> tuple:
    return p.K, p.bits, p.block_size, None if p.zero_points is None else str(p.zero_points.dtype)


def can_concat(parts: list[MatMulNBitsWeight]) -> bool:
    return len({_layout(p) for p in parts}) == 1
