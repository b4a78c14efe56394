"""Next-token selection: repetition penalty, temperature, top-k, top-p, seeded sampling.

The order follows Hugging Face's logits processors: penalty, temperature, top-k, top-p.
`distribution` exposes the final (sparse) distribution so speculative decoding can use
exactly the same one for draft and target.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus cut
    repetition_penalty: float = 1.0  # 1: none
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = (
            ("temperature", _real(self.temperature) and self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", _integer(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("top_p", _real(self.top_p) and 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("repetition_penalty", _real(self.repetition_penalty) and self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("seed", self.seed is None or _integer(self.seed), "an integer or None"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}")
        return cls(**data)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Divide positive / multiply negative logits of already-seen token ids by `penalty`."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[seen]
    logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def distribution(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Final sampling distribution over the surviving candidates.

    Args:
        logits: float [vocab] (after any repetition penalty).
        params: sampling settings with temperature > 0.
    Returns:
        (token_ids, probs), probs summing to 1: sorted by descending probability when top-k or
        top-p cut the vocabulary, else every token in id order.
    """
    scaled = logits.astype(np.float64) / params.temperature
    k = params.top_k if 0 < params.top_k < scaled.size else scaled.size
    if params.top_p < 1.0:
        # the nucleus lies inside the top-m tokens once their mass reaches top_p: grow m until it does.
        # Masses are of the softmax renormalised over the top-k survivors (zero outside them), as in HF.
        full = np.exp(scaled - scaled.max())
        if k < full.size:
            full[np.argpartition(-scaled, k - 1)[k:]] = 0.0
        full /= full.sum()
        m = min(k, 64)
        while True:
            ids = np.argpartition(-full, m - 1)[:m] if m < full.size else np.arange(full.size)
            ids = ids[np.argsort(-full[ids], kind="stable")]
            if m == k or full[ids].sum() >= params.top_p:
                break
            m = min(k, m * 4)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it included); the mass
        # is of the whole top-k distribution, not of the top-m tokens renormalised among themselves
        keep = int(np.searchsorted(np.cumsum(full[ids]), params.top_p) + 1)
        ids = ids[:keep]
    elif k < scaled.size:
        ids = np.argpartition(-scaled, k - 1)[:k]
        ids = ids[np.argsort(-scaled[ids], kind="stable")]
    else:  # no cut: the whole vocabulary in id order (sorting the vocabulary every token is slow)
        probs = np.exp(scaled - scaled.max())
        return np.arange(scaled.size), probs / probs.sum()
    probs = np.exp(scaled[ids] - scaled[ids[0]])
    probs /= probs.sum()
    return ids, probs


class Sampler:
    """Picks tokens for one sequence; owns its random generator and seen-token mask."""

    def __init__(self, params: SamplingParams, vocab_size: int, rng: np.random.Generator | None = None):
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng(params.seed)
        self.seen = np.zeros(vocab_size, dtype=bool)

    def observe(self, token_ids) -> None:
        self.seen[np.asarray(token_ids, dtype=np.int64)] = True

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """`logits` with the repetition penalty for the tokens seen so far."""
        if self.params.repetition_penalty == 1.0:
            return logits
        return apply_repetition_penalty(logits, np.flatnonzero(self.seen), self.params.repetition_penalty)

    def dense(self, logits: np.ndarray) -> np.ndarray:
        """The sampling distribution over the whole vocabulary (penalty already applied)."""
        ids, probs = distribution(logits, self.params)
        p = np.zeros(logits.shape[-1])
        p[ids] = probs
        return p

    def draw_dense(self, p: np.ndarray) -> int:
        """Draw a token from a dense distribution with this sampler's generator."""
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), p.size - 1))

    def __call__(self, logits: np.ndarray) -> int:
        """Pick the next token (greedy or sampled) and remember it for the penalty."""
        logits = self.penalized(logits)
        if self.params.greedy:
            token = int(logits.argmax())
        else:
            ids, probs = distribution(logits, self.params)
            token = int(ids[min(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"), ids.size - 1)])
        self.seen[token] = True
        return token
