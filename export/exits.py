"""Early-exit points: a least-squares adapter per exit and calibrated confidence thresholds.

At an exit after layer k the residual stream h_k is mapped by an affine adapter fitted by
least squares to the final layer's residual stream h_L (self-distillation at the hidden-state
level: one lstsq of [tokens, H+1] x [H+1, H], seconds on a CPU), then scored by the model's
own final norm + LM head. Confidence is the exit's top-1 probability. Calibration records, on
held-out calibration tokens, the precision curve: for each confidence level, the fraction of
tokens at or above it whose exit argmax equals the full model's argmax. The runtime turns a
requested quality (e.g. 0.95 top-1 agreement) into a per-exit threshold from that curve.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..runtime.early_exit import apply_adapter
from .checkpoint import Checkpoint
from .layers import LayerRunner, fit_affine, with_bias
from .prune import calibration_windows

log = logging.getLogger(__name__)
CURVE_POINTS = 64


def _softmax_top1(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p.max(axis=-1) / p.sum(axis=-1), logits.argmax(axis=-1)


def precision_curve(confidence: np.ndarray, agree: np.ndarray, probe: np.ndarray,
                    points: int = CURVE_POINTS, recall: float = 0.95) -> dict[str, list]:
    """Thresholds (confidence quantiles) with, for the tokens at or above each: their agreement
    with the full model, the exit rate, and the probe floor that keeps `recall` of them."""
    order = np.argsort(-confidence)
    conf, hits, probe = confidence[order], np.cumsum(agree[order]), probe[order]
    picks = np.unique(np.linspace(0, len(conf) - 1, points).astype(int))
    return {"threshold": [float(conf[i]) for i in picks],
            "agreement": [float(hits[i] / (i + 1)) for i in picks],
            "exit_rate": [float((i + 1) / len(conf)) for i in picks],
            "probe_floor": [float(np.quantile(probe[:i + 1], 1 - recall)) for i in picks]}


def fit_exits(ckpt: Checkpoint, layers: Sequence[int], windows: Sequence[Sequence[int]] | None = None,
              length: int = 256, progress: bool = False) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """Fit an adapter per exit layer on 3/4 of the calibration windows, calibrate on the rest.

    Args:
        ckpt: the float checkpoint (after any pruning).
        layers: exit after these many layers.
        windows: token windows (default: 16 x `length` tokens of WikiText-2 validation).
    Returns:
        ({layer: {"adapter": [H + 1, H] (last row: bias), "probe": [H + 1]}}, manifest entries).
    """
    n = ckpt.spec.num_layers
    bad = [k for k in layers if not 0 < k < n]
    if bad:
        raise ValueError(f"exit layers {bad} must lie inside 1..{n - 1}")
    windows = windows or calibration_windows(ckpt, 16, length, seed=1)
    runner = LayerRunner(ckpt, max(len(w) for w in windows), progress)
    states = [runner.residuals(t) for t in windows]
    cut = max(1, len(states) * 3 // 4)
    fit, held = states[:cut], states[cut:] or states[-1:]
    final_top1 = np.concatenate([runner.logits(s[-1]).argmax(-1) for s in held])
    adapters, entries = {}, []
    y = np.concatenate([s[-1][0] for s in fit]).astype(np.float64)  # the final layer's, for every exit
    for k in layers:
        x = np.concatenate([s[k][0] for s in fit]).astype(np.float64)
        adapter = fit_affine(x, y).astype(np.float32)
        # the probe predicts the exit's confidence from the raw hidden state with one dot product,
        # so the vocabulary-wide LM head runs only where an exit is plausible
        fit_conf = np.concatenate([_softmax_top1(runner.logits(apply_adapter(s[k], adapter)))[0] for s in fit])
        probe = fit_affine(x, fit_conf).astype(np.float32)
        conf, top1 = zip(*(_softmax_top1(runner.logits(apply_adapter(s[k], adapter))) for s in held))
        conf, agree = np.concatenate(conf), np.concatenate(top1) == final_top1
        held_x = np.concatenate([s[k][0] for s in held])
        adapters[k] = {"adapter": adapter, "probe": probe}
        entries.append({"layer": k, "file": f"exit{k}.npz", "top1_agreement": float(agree.mean()),
                        "calibration_tokens": len(agree),
                        "curve": precision_curve(conf, agree, with_bias(held_x) @ probe)})
        log.info("exit after layer %d: top-1 agreement %.1f%% on %d held-out tokens", k, 100 * agree.mean(), len(agree))
    return adapters, entries
