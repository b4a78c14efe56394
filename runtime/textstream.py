"""Incremental detokenization and stop-string matching for streamed generation."""
from __future__ import annotations

from tokenizers import Tokenizer


class TextStream:
    """Turns a token stream into text pieces in O(1) tokens of decoding per step.

    Decodes a short window (prefix_offset..end) and emits only what is new past read_offset;
    pieces ending in an incomplete UTF-8 sequence (U+FFFD) wait for the next token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.tokens[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix):]
        return ""


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a completed stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
