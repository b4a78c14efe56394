"""The `auto` speculative mode: suffix lookup where the context repeats itself, a draft model
elsewhere (when one is given), plain decoding where neither pays.

Rows are sorted each round by what would draft them: a lookup match of two tokens or more keeps
the lookup's classes (see SuffixDrafter), anything else goes to the draft model as class
`MODEL_CLASS`, which sits in a cost group of its own (draft_policy.COST_GROUP). The draft-length
policy then measures each way's acceptance and cost as it runs and drafts 0 tokens (plain
decoding, with sparse probes) for a class that does not pay.
"""
from __future__ import annotations

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

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        self.lookup.start(prompts, params, cache)
        if self.model is not None:
            self.model.start(prompts, params, cache)

    def classes(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        return [self._kind(context) for context in contexts]

    def _kind(self, context: Sequence[int]) -> int:
        kind = self.lookup.kind(context)
        if self.model is not None and kind != 4 and self.lookup.match(context)[2] < self.min_match:
            return MODEL_CLASS
        return kind

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        by_model = [k > 0 and self._kind(c) == MODEL_CLASS for c, k in zip(contexts, lengths)]
        drafts = self.lookup.propose(contexts, [0 if m else k for m, k in zip(by_model, lengths)])
        if any(by_model):
            modelled = self.model.propose(contexts, [k if m else 0 for m, k in zip(by_model, lengths)])
            drafts = [d if m else own for m, d, own in zip(by_model, modelled, drafts)]
        return drafts
