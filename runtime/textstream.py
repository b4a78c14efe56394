"""Incremental detokenization and stop-string matching for streamed generation."""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    """Turns a token stream into text pieces in O(1) tokens of decoding per step.

    Decodes a short window (the tokens of the last emitted piece plus the new ones) and emits only
    what is new; pieces ending in an incomplete UTF-8 sequence (U+FFFD) wait for the next token.
    The window bookkeeping runs inside the tokenizers library (`DecodeStream`): one call per
    token instead of two decodes and list slicing in Python, since this runs once per token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)  # as Tokenizer.decode's default

    def push(self, token: int) -> str:
        """The text `token` completes ("" while a character is still incomplete)."""
        return self._stream.step(self.tokenizer, token) or ""


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports a completed stop."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        if not self.stops:  # nothing to hold back (the common case, once per token)
            return piece, False
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


def step_text(stream: TextStream, matcher: StopMatcher, token: int, eos: frozenset[int],
              out_of_room: bool, done: bool = False) -> tuple[str, str | None]:
    """The text a generated `token` completes, and how the sequence ends with it.

    Returns:
        (text, finish): finish is "stop" (an EOS token or a stop string, whose text is withheld,
        or `done`: a structured output's grammar is complete with this token), "length"
        (`out_of_room`: no tokens or cache positions left) or None (it goes on). A sequence that
        ends flushes the text the stop matcher still held back.
    """
    text, stopped = matcher.push(stream.push(token))
    finish = "stop" if token in eos or stopped or done else "length" if out_of_room else None
    if finish is not None and not stopped:
        text += matcher.flush()
    return text, finish
