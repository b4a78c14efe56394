"""Speculative decoding: drafters, lossless verification, and the draft-length policy.

A drafter proposes up to k tokens per sequence; the target scores the pending token plus
the drafts in one pass and keeps the longest acceptable prefix. Greedy verification keeps a
draft only if it equals the target's argmax, so the output is token-identical to plain greedy
decoding. Sampled verification accepts a draft d with probability min(1, p(d)/q(d)) and
otherwise samples from the normalised residual max(0, p - q) (Leviathan et al. 2023), which
leaves the target distribution p unchanged for any draft distribution q.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from .early_exit import apply_adapter
from .sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Draft:
    """Proposed tokens for one sequence; `probs[i]` is the dense draft distribution q_i
    (None: the drafter is deterministic, q is a point mass on the token)."""

    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] | None = None


class Drafter(Protocol):
    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache) -> None:
        """Called once per generation with each row's prompt and the target's KV cache."""

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        """Up to lengths[b] draft tokens continuing contexts[b] (prompt + generated so far)."""

    # optional: classes(contexts) -> list[int], called before propose each round, sorts rows by
    # how likely their drafts are to pass (see AdaptiveDraftLength); without it every row is class 0


@runtime_checkable
class DraftPolicy(Protocol):
    """Decides how many tokens each row drafts per round (AdaptiveDraftLength is the default;
    pass another as `generate(..., draft_tokens=policy)`). Lengths are upper bounds: the engine
    caps them by the tokens left, and a drafter may propose fewer."""

    def lengths(self, classes: Sequence[int]) -> list[int]:
        """Draft lengths for the active rows this round, given each row's class (see Drafter)."""

    def update(self, rows: Sequence[tuple[int, int]], draft_s: float, verify_s: float,
               classes: Sequence[int] | None = None) -> None:
        """The round's (drafts proposed, drafts accepted) per active row, seconds spent drafting
        and verifying, and the rows' classes."""


def verify(sampler: Sampler, draft: Draft, target_logits: np.ndarray) -> list[int]:
    """Accept a prefix of `draft` against target logits [len(draft)+1, vocab].

    Returns:
        The accepted draft tokens followed by one token from the target (the correction at
        the first rejection, or a bonus token when every draft was accepted).
    """
    out: list[int] = []
    for i, token in enumerate(draft.tokens):
        logits = sampler.penalized(target_logits[i])
        if sampler.params.greedy:
            best = int(np.argmax(logits))
            if best != token:
                out.append(best)
                sampler.observe([best])
                return out
        else:
            p = sampler.dense(logits)
            q = draft.probs[i] if draft.probs is not None else _point_mass(token, p.size)
            if sampler.rng.random() * q[token] >= p[token]:  # reject with prob 1 - min(1, p/q)
                residual = np.maximum(p - q, 0.0)
                out.append(sampler.draw_dense(residual / residual.sum()))
                sampler.observe(out[-1:])
                return out
        out.append(token)
        sampler.observe([token])
    out.append(sampler(target_logits[len(draft.tokens)]))
    return out


def _point_mass(token: int, size: int) -> np.ndarray:
    q = np.zeros(size)
    q[token] = 1.0
    return q


class LookupDrafter:
    """Prompt lookup: copy what followed an earlier occurrence of the last n tokens.

    The longest n (up to `max_ngram`) with an earlier occurrence is used; among its
    occurrences, the one whose agreement with the recent text reaches furthest back (the
    match length), the most recent on a tie. A copy that has already run for a while tends to
    go on (editing, quoting, code), while a match on a couple of tokens often breaks at once:
    a row drafts at most `slack` tokens more than its match length.

    `classes` tells the draft-length policy how good a row's match is (0: none, 1: a single
    token, 2: longer), so it learns one acceptance curve per kind: single-token matches are
    right far less often, and mixing them in made the policy draft too little after good
    matches. Offline over recorded greedy outputs (fp32 SmolLM2, 8 prompts x 128 tokens),
    this and picking the longest match took the edit set from x2.03 to x2.16 and MT-Bench
    from x1.24 to x1.28 against the previous drafter (most recent 2-3-gram match, one curve);
    on 16 other prompts per set, less: x1.94 to x1.96 and x1.31 to x1.35.

    Args:
        max_ngram: longest suffix to match (tried first); min_ngram: shortest; slack: drafts
            allowed beyond the match length (None: no bound but the policy's).
    """

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, slack: int | None = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if slack is not None and slack < 1:
            raise ValueError(f"slack must be >= 1 or None, got {slack}")
        self.max_ngram, self.min_ngram, self.slack = max_ngram, min_ngram, slack

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        pass

    def classes(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        """Per row: 0 without a match, 1 for a single-token match, 2 for a longer one."""
        return [min(match[1], 2) if match else 0 for match in map(self.match, contexts)]

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        drafts = []
        for context, k in zip(contexts, lengths):
            match = self.match(context) if k > 0 else None
            if match is None:
                drafts.append(Draft())
                continue
            start, length = match
            if self.slack is not None:
                k = min(k, length + self.slack)
            drafts.append(Draft(list(context[start:start + k])))
        return drafts

    def match(self, context: Sequence[int]) -> tuple[int, int] | None:
        """(where the copy starts, match length) for the best earlier occurrence, or None."""
        context = np.asarray(context)
        for n in range(min(self.max_ngram, context.size - 1), self.min_ngram - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(context[:-1], n)
            hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
            if hits.size:
                lengths = _match_lengths(context, hits, n)
                best = hits.size - 1 - int(np.argmax(lengths[::-1]))  # the longest; latest on a tie
                return int(hits[best]) + n, int(lengths[best])
        return None


def _match_lengths(context: np.ndarray, hits: np.ndarray, n: int, longest: int = 64) -> np.ndarray:
    """How far each n-token match at `hits` agrees with the end of `context`, counting
    backwards from its last token (at most `longest` tokens)."""
    lengths = np.full(hits.size, n)
    live = np.ones(hits.size, dtype=bool)
    for back in range(1, longest - n + 1):
        earlier = hits - back
        live &= earlier >= 0
        if not live.any():
            break
        live[live] = context[earlier[live]] == context[-n - back]
        lengths += live
    return lengths


class ModelDrafter:
    """A smaller model (any package with the same vocabulary, on any backend) drafts.

    Its KV cache follows the target's accepted tokens: each round it rolls back to the
    longest prefix it shares with the context and feeds only what is new.

    Args:
        engine: the draft model.
        min_confidence: a row stops drafting after a token the draft itself gives less than this
            probability (its top-1 probability when greedy): such drafts are mostly rejected, and
            each costs a draft step plus a verified position. 0 drafts every asked position.
    """

    def __init__(self, engine, min_confidence: float = 0.0) -> None:
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.engine, self.min_confidence = engine, min_confidence
        self.cache = None
        self.cached: list[list[int]] = []

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        self.params = params
        # the draft engine's own cache: kept between generations of the same batch size
        self.cache = self.engine.fresh_cache(len(prompts))
        if self.cache is cache:
            raise ValueError("a model cannot draft for itself: its KV cache is the target's; "
                             "use speculative='self:K' for self-speculation")
        # prompt processing belongs with the target's prefill, not in the first round's draft time
        self.engine.prefill(prompts, self.cache)
        self.cached = [list(p) for p in prompts]
        self.samplers = _draft_samplers(params, len(prompts), self.engine.manifest.model.vocab_size)

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        batch, lengths = len(contexts), list(lengths)
        drafts = [Draft(probs=None if self.params.greedy else []) for _ in range(batch)]
        # feed each row's uncached suffix (right-padded), then draft one token at a time
        new = []
        for row, context in enumerate(contexts):
            keep = _common_prefix(self.cached[row], context)
            keep = min(keep, len(context) - 1)  # always feed at least the last token
            self.cached[row] = list(context[:keep])
            new.append(list(context[keep:]))
        self.cache.rollback(np.array([len(c) for c in self.cached], dtype=np.int32))
        for step in range(max(lengths, default=0)):
            live = np.array([len(n) > 0 and lengths[row] > step for row, n in enumerate(new)])
            if not live.any():
                break
            width = max(len(n) for n in new)
            tokens = np.zeros((batch, width), dtype=np.int64)
            for row, n in enumerate(new):
                tokens[row, :len(n)] = n
            counts = np.array([len(n) if live[row] else 0 for row, n in enumerate(new)], dtype=np.int32)
            logits = self.engine.backend.forward(tokens, self.cache, counts, np.maximum(counts - 1, 0)[:, None])[:, 0]
            for row in np.flatnonzero(live):
                self.cached[row] += new[row]
                self.samplers[row].observe(new[row])  # penalty history may keep rolled-back tokens: it only shapes q
                new[row] = [_draft_token(self.samplers[row], logits[row], drafts[row])]
                if self.min_confidence and _confidence(logits[row], drafts[row]) < self.min_confidence:
                    lengths[row] = step + 1  # keep this draft, stop the row after it
            for row in np.flatnonzero(~live):
                new[row] = []
        return drafts


def _draft_token(sampler: Sampler, logits: np.ndarray, draft: Draft) -> int:
    """Pick the next draft token (argmax, or a sample from q recorded in `draft.probs`)."""
    penalized = sampler.penalized(logits)
    if sampler.params.greedy:
        token = int(np.argmax(penalized))
    else:
        q = sampler.dense(penalized)
        token = sampler.draw_dense(q)
        draft.probs.append(q)
    draft.tokens.append(token)
    return token


def _confidence(logits: np.ndarray, draft: Draft) -> float:
    """The draft's probability of its last token: q when sampled, else the softmax top-1."""
    if draft.probs:
        return float(draft.probs[-1][draft.tokens[-1]])
    return float(1.0 / np.exp(logits - logits.max()).sum())


def _draft_samplers(params: SamplingParams, batch: int, vocab: int) -> list[Sampler]:
    seeds = np.random.SeedSequence([params.seed or 0, 7919]).spawn(batch)
    return [Sampler(params, vocab, np.random.default_rng(s)) for s in seeds]


class SelfDrafter:
    """LayerSkip-style self-speculation: the target's first layers plus its LM head draft.

    Needs a package with a stage boundary at the exit layer and the head in a stage of its
    own (`edge-run export --exit-layers K`). Drafting writes the KV of layers < K for the
    pending token and every draft into the target's cache at their final positions; the
    verifier then runs only layers >= K on the drafts' hidden states, so that KV is reused,
    not recomputed, and no weights are duplicated.
    """

    def __init__(self, engine, layer: int):
        stages = engine.manifest.stages
        prefix = [k for k, st in enumerate(stages) if st.end_layer == layer and not st.has_head]
        if not prefix or not stages[-1].first_layer == stages[-1].end_layer or not 0 < layer < engine.manifest.model.num_layers:
            bounds = [st.end_layer for st in stages[:-1]]
            raise ValueError(f"self:{layer} needs a stage boundary at layer {layer} and a separate head stage; "
                             f"this package has boundaries {bounds}. Export with --exit-layers {layer}")
        self.engine, self.backend = engine, engine.backend
        files = [e["file"] for e in engine.manifest.exits if e["layer"] == layer]
        # an exit adapter fitted at export (see export.exits) makes the drafts agree far more often
        self.adapter = np.load(engine.package_dir / files[0])["adapter"] if files else None
        self.prefix = range(0, prefix[0] + 1)
        self.suffix = range(prefix[0] + 1, len(stages))
        self.head = range(len(stages) - 1, len(stages))

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        self.params, self.cache = params, cache
        self.samplers = _draft_samplers(params, len(prompts), self.engine.manifest.model.vocab_size)
        for sampler, prompt in zip(self.samplers, prompts):
            sampler.observe(prompt)

    def _prefix(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        ones = np.ones(len(tokens), dtype=np.int32)
        return self.backend.forward(tokens[:, None], self.cache, ones, None, self.prefix, positions).numpy()

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        batch, k = len(contexts), max(lengths)
        drafts = [Draft(probs=None if self.params.greedy else []) for _ in range(batch)]
        pending = np.array([c[-1] for c in contexts], dtype=np.int64)
        start = self.cache.lengths.copy()  # the pending token's slot (0 for finished rows)
        tokens, hiddens = pending, []
        zeros = np.zeros((batch, 1), dtype=np.int64)
        for i in range(k + 1):
            # rows that drafted less keep re-writing their last slot, which verification overwrites
            positions = start + np.minimum(i, lengths)
            hiddens.append(self._prefix(tokens, positions))  # [B, 1, H]
            if i == k:
                break  # the last draft only needs its hidden state, for the bonus position
            exit_hidden = hiddens[-1] if self.adapter is None else apply_adapter(hiddens[-1], self.adapter)
            logits = self.backend.forward(exit_hidden, self.cache, np.ones(batch, np.int32), zeros,
                                          self.head, positions)[:, 0]
            tokens = tokens.copy()
            for row in range(batch):
                if i < lengths[row]:
                    tokens[row] = _draft_token(self.samplers[row], logits[row], drafts[row])
                    self.samplers[row].observe(tokens[row:row + 1])
        self.hidden = np.concatenate(hiddens, axis=1)  # hidden of pending + drafts, per row
        return drafts

    def target_forward(self, tokens: np.ndarray, cache, counts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Verify: only the layers after the exit run, on the drafts' hidden states."""
        hidden = np.ascontiguousarray(self.hidden[:, :tokens.shape[1]])
        return self.backend.forward(hidden, cache, counts, positions, self.suffix)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class AdaptiveDraftLength:
    """Chooses the draft length from measured acceptance and costs; 0 when drafting does not pay.

    Acceptance is modelled by its survival curve: S(j), the chance that the first j drafts of a
    round are all accepted, estimated per position from recent rounds (Kaplan-Meier: a round that
    accepted m of k drafts tested positions 1..m+1, or 1..k when all passed, and failed at m+1).
    Drafts do not fail independently: a draft model agrees with its target in runs, and a prompt
    lookup either copies a long passage or misses at once, so a geometric model S(j) = a^j
    drafts too little (lookup on editing prompts: 6 drafts per round where 8-12 pay). See
    `survival` for the fit; positions never tried take the deepest estimate but fail at least
    `untried_hazard` of the time, and every 8th round probes 2 deeper, so a longer length is
    found when the curve stays flat, and only as fast as a wasted draft is cheap.

    A drafter may sort its rows into classes before drafting (`Drafter.classes`: a lookup's
    match length); each class has its own curve and its own length, while costs are shared.

    Costs: a round of k drafts costs its drafting, fitted as t_round + k * t_draft (a draft model
    first catches up on the tokens accepted last round), plus one verification of k + 1
    positions, fitted as t_step + k * t_extra (plain steps are width 1), both over recent rounds
    from the median time per width (see `_fit`): on a shared CPU one descheduled step is several
    times the usual, and a mean would switch speculation off on it. Until two widths are each
    timed twice, rounds of `probe` and `probe // 2` drafts alternate: a plain warm-up costs what
    those rounds would have gained (3 plain steps: ~6% of a 128-token lookup generation, and
    plain rounds among the probes ~8% of an INT8 draft's), and the verification fit
    extrapolates to a plain step.

    k drafts yield 1 + S(1) + ... + S(k) tokens per round; the k with the best tokens per second
    is used. When that is k = 0 (plain decoding), a probe round of 2 drafts runs after 16 plain
    rounds of that class, so a change in the text can switch speculation back on; each probe
    that does not doubles the wait (up to 256), since a probe of an expensive drafter
    (self-speculation) costs several steps.
    """

    def __init__(self, max_tokens: int = 16, fixed: int | None = None, window: int = 64, probe: int = 4,
                 prior_hazard: float = 0.4, prior_weight: float = 0.5, untried_hazard: float = 0.1):
        self.max_tokens, self.fixed, self.probe, self.window = max_tokens, fixed, probe, window
        self.prior_hazard, self.prior_weight, self.untried_hazard = prior_hazard, prior_weight, untried_hazard
        # timings, (k, s) of drafting and (width, s) of verifying; plain steps kept apart, so a long
        # plain stretch does not push the drafting rounds out of the window
        self.drafts, self.verifies, self.plain = deque(maxlen=window), deque(maxlen=window), deque(maxlen=window)
        self.curves: dict[int, _Curve] = {}

    def _curve(self, cls: int) -> "_Curve":
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
        few rounds that all passed, the fit says drafts never fail, and trusting that beyond
        the depth tried sent an INT8 draft model (a draft step costs half a target step) to 16
        drafts at once, where a fixed 8 did 7% better (MT-Bench, offline over recorded greedy
        outputs; with this floor the two are level, and lookup, whose drafts cost nothing, is
        unchanged).
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

    def costs(self) -> tuple[float, float, float, float] | None:
        """(t_step, t_extra, t_round, t_draft): verifying w positions takes t_step + (w - 1) *
        t_extra, and drafting k tokens t_round + k * t_draft (t_round: a draft model catching up
        on the tokens accepted last round). None until two widths were each timed twice."""
        verify = _fit([*self.plain, *self.verifies])
        if verify is None or not self.drafts:
            return None
        t_step, t_extra = verify[0] + verify[1], max(verify[1], 0.0)  # intercept at width 1
        draft = _fit(self.drafts)
        if draft is None or draft[1] <= 0:
            return max(t_step, 1e-9), t_extra, 0.0, float(np.median([s / k for k, s in self.drafts]))
        return max(t_step, 1e-9), t_extra, max(draft[0], 0.0), draft[1]

    def lengths(self, classes: Sequence[int]) -> list[int]:
        """This round's draft length for each row, by its class (one decision per class)."""
        chosen = {cls: self.length(cls) for cls in dict.fromkeys(classes)}
        return [chosen[cls] for cls in classes]

    def length(self, cls: int = 0) -> int:
        """This round's draft length for rows of class `cls`; call once per class and round."""
        if self.fixed is not None:
            return self.fixed
        fit = self.costs()
        if fit is None:  # two probe lengths in turn until both widths are timed
            return self.probe if len(self.drafts) % 2 == 0 else max(self.probe // 2, 1)
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
        width = max(p for (p, _), _ in drafted)  # sequential draft steps, and extra verified positions
        self.verifies.append((width + 1, verify_s))
        self.drafts.append((width, draft_s))
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


@dataclass
class SpeculativeStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    histogram: dict[int, int] = field(default_factory=dict)  # accepted length -> rounds

    def record(self, proposed: int, accepted: int) -> None:
        if proposed:
            self.rounds += 1
            self.proposed += proposed
            self.accepted += accepted
            self.histogram[accepted] = self.histogram.get(accepted, 0) + 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.rounds if self.rounds else 0.0


def make_drafter(spec: str | Drafter | None, target, **load_kwargs) -> Drafter | None:
    """Build a drafter from "lookup", "draft:PATH" (a package, checkpoint or model name),
    "self:K" (the target's first K layers) or pass an object through. Refuses a draft whose vocabulary differs from the target's."""
    if spec is None or not isinstance(spec, str):
        return spec
    kind, _, arg = spec.partition(":")
    if kind == "lookup":
        return LookupDrafter(*(int(n) for n in arg.split(",")) if arg else ())
    if kind == "self":
        if not arg.isdigit():
            raise ValueError(f"--speculative self:K needs the number of draft layers K, got {arg!r}")
        return SelfDrafter(target, int(arg))
    if kind == "draft":
        from .engine import load

        if not arg:
            raise ValueError("--speculative draft:PATH needs a package, checkpoint or model name")
        draft = load(arg, **load_kwargs)
        ours, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if ours != theirs:
            raise ValueError(f"draft {arg} has a different vocabulary ({len(theirs)} tokens vs the target's "
                             f"{len(ours)}); a draft must share the target's tokenizer")
        return ModelDrafter(draft)
    raise ValueError(f"unknown speculative mode {spec!r}; use lookup, lookup:MAX_NGRAM[,MIN_NGRAM], "
                     f"draft:PATH or self:K")
