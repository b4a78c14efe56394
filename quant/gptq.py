"""GPTQ: quantize a linear layer column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs (Frantar et al. 2022,
arXiv:2210.17323), in numpy.

Works with any registered format: block parameters come from `fmt.params`, codes from
`fmt.encode`, so GPTQ's codes pack exactly like round-to-nearest ones. With `act_order` columns
are visited by decreasing Hessian diagonal and each block's parameters are fixed up front from
the original weights ("static groups"), which keeps blocks contiguous along K as MatMulNBits and
GGUF require.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .base import BlockParams, QuantFormat, QuantizedTensor

log = logging.getLogger(__name__)


def _inverse_cholesky_lower(a: np.ndarray) -> np.ndarray:
    """inv(cholesky(a)) for a symmetric positive definite float64 matrix.

    torch's LAPACK is used when torch is installed: numpy's bundled OpenBLAS runs potrf with all
    threads, which is far slower on a small shared machine (README: design notes on export and quantization).
    """
    try:
        import torch
    except ImportError:
        return np.linalg.inv(np.linalg.cholesky(a))
    lower = torch.linalg.cholesky(torch.from_numpy(a))
    return torch.linalg.solve_triangular(lower, torch.eye(len(a), dtype=lower.dtype), upper=False).numpy()


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs from the inputs' Hessian, computed once per input (q, k, v share it).

    Attributes:
        perm: column visiting order (decreasing Hessian diagonal with act_order, else identity).
        dead: inputs that never fire (zero diagonal).
        u: upper Cholesky factor of the damped inverse Hessian in `perm` order: H^-1 = U^T U.
    """

    perm: np.ndarray
    dead: np.ndarray
    u: np.ndarray

    @classmethod
    def from_hessian(cls, hessian: np.ndarray, damp: float = 0.01, act_order: bool = True) -> HessianFactor:
        """Factor X^T X / n (any positive multiple) of a layer's inputs X [n, in]."""
        h = np.array(hessian, dtype=np.float64)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"a Hessian must be square, got shape {h.shape}")
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
        h = h[np.ix_(perm, perm)]
        h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
        # with J the index reversal, U = J inv(chol(J H J)) J is upper triangular and U^T U = H^-1
        u = _inverse_cholesky_lower(np.ascontiguousarray(h[::-1, ::-1]))[::-1, ::-1]
        return cls(perm=perm, dead=dead, u=np.ascontiguousarray(u))


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray | HessianFactor, fmt: QuantFormat,
                  damp: float = 0.01, act_order: bool = True, name: str = "tensor",
                  block: int = 128) -> QuantizedTensor:
    """Quantize `weight` [out, in] with GPTQ.

    Args:
        weight: float matrix [out, in] (in = the layer's input features).
        hessian: X^T X / n of the layer's inputs X [n, in] (any positive multiple works), or
            its HessianFactor (then `damp` and `act_order` were fixed when it was made).
        fmt: the target format.
        damp: fraction of the mean Hessian diagonal added for numerical stability.
        act_order: visit columns by decreasing Hessian diagonal (static block parameters).
        name: tensor name, for errors and logs.
        block: columns updated together before the lazy batch update of the rest.
    Returns:
        The quantized tensor (method "gptq").
    Raises:
        ValueError: shape mismatch between weight and Hessian, or a block size that does not fit.
    """
    fmt.check_shape(weight.shape, name)
    out, k = weight.shape
    if np.shape(hessian.u if isinstance(hessian, HessianFactor) else hessian) != (k, k):
        raise ValueError(f"{name}: Hessian {np.shape(getattr(hessian, 'u', hessian))} does not match "
                         f"{k} input features")
    factor = hessian if isinstance(hessian, HessianFactor) else HessianFactor.from_hessian(hessian, damp, act_order)
    perm, u = factor.perm, factor.u
    act_order = not np.array_equal(perm, np.arange(k))
    w = weight.astype(np.float64, copy=True)
    w[:, factor.dead] = 0.0  # inputs that never fire: any code is as good as another
    bs = fmt.block_size_for(k)
    n_groups = -(-k // bs)
    bounds = [(g * bs, min((g + 1) * bs, k)) for g in range(n_groups)]
    static = act_order or bs == k
    params: list[BlockParams | None] = [
        fmt.params(w[:, a:b].astype(np.float32)) if static else None for a, b in bounds]
    w = w[:, perm]
    codes = np.empty((out, k), dtype=fmt.code_dtype)
    block = bs * max(1, block // bs) if not static else block  # dynamic groups never straddle blocks
    loss = 0.0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, u1 = w[:, i1:i2].copy(), np.zeros((out, i2 - i1)), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i]
            g = col // bs
            if params[g] is None:  # first column of a block (columns run in order without act_order)
                params[g] = fmt.params(w1[:, i:i + bounds[g][1] - bounds[g][0]].astype(np.float32))
            p = params[g]
            c = fmt.encode(w1[:, i:i + 1].astype(np.float32), p)
            q = fmt.decode(c, p.scale, p.offset)[:, 0].astype(np.float64)
            codes[:, i1 + i] = c[:, 0]
            e = (w1[:, i] - q) / u1[i, i]
            loss += float(np.dot(e, e)) / 2
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    ordered = np.empty_like(codes)
    ordered[:, perm] = codes
    log.debug("gptq %s %s: loss %.4g", name, fmt.describe(), loss)
    full = k // bs
    parts_codes = []
    if full:
        parts_codes.append(ordered[:, :full * bs].reshape(out, full, bs))
    if k % bs:
        parts_codes.append(ordered[:, full * bs:].reshape(out, 1, k - full * bs))
    return fmt.assemble((out, k), parts_codes, params, method="gptq")  # params: one per block, in order
