"""Early-exit decoding: stop a token at the first exit whose confidence passes its threshold.

Layers a token skipped still owe key/value entries to later tokens. They are deferred, not
approximated: the exiting token's hidden state is kept as the input of the next stage, and the
next token that goes deeper runs that stage on all deferred positions plus itself in one
chunk (FREE / LayerSkip-style). On a memory-bound CPU a chunk of a few tokens costs about one
token, so the skipped layers' weights are read once for the whole run of exited tokens, and
every cached K/V equals what the full model computes for the same tokens.
"""
from __future__ import annotations

import time
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import Backend, Cache, require_staged
from .manifest import Manifest, PackageError, package_file


def threshold_for(curve: dict[str, list], quality: float) -> float:
    """Lowest calibrated threshold whose exited tokens still agree with the full model at
    >= quality (inf: this exit never reaches it)."""
    best = float("inf")
    for threshold, agreement in zip(curve["threshold"], curve["agreement"]):
        if agreement < quality:
            break
        best = threshold
    return best


def apply_adapter(hidden: np.ndarray, adapter: np.ndarray) -> np.ndarray:
    """hidden [..., H] -> hidden @ W + b with adapter [H + 1, H]."""
    return (hidden @ adapter[:-1] + adapter[-1]).astype(np.float32)


@dataclass(frozen=True)
class ExitPoint:
    stage: int  # index of the first stage after the exit
    layer: int  # exit after this many layers
    adapter: np.ndarray  # [H + 1, H], last row the bias
    threshold: float
    probe: np.ndarray | None = None  # [H + 1]: cheap confidence estimate, gates the LM head
    probe_floor: float = -np.inf


def read_exit_file(package_dir: Path, name: str, hidden: int) -> dict[str, np.ndarray]:
    """An exit's "adapter" [H + 1, H] and "probe" [H + 1] from its .npz (checked to lie inside the package).

    Raises:
        PackageError: the file leads outside the package, is missing or unreadable, or holds other arrays.
    """
    path = package_file(package_dir, name, "exits[].file")
    shapes = {"adapter": (hidden + 1, hidden), "probe": (hidden + 1,)}
    try:
        with np.load(path) as npz:  # allow_pickle stays False: loading runs no code
            arrays = {key: np.asarray(npz[key], dtype=np.float32) for key in shapes}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise PackageError(f"{path} is not a valid exit file ({type(e).__name__}: {e}); "
                           f"re-export the package") from None
    for key, shape in shapes.items():
        if arrays[key].shape != shape:
            raise PackageError(f"{path}: {key} has shape {arrays[key].shape}, expected {shape}; re-export the package")
    return arrays


def exit_points(package_dir: Path, manifest: Manifest, quality: float | None = None,
                threshold: float | None = None) -> list[ExitPoint]:
    """The package's exits with thresholds for a quality level (or one raw threshold)."""
    if (quality is None) == (threshold is None):
        raise ValueError("give exactly one of early_exit (a quality level) or exit_threshold")
    if quality is not None and not 0 < quality <= 1:
        raise ValueError(f"early_exit is a top-1 agreement level in (0, 1], got {quality!r}")
    if not manifest.exits:
        raise PackageError(f"package {package_dir} has no early exits; export it with "
                           f"--exit-layers K1,K2")
    starts = {s.first_layer: k for k, s in enumerate(manifest.stages)}
    points = []
    for entry in manifest.exits:
        curve = entry["curve"]
        tau = threshold if threshold is not None else threshold_for(curve, quality)
        floors = [f for t, f in zip(curve["threshold"], curve["probe_floor"]) if t >= tau]
        arrays = read_exit_file(package_dir, entry["file"], manifest.model.hidden_size)
        points.append(ExitPoint(starts[entry["layer"]], entry["layer"], arrays["adapter"], tau,
                                arrays["probe"], min(floors) if floors else -np.inf))
    return sorted(points, key=lambda p: p.stage)


class ExitGuard:
    """Keeps early exit on only while it pays, measured as it runs.

    Exits cost an LM head per attempt and a deferred chunk later; on a shallow model that can
    exceed the layers they skip. The guard times the runner's own steps: first `baseline` steps at
    full depth, then a trial of `trial` steps with exits plus one full-depth step that settles
    their deferred layers. Exits stay on while a trial's mean step is faster than the median
    full-depth step (then trials of `trial` steps go on, each compared the same way); otherwise
    they are off for `backoff` steps, twice as long after each failed trial. A trial that loses
    costs at most its few steps: with exits 30% slower, a 64-token run loses about 2%.

    Args:
        baseline, trial, backoff: steps per phase (see above).
        clock: seconds now (a test can pass a fake one).
    """

    def __init__(self, baseline: int = 4, trial: int = 4, backoff: int = 64,
                 clock: Callable[[], float] = time.perf_counter):
        self.trial, self.backoff, self.clock = trial, backoff, clock
        self.full: deque[float] = deque(maxlen=32)  # seconds of recent full-depth steps
        self.phase, self.left = "baseline", baseline
        self.trial_s, self.trial_steps = 0.0, 0
        self.trials = self.failed = 0

    @property
    def exits_on(self) -> bool:
        """Whether this step may exit (the last step of a trial settles the deferred layers)."""
        return self.phase in ("trial", "on") and self.left > 1

    def record(self, seconds: float) -> None:
        """Account one step of `seconds` and move through the phases."""
        if self.phase in ("baseline", "off"):
            self.full.append(seconds)
        else:
            self.trial_s += seconds
            self.trial_steps += 1
        self.left -= 1
        if self.left > 0:
            return
        if self.phase in ("trial", "on"):
            self.trials += 1
            pays = bool(self.full) and self.trial_s / self.trial_steps < float(np.median(self.full))
            if not pays:
                self.failed += 1
                self.phase, self.left = "off", self.backoff
                self.backoff *= 2
                self.trial_s, self.trial_steps = 0.0, 0
                return
        self.phase = "on" if self.phase in ("trial", "on") else "trial"
        self.left, self.trial_s, self.trial_steps = self.trial + 1, 0.0, 0


class EarlyExitRunner:
    """Runs one sequence token by token through stages, exiting early, deferring skipped layers.

    Args:
        backend, cache: the staged backend and the sequence's KV cache.
        points: the exits and their thresholds.
        guard: an ExitGuard that turns exits off while they do not pay (None: always try them).
    Raises:
        ValueError: `backend` runs the whole model in one call (not a StagedBackend).
    """

    def __init__(self, backend: Backend, cache: Cache, points: list[ExitPoint], guard: ExitGuard | None = None):
        self.backend, self.cache = require_staged(backend, "early exit"), cache
        self.guard = guard
        self.points = {p.stage: p for p in points}
        self.num_stages = len(backend.manifest.stages)
        self.head = range(self.num_stages - 1, self.num_stages)
        self.pending: dict[int, list[np.ndarray]] = {k: [] for k in range(1, self.num_stages)}

    def _run(self, stage: int, hidden: np.ndarray, end: int) -> np.ndarray:
        """Stage `stage` on hidden [1, m, H] for positions end - m + 1 .. end."""
        m = hidden.shape[1]
        return self.backend.forward(hidden, self.cache, np.array([m], np.int32), None, range(stage, stage + 1),
                                    np.array([end - m + 1], np.int32)).numpy()

    def _head(self, hidden: np.ndarray, position: int) -> np.ndarray:
        return self.backend.forward(hidden, self.cache, np.array([1], np.int32), np.zeros((1, 1), np.int64),
                                    self.head, np.array([position], np.int32))[0, 0]

    @staticmethod
    def _plausible(hidden: np.ndarray, point: ExitPoint) -> bool:
        """The probe's estimate of the exit confidence clears its calibrated floor."""
        return point.probe is None or float(hidden @ point.probe[:-1] + point.probe[-1]) >= point.probe_floor

    def step(self, token: int, position: int) -> tuple[np.ndarray, int | None]:
        """Feed `token` at `position`; returns (logits of the next token, exit layer or None)."""
        if self.guard is None:
            return self._step(token, position, True)
        start = self.guard.clock()
        out = self._step(token, position, self.guard.exits_on)
        self.guard.record(self.guard.clock() - start)
        return out

    def _step(self, token: int, position: int, exits: bool) -> tuple[np.ndarray, int | None]:
        hidden = self.backend.forward(np.array([[token]]), self.cache, np.ones(1, np.int32), None, range(1),
                                      np.array([position], np.int32)).numpy()
        for stage in range(1, self.num_stages - 1):
            point = self.points.get(stage) if exits else None
            if point is not None and self._plausible(hidden[0, -1], point):
                logits = self._head(apply_adapter(hidden[:, -1:], point.adapter), position)
                z = np.exp(logits - logits.max())
                if z.max() / z.sum() >= point.threshold:
                    self.pending[stage].append(hidden)
                    return logits, point.layer
            chunk = np.concatenate(self.pending[stage] + [hidden], axis=1)
            self.pending[stage] = []
            hidden = self._run(stage, chunk, position)
        return self._head(hidden[:, -1:], position), None
