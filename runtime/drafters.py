"""Drafters for speculative decoding: what proposes the tokens the target then verifies.

The Drafter base class, prompt lookup, a draft model, and self-speculation on the target's
first layers; `speculative.make_drafter` builds one from a mode string.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Cache, require_staged
from .early_exit import apply_adapter, read_exit_file
from .sampling import Sampler, SamplingParams


@dataclass
class Draft:
    """Proposed tokens for one sequence; `probs[i]` is the dense draft distribution q_i
    (None: the drafter is deterministic, q is a point mass on the token).

    Attributes:
        cut: q of a proposed token removed because a grammar forbids it (structured output);
            sampled verification then draws the token at its position from the residual, as if
            the target had rejected it there.
    """

    tokens: list[int] = field(default_factory=list)
    probs: list[np.ndarray] | None = None
    cut: np.ndarray | None = None


class Drafter:
    """Proposes draft tokens. Subclass it for a drafter of your own and pass the object as
    `generate(..., speculative=drafter)`: implement `propose`; `start`, `classes`, `use_backend`
    and `target_forward` have defaults."""

    # Verifies in place of the backend's forward (same 4 arguments and logits [B, N, vocab]) when
    # the drafter already ran part of the target (self-speculation); None: the backend's forward.
    target_forward: Callable[[np.ndarray, Cache, np.ndarray, np.ndarray], np.ndarray] | None = None
    # Why this drafter cannot make its target faster (make_drafter sets it for a draft model no
    # lighter than the target), or None: an adaptive draft length leaves such a drafter out.
    cannot_pay: str | None = None

    def use_backend(self, backend) -> None:
        """Called before `start` with the backend the target's steps run on in this generation
        (its invariant form when exact speculation needs it): a drafter that runs the target's
        own layers runs them there. Default: nothing."""

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache: Cache | None = None) -> None:
        """Called once per generation with each row's prompt, the sampling settings and the
        target's KV cache. Default: nothing to prepare."""

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        """One Draft of up to lengths[b] tokens continuing each contexts[b] (prompt + generated so
        far, its last token not yet in the target's cache)."""
        raise NotImplementedError(f"{type(self).__name__} must implement propose(contexts, lengths)")

    def classes(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        """Called before `propose` each round: sorts rows by how likely their drafts are to pass;
        the draft policy keeps one acceptance curve per class. Default: every row is class 0."""
        return [0] * len(contexts)


class LookupDrafter(Drafter):
    """Prompt lookup: copy what followed an earlier occurrence of the last n tokens.

    The longest n (up to `max_ngram`) with an earlier occurrence is used; among its
    occurrences, the one whose agreement with the recent text reaches furthest back (the
    match length), the most recent on a tie. A copy that has already run for a while tends to
    go on (editing, quoting, code), while a match on a couple of tokens often breaks at once:
    a row drafts at most `slack` tokens more than its match length.

    `classes` tells the draft-length policy how good a row's match is (0: none, 1: a single
    token, 2: longer), so it learns one acceptance curve per kind: single-token matches are
    right far less often, and mixed in they would make the policy draft too little after good
    matches.

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


class ModelDrafter(Drafter):
    """A smaller model (any package with the same vocabulary, on any backend) drafts.

    Its KV cache follows the target's accepted tokens: each round it rolls back to the
    longest prefix it shares with the context and feeds only what is new.

    With a `window`, the draft sees only each context's first `sink` tokens (the chat template's
    head and the start of the request, an attention sink as in StreamingLLM) followed by its
    recent part, from `offset[row]` on, at consecutive positions: a draft needs good guesses, not
    the exact past (the target verifies), so it skips most of a long prompt's prefill. When a
    row's view has grown to twice `window` tokens, or would run out of the draft's cache, it
    restarts from the last `window` tokens (one prefill of that size).

    Args:
        engine: the draft model.
        min_confidence: a row stops drafting after a token the draft itself gives less than this
            probability (its top-1 probability when greedy): such drafts are mostly rejected, and
            each costs a draft step plus a verified position. 0 drafts every asked position.
        window: tokens of recent context the draft reads (None: all of it).
        sink: first tokens of the context the windowed draft always reads.
    """

    def __init__(self, engine, min_confidence: float = 0.0, window: int | None = None, sink: int = 32) -> None:
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        if window is not None and not (1 <= window and 2 * window + sink < engine.max_context):
            raise ValueError(f"window must be in [1, {(engine.max_context - sink) // 2}) for a draft of context "
                             f"{engine.max_context} and sink {sink}, got {window}")
        self.engine, self.min_confidence, self.window, self.sink = engine, min_confidence, window, sink
        self.cache = None
        self.cached: list[list[int]] = []
        self.offset: list[int] = []  # where each row's window starts in its context

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache: Cache | None = None) -> None:
        self.params = params
        # the draft engine's own cache: kept between generations of the same batch size
        self.cache = self.engine.fresh_cache(len(prompts))
        if self.cache is cache:
            raise ValueError("a model cannot draft for itself: its KV cache is the target's; "
                             "use speculative='self:K' for self-speculation")
        # prompt processing belongs with the target's prefill, not in the first round's draft time
        self.offset = [self._start(len(p)) for p in prompts]
        self.cached = [self._view(row, p) for row, p in enumerate(prompts)]
        self.engine.prefill(self.cached, self.cache)
        self.samplers = _draft_samplers(params, len(prompts), self.engine.manifest.model.vocab_size)

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        batch, lengths = len(contexts), list(lengths)
        drafts = [Draft(probs=None if self.params.greedy else []) for _ in range(batch)]
        # feed each row's uncached suffix (right-padded), then draft one token at a time
        new = []
        for row, context in enumerate(contexts):
            self._slide(row, context, lengths[row])
            context = self._view(row, context)
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

    def _start(self, length: int) -> int:
        """Where the window of a context of `length` tokens starts (0: the whole context)."""
        if not self.window or length <= self.window + self.sink:
            return 0
        return length - self.window

    def _view(self, row: int, context: Sequence[int]) -> list[int]:
        """What the draft reads of a row's context: its sink and its window, or all of it."""
        start = self.offset[row]
        return list(context[:self.sink]) + list(context[start:]) if start else list(context)

    def _slide(self, row: int, context: Sequence[int], drafts: int) -> None:
        """Restart a row's window from its last `window` tokens when it has grown too long."""
        if not self.window:
            return
        seen = len(context) - self.offset[row] + (self.sink if self.offset[row] else 0)
        if seen >= 2 * self.window + self.sink or seen + drafts >= self.cache.max_len:
            self.offset[row] = self._start(len(context))
            self.cached[row] = []  # the rollback in propose empties the row's cache


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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class SelfDrafter(Drafter):
    """LayerSkip-style self-speculation: the target's first layers plus its LM head draft.

    Needs the onnx backend (a StagedBackend) and a package with a stage boundary at the exit
    layer and the head in a stage of its own (`edge-run export --exit-layers K`). Drafting writes
    the KV of layers < K for the pending token and every draft into the target's cache at their
    final positions; the verifier then runs only layers >= K on the drafts' hidden states, so that
    KV is reused, not recomputed, and no weights are duplicated.

    Raises:
        ValueError: the backend runs the whole model in one call, or the package has no such stages.
    """

    def __init__(self, engine, layer: int):
        self.backend = require_staged(engine.backend, f"self-speculation (self:{layer})")
        stages = engine.manifest.stages
        prefix = [k for k, st in enumerate(stages) if st.end_layer == layer and not st.has_head]
        num_layers = engine.manifest.model.num_layers
        if not prefix or stages[-1].first_layer != stages[-1].end_layer or not 0 < layer < num_layers:
            bounds = [st.end_layer for st in stages[:-1]]
            raise ValueError(f"self:{layer} needs a stage boundary at layer {layer} and a separate head stage; "
                             f"this package has boundaries {bounds}. Export with --exit-layers {layer}")
        self.engine = engine
        files = [e["file"] for e in engine.manifest.exits if e["layer"] == layer]
        # an exit adapter fitted at export (see export.exits) makes the drafts agree far more often
        hidden = engine.manifest.model.hidden_size
        self.adapter = read_exit_file(engine.package_dir, files[0], hidden)["adapter"] if files else None
        self.prefix = range(prefix[0] + 1)
        self.suffix = range(prefix[0] + 1, len(stages))
        self.head = range(len(stages) - 1, len(stages))

    def use_backend(self, backend) -> None:
        self.backend = backend  # the drafted layers' KV must come from the same kernels as verification's

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache: Cache | None = None) -> None:
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

    def target_forward(self, tokens: np.ndarray, cache: Cache, counts: np.ndarray,
                       positions: np.ndarray) -> np.ndarray:
        """Verify: only the layers after the exit run, on the drafts' hidden states."""
        hidden = np.ascontiguousarray(self.hidden[:, :tokens.shape[1]])
        return self.backend.forward(hidden, cache, counts, positions, self.suffix)
