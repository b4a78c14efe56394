"""Statistics of the benchmark: summaries over repeats, percentiles, figures of one timing record.

A timing record is what a worker returns for one generation: the time (seconds after the call)
at which every generated token appeared, `batch` prompts x `new_tokens` tokens. Engines that
produce a whole batch step at once report that step's time for each of its tokens.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default).

    Raises:
        ValueError: no values, or q outside 0..100.
    """
    if not values:
        raise ValueError("percentile of no values; measure at least one")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """min / median / max (and n) of a figure measured once per repeat."""
    if not values:
        raise ValueError("summary of no values; run at least one repeat")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


@dataclass(frozen=True)
class TimingRecord:
    """One generation: `batch` prompts of `prompt_tokens` tokens, token times in seconds after the call."""

    prompt_tokens: int
    batch: int
    stamps: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.batch < 1 or len(self.stamps) < 2 * self.batch or len(self.stamps) % self.batch:
            raise ValueError(f"a timing record needs at least 2 tokens per prompt for batch {self.batch}, "
                             f"got {len(self.stamps)} token times; generate more tokens")
        if any(b < a for a, b in zip(self.stamps, self.stamps[1:])):
            raise ValueError("token times must not decrease; record them as they arrive")

    @property
    def new_tokens(self) -> int:
        return len(self.stamps) // self.batch

    @property
    def ttft_s(self) -> float:
        """Time to first token: until every prompt of the batch has its first token."""
        return self.stamps[self.batch - 1]

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens per second of the prefill (the first token's sampling included)."""
        return self.batch * self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first one, all prompts of the batch together."""
        return (len(self.stamps) - self.batch) / (self.stamps[-1] - self.ttft_s)

    @property
    def total_tok_s(self) -> float:
        """Generated tokens per second over the whole call, prefill included."""
        return len(self.stamps) / self.stamps[-1]

    def inter_token_s(self) -> list[float]:
        """Seconds between consecutive decode steps (one value per step after the first)."""
        steps = self.stamps[self.batch - 1::self.batch]
        return [b - a for a, b in zip(steps, steps[1:])]

    def figures(self) -> dict[str, float]:
        """The per-repeat figures the report summarizes."""
        gaps = self.inter_token_s()
        return {"ttft_ms": 1e3 * self.ttft_s, "prefill_tok_s": self.prefill_tok_s,
                "decode_tok_s": self.decode_tok_s, "total_tok_s": self.total_tok_s,
                "itl_ms_median": 1e3 * statistics.median(gaps), "itl_ms_p90": 1e3 * percentile(gaps, 90)}


def achieved_bandwidth(weight_bytes_per_token: int, decode_tok_s: float) -> float:
    """Bytes per second of weights read while decoding (each weight byte read once per token)."""
    if weight_bytes_per_token < 0 or decode_tok_s < 0:
        raise ValueError(f"bytes per token and tokens/s must be >= 0, got {weight_bytes_per_token}, {decode_tok_s}")
    return weight_bytes_per_token * decode_tok_s


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator
