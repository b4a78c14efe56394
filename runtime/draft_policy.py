"""How many tokens each row drafts per speculative round: the DraftPolicy interface and the
default AdaptiveDraftLength, which picks the length from acceptance and step costs."""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# classes c and c' share their measured draft costs when c // COST_GROUP == c' // COST_GROUP: a
# drafter that mixes cheap and expensive ways of drafting (the `auto` mode: lookup, draft model)
# puts them in different groups so each is costed on its own
COST_GROUP = 100


@runtime_checkable
class DraftPolicy(Protocol):
    """Decides how many tokens each row drafts per round (AdaptiveDraftLength is the default;
    pass another as `generate(..., draft_tokens=policy)`). Lengths are upper bounds: the engine
    caps them by the tokens left, and a drafter may propose fewer."""

    def lengths(self, classes: Sequence[int]) -> list[int]:
        """Draft lengths for the active rows this round, given each row's class (Drafter.classes)."""

    def update(self, rows: Sequence[tuple[int, int]], draft_s: float, verify_s: float,
               classes: Sequence[int] | None = None) -> None:
        """The round's (drafts proposed, drafts accepted) per active row, seconds spent drafting
        and verifying, and the rows' classes."""


class AdaptiveDraftLength:
    """Chooses the draft length from observed acceptance and costs; 0 when drafting does not pay.

    Acceptance is modelled by its survival curve: S(j), the chance that the first j drafts of a
    round are all accepted, estimated per position from recent rounds (Kaplan-Meier: a round that
    accepted m of k drafts tested positions 1..m+1, or 1..k when all passed, and failed at m+1).
    Drafts do not fail independently: a draft model agrees with its target in runs, and a prompt
    lookup either copies a long passage or misses at once, so a geometric model S(j) = a^j would
    draft too little. See `survival` for the fit; positions never tried take the deepest estimate
    but fail at least `untried_hazard` of the time, and every 8th round probes 2 deeper, so a
    longer length is found when the curve stays flat, and only as fast as a wasted draft is cheap.

    A drafter may sort its rows into classes before drafting (`Drafter.classes`: a lookup's
    match length); each class has its own curve and its own length. Verification costs are
    shared; drafting costs are shared within a cost group (classes with the same
    `cls // COST_GROUP`), so a drafter can mix a free lookup with a model draft.

    Costs: a round of k drafts costs its drafting, fitted as t_round + k * t_draft (a draft model
    first catches up on the tokens accepted last round), plus one verification of k + 1
    positions, fitted as t_step + k * t_extra (plain steps are width 1), both over recent rounds
    from the median time per width (see `_fit`): on a shared CPU one descheduled step takes
    several times the usual, and a mean would switch speculation off on it. Until two widths are
    each timed twice, rounds of `probe` and `probe // 2` drafts alternate (no plain warm-up: it
    would cost what those rounds gain), and the verification fit extrapolates to a plain step.

    k drafts yield 1 + S(1) + ... + S(k) tokens per round; the k with the best tokens per second
    is used. When that is k = 0 (plain decoding), a probe round of 2 drafts runs after 16 plain
    rounds of that class, so a change in the text can switch speculation back on; each probe
    that does not doubles the wait (up to 256), since a probe of an expensive drafter
    (self-speculation) costs several steps.

    Args:
        max_tokens: longest draft per round.
        fixed: always draft this many (None: adapt).
        window: rounds of history kept (timings, and outcomes per class).
        probe: draft length of the first rounds, alternating with probe // 2.
        prior_hazard, prior_weight: prior failure rate at position 1, worth prior_weight rounds.
        untried_hazard: least failure rate assumed at positions never tried.
    """

    def __init__(self, max_tokens: int = 16, fixed: int | None = None, window: int = 64, probe: int = 4,
                 prior_hazard: float = 0.4, prior_weight: float = 0.5, untried_hazard: float = 0.1):
        self.max_tokens, self.fixed, self.probe, self.window = max_tokens, fixed, probe, window
        self.prior_hazard, self.prior_weight, self.untried_hazard = prior_hazard, prior_weight, untried_hazard
        # timings, (k, s) of drafting and (width, s) of verifying; plain steps kept apart, so a long
        # plain stretch does not push the drafting rounds out of the window
        self.verifies, self.plain = deque(maxlen=window), deque(maxlen=window)
        self.drafts: dict[int, deque] = {}  # per cost group
        self.curves: dict[int, _Curve] = {}

    def _drafts(self, group: int) -> deque:
        if group not in self.drafts:
            self.drafts[group] = deque(maxlen=self.window)
        return self.drafts[group]

    def _curve(self, cls: int) -> _Curve:
        if cls not in self.curves:
            self.curves[cls] = _Curve(deque(maxlen=self.window))
        return self.curves[cls]

    def survival(self, cls: int = 0) -> np.ndarray:
        """S(1..max_tokens) for rows of class `cls`: the estimated chance that the first j drafts
        are all accepted.

        The hazard h_j (a draft at position j fails, given that the ones before it passed) is
        fitted non-increasing in j (pool-adjacent-violators, weighted by how often j was tried):
        a round that got far is in an easy stretch, and without the constraint the few deep
        observations make the curve jagged. At worst the fit is one pooled rate (a geometric
        curve). The prior (`prior_weight` rounds at `prior_hazard`) counts at position 1 only.
        Positions never tried take the deepest fitted hazard, at least `untried_hazard`: after a
        few rounds that all passed, the fit says drafts never fail, and trusting that beyond the
        depth tried overshoots with drafters whose drafts are not free.
        """
        tried, failed = np.zeros(self.max_tokens + 1), np.zeros(self.max_tokens + 1)
        for proposed, accepted in self._curve(cls).outcomes:
            last = min(accepted + 1 if accepted < proposed else proposed, self.max_tokens)  # deepest tested
            tried[:last] += 1
            if accepted < min(proposed, self.max_tokens):
                failed[accepted] += 1
        tried[0] += self.prior_weight
        failed[0] += self.prior_weight * self.prior_hazard
        blocks: list[list[float]] = []  # [failures, tries, positions] per pooled run
        for f, t in zip(failed, tried):
            if t == 0:
                break  # tried counts only fall with depth: the rest was never tried
            blocks.append([f, t, 1])
            while len(blocks) > 1 and blocks[-2][0] * blocks[-1][1] < blocks[-1][0] * blocks[-2][1]:
                f2, t2, n2 = blocks.pop()
                blocks[-1] = [blocks[-1][0] + f2, blocks[-1][1] + t2, blocks[-1][2] + n2]
        hazard = np.concatenate([np.full(n, f / t) for f, t, n in blocks])
        untried = np.full(self.max_tokens - hazard.size, max(hazard[-1], self.untried_hazard))
        hazard = np.concatenate([hazard, untried])
        return np.cumprod(1.0 - hazard)

    def costs(self, group: int = 0) -> tuple[float, float, float, float] | None:
        """(t_step, t_extra, t_round, t_draft) in seconds: verifying w positions takes t_step +
        (w - 1) * t_extra, and drafting k tokens of cost group `group` t_round + k * t_draft
        (t_round: a draft model catching up on the tokens accepted last round). None until two
        widths were each timed twice, or before the group's first draft."""
        verify = _fit([*self.plain, *self.verifies])
        drafts = self._drafts(group)
        if verify is None or not drafts:
            return None
        t_step, t_extra = verify[0] + verify[1], max(verify[1], 0.0)  # intercept at width 1
        draft = _fit(drafts)
        if draft is None or draft[1] <= 0:
            return max(t_step, 1e-9), t_extra, 0.0, float(np.median([s / k for k, s in drafts]))
        return max(t_step, 1e-9), t_extra, max(draft[0], 0.0), draft[1]

    def lengths(self, classes: Sequence[int]) -> list[int]:
        """This round's draft length for each row, by its class (one decision per class)."""
        chosen = {cls: self.length(cls) for cls in dict.fromkeys(classes)}
        return [chosen[cls] for cls in classes]

    def length(self, cls: int = 0) -> int:
        """This round's draft length for rows of class `cls`; call once per class and round."""
        if self.fixed is not None:
            return self.fixed
        fit = self.costs(cls // COST_GROUP)
        if fit is None:  # two probe lengths in turn until both widths are timed
            return self.probe if len(self._drafts(cls // COST_GROUP)) % 2 == 0 else max(self.probe // 2, 1)
        t_step, t_extra, t_round, t_draft = fit
        ks = np.arange(self.max_tokens + 1)
        tokens = 1.0 + np.concatenate([[0.0], np.cumsum(self.survival(cls))])
        seconds = t_step + (ks > 0) * t_round + ks * (t_extra + t_draft)
        best = int(np.argmax(tokens * t_step / seconds))
        curve = self._curve(cls)
        if best == 0:
            curve.idle_rounds += 1
            if curve.idle_rounds < curve.idle_interval:
                return 0
            curve.idle_rounds, curve.idle_interval = 0, min(2 * curve.idle_interval, 256)  # back off
            return 2
        curve.idle_rounds, curve.idle_interval = 0, 16
        curve.drafting_rounds += 1
        return min(best + 2, self.max_tokens) if curve.drafting_rounds % 8 == 0 else best

    def update(self, rows: Sequence[tuple[int, int]], draft_s: float, verify_s: float,
               classes: Sequence[int] | None = None) -> None:
        """Record one round: (drafts proposed, drafts accepted) per active row with its class
        (default 0), and the seconds spent drafting and verifying. A round where no row had a
        draft is a plain step."""
        classes = [0] * len(rows) if classes is None else classes
        drafted = [(row, cls) for row, cls in zip(rows, classes) if row[0] > 0]
        if not drafted:
            self.plain.append((1, verify_s))
            return
        width, widest = max((p, cls) for (p, _), cls in drafted)  # sequential draft steps, extra positions
        self.verifies.append((width + 1, verify_s))
        self._drafts(widest // COST_GROUP).append((width, draft_s))
        for row, cls in drafted:
            self._curve(cls).outcomes.append(row)


@dataclass
class _Curve:
    """One class's recent outcomes, (proposed, accepted) per row and round, and its idle state."""

    outcomes: deque
    idle_rounds: int = 0
    idle_interval: int = 16  # plain rounds between probes while drafting does not pay
    drafting_rounds: int = 0


def _fit(points, need: int = 2) -> tuple[float, float] | None:
    """Line y = a + b x through (x, y) timings: per x timed at least `need` times its median y
    (the faster of two: interference on a shared machine only adds time), then Theil-Sen (b: the
    median slope over pairs of those x, a: the median of y - b x). A descheduled round moves
    neither. None with fewer than two such x."""
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = np.array([x for x, ys in by_x.items() if len(ys) >= need], dtype=float)
    if xs.size < 2:
        return None
    ys = np.array([np.median(by_x[x]) if len(by_x[x]) > 2 else min(by_x[x]) for x in xs])
    dx, dy = xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]
    apart = dx > 0
    slope = float(np.median(dy[apart] / dx[apart]))
    return float(np.median(ys - slope * xs)), slope
