"""Depth pruning: score every block on calibration text, drop the least important, heal the cut.

Two importance scores per block (both on WikiText-2 validation windows):
  - angular distance between the residual stream entering and leaving the block,
    arccos(cos(h_in, h_out)) / pi averaged over tokens: how much the block changes its input;
  - the direct measure: perplexity of the model with only that block removed.
Removal follows Gromov et al. (2024): the contiguous run of n blocks whose input and output
are closest in angle is dropped (the scores decide where; it tends to sit near the top).
Healing, optional and CPU-cheap: a linear map (+ bias) fitted by least squares from the
residual stream entering the removed run to the one leaving it, applied at the cut.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import save_figure_atomic
from ..quant.recipe import Calibration
from .calibrate import calibration_tokens
from .checkpoint import Checkpoint
from .layers import LayerRunner, fit_affine, nll, with_bias

log = logging.getLogger(__name__)


def calibration_windows(ckpt: Checkpoint, windows: int = 8, length: int = 256, seed: int = 0) -> list[list[int]]:
    """`windows` random non-overlapping token windows of WikiText-2 validation (GPTQ's sampler)."""
    return calibration_tokens(ckpt.tokenizer, Calibration(sequences=windows, tokens=length, seed=seed)).tolist()


def _angular(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
    return float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi))


@dataclass(frozen=True)
class LayerScores:
    """Per-block importance; higher = more important."""

    angular: tuple[float, ...]  # distance between a block's input and output
    removal_ppl: tuple[float, ...]  # perplexity with the block removed
    base_ppl: float
    tokens: int  # scored tokens per configuration

    def table(self) -> str:
        rows = [f"{'block':>5} {'angular':>8} {'ppl without':>12} {'delta':>8}"]
        for i, (a, p) in enumerate(zip(self.angular, self.removal_ppl)):
            rows.append(f"{i:>5} {a:8.4f} {p:12.2f} {p / self.base_ppl - 1:+8.1%}")
        rows.append(f"full model perplexity {self.base_ppl:.2f} over {self.tokens} tokens (WikiText-2 valid)")
        return "\n".join(rows)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
        blocks = np.arange(len(self.angular))
        top.bar(blocks, self.angular)
        top.set_ylabel("angular distance")
        bottom.bar(blocks, np.asarray(self.removal_ppl) / self.base_ppl - 1)
        bottom.set_ylabel("ppl increase if removed")
        bottom.set_xlabel("block")
        fig.tight_layout()
        save_figure_atomic(fig, path, dpi=120)
        plt.close(fig)


def score_layers(runner: LayerRunner, windows: Sequence[Sequence[int]], progress: bool = False) -> LayerScores:
    """Both importance scores of every block over `windows`."""
    n = runner.spec.num_layers
    angular, losses = np.zeros(n), np.zeros(n)
    base = 0.0
    for tokens in tqdm(windows, desc="score layers", disable=not progress):
        states = runner.residuals(tokens)
        base += nll(runner.logits(states[-1]), tokens).sum()
        for i in range(n):
            angular[i] += _angular(states[i][0], states[i + 1][0]) / len(windows)
            losses[i] += nll(runner.logits(runner.run(states[i], range(i + 1, n))), tokens).sum()
    count = sum(len(t) - 1 for t in windows)
    return LayerScores(tuple(angular), tuple(np.exp(losses / count)), float(np.exp(base / count)), count)


def best_run(runner: LayerRunner, windows: Sequence[Sequence[int]], n: int) -> int:
    """Start of the n contiguous blocks whose input and output are closest in angle."""
    layers = runner.spec.num_layers
    if not 0 < n < layers:
        raise ValueError(f"can prune 1..{layers - 1} blocks of {layers}, not {n}")
    dist = np.zeros(layers - n + 1)
    for tokens in windows:
        states = runner.residuals(tokens)
        dist += [_angular(states[s][0], states[s + n][0]) for s in range(layers - n + 1)]
    # never the whole bottom: block 0 turns embeddings into the residual stream everything reads
    dist[0] = np.inf
    return int(np.argmin(dist))


def _runs(drop: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of the sorted block indices."""
    runs: list[tuple[int, int]] = []
    for i in sorted(drop):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def prune(ckpt: Checkpoint, drop: Sequence[int], heal_windows: Sequence[Sequence[int]] = (),
          runner: LayerRunner | None = None) -> Checkpoint:
    """A checkpoint without blocks `drop`, renumbered; healed at each cut when windows are given.

    Returns:
        The pruned checkpoint; `kept_layers` lists the original index of every kept block and
        `transforms` records what was done (written into the manifest).
    """
    n = ckpt.spec.num_layers
    drop = sorted(set(drop))
    if not drop or drop[0] < 0 or drop[-1] >= n or len(drop) >= n:
        raise ValueError(f"blocks to remove {drop} must be distinct indices in 0..{n - 1}, leaving at least one")
    kept = [i for i in range(n) if i not in drop]
    weights = {k: v for k, v in ckpt.weights.items() if not k.startswith("layers.")}
    for new, old in enumerate(kept):
        prefix = f"layers.{old}."
        weights.update({f"layers.{new}.{k[len(prefix):]}": v for k, v in ckpt.weights.items() if k.startswith(prefix)})
    heal = []
    if heal_windows:
        runner = runner or LayerRunner(ckpt, max(len(t) for t in heal_windows))
        states = [runner.residuals(t) for t in heal_windows]
        for start, end in _runs(drop):
            x = np.concatenate([s[start][0] for s in states]).astype(np.float64)
            y = np.concatenate([s[end][0] for s in states]).astype(np.float64)
            coef = fit_affine(x, y)
            at = sum(1 for k in kept if k < end)  # new index of the block after the cut (L: the head)
            weights[f"cut.{at}.weight"] = coef[:-1].T.astype(np.float32)  # [out, in], like every linear
            weights[f"cut.{at}.bias"] = coef[-1].astype(np.float32)
            residual = np.linalg.norm(with_bias(x) @ coef - y) / np.linalg.norm(y - x)
            heal.append({"removed": [start, end], "at_layer": at, "relative_residual": round(float(residual), 4)})
    spec = dataclasses.replace(ckpt.spec, num_layers=len(kept),  # a kept sliding-window layer stays one
                               sliding_layers=tuple(new for new, old in enumerate(kept)
                                                    if old in ckpt.spec.sliding_layers))
    original = ckpt.kept_layers or tuple(range(n))
    transforms = [*ckpt.transforms, {"prune": {"removed": [original[i] for i in drop], "healing": heal or None}}]
    return dataclasses.replace(ckpt, spec=spec, weights=weights, kept_layers=tuple(original[i] for i in kept),
                               transforms=transforms)


def analyze(ckpt: Checkpoint, windows: int = 8, length: int = 256, plot: Path | None = None,
            progress: bool = False) -> LayerScores:
    """Score every block of `ckpt` on calibration text; optionally save a bar chart."""
    tokens = calibration_windows(ckpt, windows, length)
    scores = score_layers(LayerRunner(ckpt, length, progress), tokens, progress)
    if plot is not None:
        scores.plot(Path(plot))
    return scores


def prune_for_export(ckpt: Checkpoint, prune_layers: int = 0, keep_layers: Sequence[int] = (),
                     heal: bool = False, windows: int = 8, length: int = 256, progress: bool = False) -> Checkpoint:
    """The export's depth options: drop the best contiguous run of `prune_layers` blocks, or keep
    exactly `keep_layers`; heal the cut by least squares when asked."""
    if prune_layers and keep_layers:
        raise ValueError("give either --prune-layers N or --keep-layers LIST, not both")
    if not prune_layers and not keep_layers:
        if heal:
            raise ValueError("--heal needs --prune-layers or --keep-layers")
        return ckpt
    if keep_layers:
        bad = [i for i in keep_layers if not 0 <= i < ckpt.spec.num_layers]
        if bad:
            raise ValueError(f"--keep-layers {bad} out of range 0..{ckpt.spec.num_layers - 1}")
    tokens, runner = [], None
    if heal or not keep_layers:  # calibration text and layer sessions only when scoring or healing
        tokens = calibration_windows(ckpt, windows, length)
        runner = LayerRunner(ckpt, length, progress)
    if keep_layers:
        drop = [i for i in range(ckpt.spec.num_layers) if i not in set(keep_layers)]
    else:
        start = best_run(runner, tokens, prune_layers)
        drop = list(range(start, start + prune_layers))
    log.info("removing blocks %s", drop)
    return prune(ckpt, drop, tokens if heal else (), runner)
