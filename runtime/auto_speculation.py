"""The `auto` speculative mode: suffix lookup where the context repeats itself, a draft model
elsewhere (when one is given), plain decoding where neither pays.

Rows are sorted each round by what would draft them: a lookup match of two tokens or more keeps
the lookup's classes (see SuffixDrafter), anything else goes to the draft model as class
`MODEL_CLASS`, which sits in a cost group of its own (draft_policy.COST_GROUP). The draft-length
policy then measures each way's acceptance and cost as it runs and drafts 0 tokens (plain
decoding, with sparse probes) for a class that does not pay.

A draft model also costs its own prefill, paid before its first draft, so `AutoDrafter` judges it
per request as well: it starts the model only when a row first asks it for drafts, and after a
generation where the model did not pay (the policy gave it no drafts in most of its rounds, or
its rounds made fewer tokens per second than plain rounds) it leaves the model out of the next
generations (2, then 4, ... up to 16), so neither its prefill nor its probes are paid there.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from .draft_policy import COST_GROUP
from .drafters import Draft, Drafter, ModelDrafter
from .sampling import SamplingParams
from .suffix_lookup import SuffixDrafter

MODEL_CLASS = COST_GROUP  # the first class of the second cost group


class AutoDrafter(Drafter):
    """Lookup where it matches, the draft model elsewhere; each row each round.

    Args:
        lookup: the lookup drafter (default SuffixDrafter()).
        model: a draft model's drafter, or None (lookup or plain decoding only).
        min_match: shortest lookup match drafted by the lookup when a model is given.
    """

    def __init__(self, lookup: SuffixDrafter | None = None, model: ModelDrafter | None = None, min_match: int = 2):
        self.lookup, self.model, self.min_match = lookup or SuffixDrafter(), model, min_match
        self.skip, self.skipped = 0, 0  # generations to leave the model out of, and left out so far
        self.use_model = model is not None
        self._reset()

    def _reset(self) -> None:
        # this generation's rounds: model rounds [with drafts, all], seconds and tokens per kind of round
        self.model_rounds = [0, 0]
        self.seconds, self.tokens = {"model": 0.0, "plain": 0.0}, {"model": 0, "plain": 0}
        self.last: tuple[float, int, str | None] | None = None  # (time, total tokens, kind) of the last round
        self.model_started = False

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        if self.model is not None:
            self._judge_model()
        self._reset()
        self.start_args = (prompts, params, cache)
        self.lookup.start(prompts, params, cache)

    def _judge_model(self) -> None:
        """Decide from the last generation whether the model drafts in the next ones."""
        if not self.use_model:
            self.skipped += 1
            self.use_model = self.skipped >= self.skip
            return
        drafted, rounds = self.model_rounds
        if not rounds:
            return
        rate = {k: self.tokens[k] / self.seconds[k] for k in self.seconds if self.seconds[k] > 0}
        paid = drafted * 2 > rounds and rate.get("model", 1.0) >= rate.get("plain", 0.0)
        self.skip = 0 if paid else min(max(2 * self.skip, 2), 16)
        self.use_model, self.skipped = paid, 0

    def classes(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        now, total = time.perf_counter(), sum(len(c) for c in contexts)
        if self.last is not None and self.last[2] is not None:  # the last round's tokens per second
            self.seconds[self.last[2]] += now - self.last[0]
            self.tokens[self.last[2]] += total - self.last[1]
        kinds = [self._kind(context) for context in contexts]
        self.model_rounds[1] += MODEL_CLASS in kinds
        self.last = (now, total, "plain")  # until propose says what this round drafted
        return kinds

    def _kind(self, context: Sequence[int]) -> int:
        kind = self.lookup.kind(context)
        if self.use_model and kind != 4 and self.lookup.match(context)[2] < self.min_match:
            return MODEL_CLASS
        return kind

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        if self.last is None:  # called without classes() first
            self.last = (time.perf_counter(), sum(len(c) for c in contexts), "plain")
        by_model = [k > 0 and self._kind(c) == MODEL_CLASS for c, k in zip(contexts, lengths)]
        drafts = self.lookup.propose(contexts, [0 if m else k for m, k in zip(by_model, lengths)])
        if any(drafts[i].tokens for i in range(len(drafts))):
            self.last = (*self.last[:2], None)  # a lookup round: neither plain nor the model's
        if any(by_model):
            if not self.model_started:  # its prefill, paid only by a generation that uses it
                self.model.start(*self.start_args)
                self.model_started = True
            modelled = self.model.propose(contexts, [k if m else 0 for m, k in zip(by_model, lengths)])
            drafts = [d if m else own for m, d, own in zip(by_model, modelled, drafts)]
            self.model_rounds[0] += 1
            self.last = (*self.last[:2], "model")
        return drafts
