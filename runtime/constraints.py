"""Structured output: decoding constrained by a JSON schema, a regex or a Lark grammar (llguidance).

`Grammars` compiles an OpenAI-style `response_format` once per request against the package's own
tokenizer; each row of a batch then gets its own `RowConstraint` (an `llguidance.LLMatcher`), which
masks the row's logits before sampling, consumes the chosen tokens, tells which tokens the grammar
forces (free drafts: they enter the next step without being sampled) and when the grammar is done.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

# whitespace between JSON tokens: one space, or one line break and an indent, as pretty-printed JSON
# has (a small model can otherwise spend its tokens on blanks, or loop on them); a schema's own
# "x-guidance" options override it (e.g. {"whitespace_flexible": false, "whitespace_pattern": null}: none)
JSON_DEFAULTS = {"whitespace_pattern": r"( ?|\n[ \t]{0,24})"}
RESPONSE_FORMATS = ('{"type": "json_schema", "json_schema": {"schema": {...}}}, {"type": "json_object"}, '
                    '{"type": "regex", "pattern": "..."}, {"type": "grammar", "lark": "..."} or {"type": "text"}')


@dataclass(frozen=True)
class Grammar:
    """A checked grammar in llguidance's serialized form, ready for one matcher per row."""

    text: str
    kind: str  # the response_format type it came from


def grammar_text(response_format: Any) -> tuple[str, str] | None:
    """(llguidance grammar, type) for an OpenAI-style `response_format`; None for plain text.

    Accepts {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}} (OpenAI's shape;
    a bare schema under "json_schema" too), {"type": "json_object"}, {"type": "regex", "pattern": ...},
    {"type": "grammar", "lark": ...} and {"type": "text"}.

    Raises:
        ValueError: a malformed response_format, naming the field and the accepted forms.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ValueError(f"response_format must be an object with a \"type\"; use {RESPONSE_FORMATS}")
    kind = response_format["type"]
    if kind == "text":
        return None
    import llguidance as llg

    if kind == "json_object":
        return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_DEFAULTS), kind
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        if isinstance(wrapper, str):
            try:
                wrapper = json.loads(wrapper)
            except json.JSONDecodeError as e:
                raise ValueError(f"response_format.json_schema is not valid JSON ({e})") from None
        schema = wrapper.get("schema", wrapper) if isinstance(wrapper, dict) else wrapper
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"response_format.json_schema must hold a JSON schema object, got "
                             f"{type(schema).__name__}; use {RESPONSE_FORMATS}")
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS), kind
        except ValueError as e:
            raise ValueError(f"response_format.json_schema: {e}") from None
    if kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("response_format of type regex needs a non-empty string \"pattern\"")
        return llg.LLMatcher.grammar_from_regex(pattern), kind
    if kind == "grammar":
        lark = response_format.get("lark", response_format.get("grammar"))
        if not isinstance(lark, str) or not lark.strip():
            raise ValueError("response_format of type grammar needs a non-empty Lark grammar string \"lark\"")
        return llg.LLMatcher.grammar_from_lark(lark), kind
    raise ValueError(f"unknown response_format type {kind!r}; use {RESPONSE_FORMATS}")


def check_response_format(response_format: Any, tokenizer=None) -> Grammar | None:
    """The checked grammar of `response_format` (None: plain text), or a one-line ValueError when it is
    malformed or its schema, regex or grammar is invalid (`tokenizer`: an llguidance LLTokenizer to
    check against; None checks the grammar alone)."""
    found = grammar_text(response_format)
    return None if found is None else validated(*found, tokenizer)


def validated(text: str, kind: str, tokenizer=None) -> Grammar:
    """`text` (a grammar of response-format type `kind`) checked by llguidance against `tokenizer`
    (an LLTokenizer; None checks the grammar alone); a one-line ValueError when it is invalid."""
    import llguidance as llg

    error = llg.LLMatcher.validate_grammar(text, tokenizer)
    if error:
        reason = " ".join(line.strip() for line in error.splitlines() if line.strip())
        raise ValueError(f"invalid response_format ({kind}): {reason[:300]}")
    return Grammar(text, kind)


class Grammars:
    """Compiles response formats against one package's tokenizer (built on first use, ~0.4 s for a
    49k vocabulary, then kept).

    Args:
        tokenizer: the package's tokenizer.
        vocab_size: rows of the model's logits (may exceed the tokenizer's ids).
        eos_token_ids: the tokens that end a sequence; the grammar allows them where it may end.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, sorted(eos_token_ids)
        self._ll = None

    @property
    def ll_tokenizer(self):
        if self._ll is None:
            import llguidance as llg

            eos = self.eos or None
            self._ll = llg.LLTokenizer(self._tokenizer.to_str(), n_vocab=self.vocab_size, eos_token=eos)
        return self._ll

    def compile(self, response_format: Any) -> Grammar | None:
        """The checked grammar of `response_format` (None: unconstrained).

        Raises:
            ValueError: a malformed response_format, or a schema, regex or grammar llguidance
                rejects, with its message (one line, before any token is generated).
        """
        found = grammar_text(response_format)  # plain text never builds the llguidance tokenizer
        return None if found is None else validated(*found, self.ll_tokenizer)

    def matcher(self, grammar: Grammar) -> RowConstraint:
        """A fresh constraint for one row."""
        return RowConstraint(self, grammar)


class RowConstraint:
    """The grammar state of one sequence: masks its logits, consumes its tokens, forces tokens.

    Raises (from consume):
        RuntimeError: a token the grammar forbids was forced on it (an engine bug, not user input).
    """

    def __init__(self, grammars: Grammars, grammar: Grammar):
        import llguidance as llg

        self.vocab_size = grammars.vocab_size
        self.eos = grammars.eos
        self._eos = frozenset(self.eos)
        self._matcher = llg.LLMatcher(grammars.ll_tokenizer, grammar.text)
        if self._matcher.is_error():
            raise ValueError(f"invalid response_format ({grammar.kind}): {self._matcher.get_error()}")
        self._allowed: np.ndarray | None = None  # the mask of the current state, computed once

    def allowed(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar allows next."""
        if self._allowed is None:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            self._allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].view(bool)
        return self._allowed

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """`logits` [vocab] with every forbidden token at -inf (a new array)."""
        return np.where(self.allowed(), logits, np.float32(-np.inf))

    def best(self, logits: np.ndarray) -> int:
        """The allowed token with the highest logit (the first on a tie), as argmax(mask(logits)).

        Greedy decoding's case: the model's own first choice is checked alone, without the whole
        vocabulary's mask, and the mask is computed only when the grammar forbids that choice."""
        token = int(np.argmax(logits))
        if self._allowed is None and token not in self._eos and self.valid_prefix([token]) == 1:
            return token  # (validate_tokens does not count end-of-sequence tokens: the mask decides those)
        return int(np.argmax(self.mask(logits)))

    def forced(self) -> list[int]:
        """Tokens the grammar allows as the only continuation here (may be empty)."""
        return self._matcher.compute_ff_tokens()

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar accepts from here, in order (nothing is consumed)."""
        return self._matcher.validate_tokens(list(tokens)) if tokens else 0

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise RuntimeError(f"token {token} broke the grammar: {self._matcher.get_error()}")
        self._allowed = None

    def rollback(self, count: int) -> None:
        """Undo the last `count` consumed tokens."""
        if count and not self._matcher.rollback(count):
            raise RuntimeError(f"cannot roll the grammar back {count} tokens: {self._matcher.get_error()}")
        self._allowed = None

    @property
    def finished(self) -> bool:
        """The grammar is complete: it stopped, or nothing but an end-of-sequence token may follow."""
        if self._matcher.is_stopped():
            return True
        if not self._matcher.is_accepting():
            return False
        allowed = self.allowed()
        return bool(allowed.sum() <= len(self.eos) and all(allowed[e] for e in self.eos if e < allowed.size))


def choose(sampler, logits: np.ndarray, constraint: RowConstraint | None) -> int:
    """The next token of a row: `sampler` on `logits` [vocab], or under a grammar the token it
    forces here, else `sampler` on the logits masked to what it allows (consumed either way)."""
    if constraint is None:
        return sampler(logits)
    forced = constraint.forced()
    if forced:
        token = forced[0]
        sampler.observe([token])
    elif sampler.params.greedy:
        token = constraint.best(sampler.penalized(logits))
        sampler.observe([token])
    else:
        token = sampler(constraint.mask(logits))
    constraint.consume(token)
    return token
