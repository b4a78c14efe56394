"""Lookup drafting over the whole context with a suffix automaton, plus a pool of earlier outputs.

`SuffixDrafter` (mode "suffix") finds, each round, the longest suffix of the context (prompt +
output) that occurred earlier anywhere in it, however long, and copies what followed it. It also
keeps a pool of the token sequences the model generated in earlier generations of this drafter
(a chat's or server's repeated phrasings, lookahead-style) and copies from there when the pool
matches a longer suffix than the context does. Both lookups cost O(1) amortised per new token:
each row's automaton grows by the tokens accepted since the last round.
"""
from __future__ import annotations

from collections.abc import Sequence

from .drafters import Draft, Drafter
from .sampling import SamplingParams


class SuffixAutomaton:
    """The suffix automaton of a token sequence, built one token at a time.

    Each state is a set of substrings with the same end positions; `first[s]` is the position of
    the last token of the state's first occurrence. After `extend`, `link[last]` is the longest
    suffix of the sequence that also ends earlier (`repeat`).
    """

    def __init__(self) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.first = [-1], [0], [-1]
        self.last, self.size = 0, 0

    def extend(self, token: int) -> None:
        """Append one token (Blumer et al. 1985's online construction)."""
        nxt, link, length = self.next, self.link, self.length
        cur = len(nxt)
        nxt.append({})
        length.append(length[self.last] + 1)
        link.append(0)
        self.first.append(self.size)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(nxt)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                self.first.append(self.first[q])
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        self.size += 1

    def repeat(self) -> tuple[int, int]:
        """(position after the earlier occurrence, its length) of the longest suffix of the sequence
        that occurred before; length 0 when none did."""
        state = self.link[self.last] if self.size else 0
        return (self.first[state] + 1, self.length[state]) if state > 0 else (0, 0)

    def walk(self, state: int, matched: int, token: int) -> tuple[int, int]:
        """Extend a match (state, length) of some other text's suffix by `token` (matching
        statistics): the longest suffix of that text + token found in this sequence."""
        while state and token not in self.next[state]:
            state = self.link[state]
            matched = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], matched + 1
        return 0, 0


class SuffixDrafter(Drafter):
    """Copy what followed the longest earlier occurrence of the context's suffix, from the context
    itself or from the pool of earlier generations' outputs.

    Classes for the draft-length policy: 0 no match, 1 a one-token match, 2 a match of 2-7 tokens,
    3 of 8 or more, 4 a pool match (the policy learns one acceptance curve per class).

    Args:
        slack: drafts allowed beyond the match length.
        pool_tokens: most tokens of earlier outputs kept in the pool (0: no pool).
        min_pool_match: shortest pool match used (short ones are mostly chance).
    """

    def __init__(self, slack: int = 4, pool_tokens: int = 16384, min_pool_match: int = 3):
        if slack < 1 or pool_tokens < 0 or min_pool_match < 1:
            raise ValueError(f"need slack >= 1, pool_tokens >= 0, min_pool_match >= 1; got {slack}, "
                             f"{pool_tokens}, {min_pool_match}")
        self.slack, self.pool_tokens, self.min_pool_match = slack, pool_tokens, min_pool_match
        self.pool_text: list[int] = []
        self.pool = SuffixAutomaton()
        # rows by the identity of their context list: `classes` sees only the active rows, `propose`
        # all of them, and the engine appends each row's tokens to the same list all generation
        self.rows: dict[int, _RowIndex] = {}
        self.prompts: list[list[int]] = []

    def start(self, prompts: Sequence[Sequence[int]], params: SamplingParams, cache=None) -> None:
        for row in self.rows.values():  # the last generation's outputs join the pool
            self._add_to_pool(row.text[row.prompt_length:])
        self.rows, self.prompts = {}, [list(p) for p in prompts]

    def _add_to_pool(self, tokens: Sequence[int]) -> None:
        if not self.pool_tokens or len(tokens) < 2:
            return
        if len(self.pool_text) + len(tokens) + 1 > self.pool_tokens:  # keep the newer half
            kept = self.pool_text[len(self.pool_text) // 2:]
            self.pool_text, self.pool = [], SuffixAutomaton()
            self._add_to_pool(kept[kept.index(-1) + 1:] if -1 in kept else [])
        for token in [*tokens, -1]:  # -1 separates outputs: no match spans two of them
            self.pool.extend(int(token))
            self.pool_text.append(int(token))

    def _sync(self, context: Sequence[int]) -> _RowIndex:
        index = self.rows.get(id(context))
        if index is None or index.source is not context or len(index.text) > len(context):
            # a new row, or not a continuation (the list itself is kept: its id is not reused meanwhile)
            prompt = next((len(p) for p in self.prompts if list(context[:len(p)]) == p), len(context))
            index = self.rows[id(context)] = _RowIndex(prompt, context)
        for token in context[len(index.text):]:
            token = int(token)
            index.text.append(token)
            index.automaton.extend(token)
            index.pool_state, index.pool_match = self.pool.walk(index.pool_state, index.pool_match, token)
        return index

    def match(self, context: Sequence[int]) -> tuple[list[int], int, int, bool]:
        """(the text the copy comes from, where it starts, match length, from the pool) for one row."""
        index = self._sync(context)
        start, length = index.automaton.repeat()
        if index.pool_match >= max(length + 1, self.min_pool_match):
            return self.pool_text, self.pool.first[index.pool_state] + 1, index.pool_match, True
        return index.text, start, length, False

    def classes(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        return [self.kind(context) for context in contexts]

    def kind(self, context: Sequence[int]) -> int:
        """One row's class (see the class docstring)."""
        _, _, length, pooled = self.match(context)
        return 4 if pooled else 0 if length == 0 else 1 if length == 1 else 2 if length < 8 else 3

    def propose(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> list[Draft]:
        drafts = []
        for context, k in zip(contexts, lengths):
            if k <= 0:
                drafts.append(Draft())
                continue
            text, start, length, _ = self.match(context)
            tokens = text[start:start + min(k, length + self.slack)] if length else []
            drafts.append(Draft(tokens[:tokens.index(-1)] if -1 in tokens else list(tokens)))
        return drafts


class _RowIndex:
    """One row's context, its automaton, and its match in the pool."""

    def __init__(self, prompt_length: int, source: Sequence[int]) -> None:
        self.prompt_length, self.source = prompt_length, source
        self.text: list[int] = []
        self.automaton = SuffixAutomaton()
        self.pool_state, self.pool_match = 0, 0
