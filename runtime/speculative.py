"""Speculative decoding as the engine runs it: the mode (parse_speculative, make_drafter),
lossless verification, and the figures of a generation.

A drafter (see drafters.py) proposes up to k tokens per sequence; the target scores the pending
token plus the drafts in one pass and keeps the longest acceptable prefix. Greedy verification
keeps a draft only if it equals the target's argmax, so the output is token-identical to plain
greedy decoding. Sampled verification accepts a draft d with probability min(1, p(d)/q(d)) and
otherwise samples from the normalised residual max(0, p - q) (Leviathan et al. 2023), which
leaves the target distribution p unchanged for any draft distribution q.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .auto_speculation import AutoDrafter
from .constraints import RowConstraint, choose
from .drafters import Draft, Drafter, LookupDrafter, ModelDrafter, SelfDrafter
from .sampling import Sampler
from .suffix_lookup import SuffixDrafter

SPECULATIVE_FORMS = "lookup, lookup:MAX_NGRAM[,MIN_NGRAM], suffix, draft:PATH, self:K, auto or auto:PATH"
# context tokens a draft model reads (ModelDrafter's window): it skips the rest of a long prompt
DRAFT_WINDOW = 512
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeculativeSpec:
    """A checked speculative mode (see parse_speculative).

    Attributes:
        kind: "lookup", "suffix", "draft", "self" or "auto".
        arg: lookup: () or (max_ngram,) or (max_ngram, min_ngram); draft: the package, checkpoint
            or model name (str); self: K, the number of draft layers (int); auto: () or the draft
            model (str); suffix: ().
    """

    kind: str
    arg: tuple[int, ...] | str | int = ()


def parse_speculative(text: str) -> SpeculativeSpec:
    """Check a mode string: lookup, lookup:MAX_NGRAM[,MIN_NGRAM], suffix, draft:PATH, self:K, auto
    or auto:PATH.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    kind, colon, arg = text.partition(":")
    if kind == "lookup":
        parts = arg.split(",") if colon else []
        ngrams = tuple(int(p) for p in parts if p.isdecimal())
        if len(ngrams) != len(parts) or len(parts) > 2 or (ngrams and not 1 <= ngrams[-1] <= ngrams[0]):
            raise ValueError(f"bad speculative mode {text!r}: lookup takes MAX_NGRAM[,MIN_NGRAM] with "
                             f"1 <= MIN_NGRAM <= MAX_NGRAM; use {SPECULATIVE_FORMS}")
        return SpeculativeSpec("lookup", ngrams)
    if kind == "self":
        if not arg.isdecimal() or int(arg) < 1:
            raise ValueError(f"bad speculative mode {text!r}: self:K needs the number of draft layers K >= 1; "
                             f"use {SPECULATIVE_FORMS}")
        return SpeculativeSpec("self", int(arg))
    if kind == "suffix" and not colon:
        return SpeculativeSpec("suffix")
    if kind == "auto":
        if colon and not arg:
            raise ValueError(f"bad speculative mode {text!r}: auto:PATH needs a draft package, checkpoint or "
                             f"model name (or plain auto); use {SPECULATIVE_FORMS}")
        return SpeculativeSpec("auto", arg if colon else ())
    if kind == "draft":
        if not arg:
            raise ValueError(f"bad speculative mode {text!r}: draft:PATH needs a package, checkpoint or model "
                             f"name; use {SPECULATIVE_FORMS}")
        return SpeculativeSpec("draft", arg)
    raise ValueError(f"unknown speculative mode {text!r}; use {SPECULATIVE_FORMS}")


def make_drafter(spec: str | SpeculativeSpec | Drafter | None, target, **load_kwargs) -> Drafter | None:
    """The drafter for a mode string or SpeculativeSpec ("draft:" opens its model with
    `target.open_model(path, **load_kwargs)`); a Drafter object or None passes through.

    Raises:
        ValueError: a bad mode (see parse_speculative), a draft whose vocabulary differs from the
            target's, or a package that cannot self-speculate at K.
    """
    if spec is None or isinstance(spec, Drafter):
        return spec
    if isinstance(spec, str):
        spec = parse_speculative(spec)
    if not isinstance(spec, SpeculativeSpec):
        raise TypeError(f"speculative must be a mode string ({SPECULATIVE_FORMS}), a SpeculativeSpec or a "
                        f"Drafter subclass instance, got {type(spec).__name__}")
    if spec.kind == "lookup":
        return LookupDrafter(*spec.arg)
    if spec.kind == "suffix":
        return SuffixDrafter()
    if spec.kind == "self":
        return SelfDrafter(target, spec.arg)
    if spec.kind == "auto":
        model = _model_drafter(spec.arg, target, load_kwargs) if spec.arg else None
        why = model and _cannot_pay(model.engine, target)
        if why:
            log.warning("auto leaves draft %s out: %s; it drafts by lookup only", spec.arg, why)
            model = None
        return AutoDrafter(SuffixDrafter(), model)
    drafter = _model_drafter(spec.arg, target, load_kwargs)
    drafter.cannot_pay = _cannot_pay(drafter.engine, target)
    if drafter.cannot_pay:
        log.warning("draft %s cannot make decoding faster: %s; with the adaptive draft length (the default) "
                    "generations decode plainly without it, a fixed length (draft_tokens=N, --draft-tokens N) "
                    "runs it anyway; use a smaller draft, or lookup, suffix or auto", spec.arg, drafter.cannot_pay)
    return drafter


def _cannot_pay(draft, target) -> str | None:
    """Why a draft model cannot make decoding faster, or None when its bytes allow it. A decode step on these
    small-batch engines costs about its weights' bytes, and a draft must cost well under a target
    step to pay: one that reads as many bytes per token (INT8 drafting INT4) loses on every round."""
    ours, theirs = draft.backend.weight_bytes, target.backend.weight_bytes
    if ours < theirs:
        return None
    return f"it reads {ours / 1e6:.0f} MB of weights per token, the target {theirs / 1e6:.0f} MB"


def _model_drafter(path: str, target, load_kwargs: dict) -> ModelDrafter:
    draft = target.open_model(path, **load_kwargs)
    ours, theirs = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if ours != theirs:
        raise ValueError(f"draft {path} has a different vocabulary ({len(theirs)} tokens vs the target's "
                         f"{len(ours)}); a draft must share the target's tokenizer")
    window = DRAFT_WINDOW if 2 * DRAFT_WINDOW + 32 < draft.max_context else None
    return ModelDrafter(draft, window=window)


def verify(sampler: Sampler, draft: Draft, target_logits: np.ndarray, constraint: RowConstraint | None = None
           ) -> list[int]:
    """Accept a prefix of `draft` against target logits [len(draft)+1, vocab].

    With a grammar `constraint` (its state: after the pending token), the target's choice at each
    position is the constrained one (see constraints.choose): the token the grammar forces there,
    else one from the logits masked to what the grammar allows. Every kept token is consumed by
    the constraint, and verification stops at the token that completes the grammar.

    Returns:
        The accepted draft tokens followed by one token from the target (the correction at
        the first rejection, or a bonus token when every draft was accepted), or fewer when the
        grammar completes.
    """
    out: list[int] = []

    def keep(token: int) -> bool:  # True: the grammar is complete after it
        out.append(token)
        sampler.observe([token])
        if constraint is None:
            return False
        constraint.consume(token)
        return constraint.finished

    for i, token in enumerate(draft.tokens):
        forced = constraint.forced() if constraint is not None else None
        if forced:  # the target's distribution here is a point mass on the forced token
            if token != forced[0]:
                keep(forced[0])
                return out
        elif sampler.params.greedy:
            logits = sampler.penalized(target_logits[i])
            best = int(np.argmax(logits)) if constraint is None else constraint.best(logits)
            if best != token:
                keep(best)
                return out
        else:
            logits = target_logits[i] if constraint is None else constraint.mask(target_logits[i])
            p = sampler.dense(sampler.penalized(logits))
            q = draft.probs[i] if draft.probs is not None else _point_mass(token, p.size)
            if sampler.rng.random() * q[token] >= p[token]:  # reject with prob 1 - min(1, p/q)
                keep(_residual_draw(sampler, p, q))
                return out
        if keep(token):
            return out
    logits = target_logits[len(draft.tokens)]
    if draft.cut is not None and not sampler.params.greedy and not (constraint and constraint.forced()):
        # the grammar removed this position's draft: the target rejected it here
        keep(_residual_draw(sampler, sampler.dense(sampler.penalized(constraint.mask(logits))), draft.cut))
    else:
        out.append(choose(sampler, logits, constraint))
    return out


def _residual_draw(sampler: Sampler, p: np.ndarray, q: np.ndarray) -> int:
    """A draw from the normalised residual max(0, p - q) (p itself where q covers it entirely)."""
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    return sampler.draw_dense(residual / total if total > 0 else p)


def draft_round(drafter: Drafter | None, contexts: list[list[int]], constraints: list[RowConstraint | None],
                room: list[int], lengths: list[int], lead_forced: bool = True) -> tuple[list[list[int]], list[Draft]]:
    """One round's drafts for every row: the tokens its grammar forces (`lead_forced`), then up to
    lengths[b] of the drafter's proposal continuing after them, cut where the grammar forbids it;
    room[b] bounds forced + drafted tokens. A row with room 0 (idle) drafts nothing.

    Returns:
        (forced tokens per row, Draft per row).
    """
    forced = [c.forced()[:r] if c is not None and lead_forced and r > 0 else [] for c, r in zip(constraints, room)]
    limits = [max(0, min(k, r - len(f))) for k, r, f in zip(lengths, room, forced)]
    # a row's own list unless forced tokens extend it (a drafter may index rows by their list)
    contexts = [t + f if f else t for t, f in zip(contexts, forced)]
    drafts = drafter.propose(contexts, limits) if drafter is not None and max(limits, default=0) > 0 \
        else [Draft() for _ in contexts]
    return forced, [constrained_draft(f, d, c) if c is not None and r > 0 else d
                    for f, d, c, r in zip(forced, drafts, constraints, room)]


def constrained_draft(forced: list[int], draft: Draft, constraint: RowConstraint) -> Draft:
    """The round's draft under a grammar: the tokens it forces from here (`forced`), then the
    drafter's proposal (which continues after them) cut at the first token the grammar forbids.
    Nothing stays consumed: verification consumes what it keeps."""
    for token in forced:
        constraint.consume(token)
    keep = constraint.valid_prefix(draft.tokens)
    if forced:
        constraint.rollback(len(forced))
    probs = draft.probs
    cut = probs[keep] if probs is not None and keep < len(draft.tokens) else None
    return Draft(forced + draft.tokens[:keep], [*[_point_mass(t, probs[0].size) for t in forced], *probs[:keep]]
                 if probs else None, cut)


def _point_mass(token: int, size: int) -> np.ndarray:
    q = np.zeros(size)
    q[token] = 1.0
    return q


@dataclass
class SpeculativeStats:
    """Draft figures of one generation: rounds with drafts, drafts proposed and accepted, and
    how many rounds accepted each number of drafts."""

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
