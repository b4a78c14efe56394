"""Tests for edgerun.runtime.textstream: incremental detokenization and stop-string matching.

TextStream runs on the real tokenizer of the default model (SmolLM2, byte-level BPE: characters
outside ASCII are often split across tokens at the byte level).
"""
from __future__ import annotations

import random

import pytest

from edgerun.runtime.textstream import StopMatcher, TextStream

ENGLISH = ("The quick brown fox jumps over the lazy dog. It's 3.14159 degrees (roughly) outside; "
           "we'll see what they've done with the 1,000,000 tokens -- isn't that something?")
MULTIBYTE = [
    "café naïve façade résumé Ångström Ærø déjà vu",
    "emoji 😀🎉 👍🏽 👩‍👩‍👧 🇯🇵 ✨🚀",
    "日本語のテキストと中文和한국어",
    "Ελληνικά, русский язык, עברית, العربية, हिन्दी",
    "math ∑ ∫ √ ≈ ≠ ∞ ½ x² — “quotes” ‘single’ …",
    "mixed: naïve 😀 日本 café🎉end",
]
NEWLINES = [
    "line one\nline two\n\nline four\n",
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))\r\n",
    "\n\n\n",
    "  leading spaces\n\ttab\n trailing   \n",
    "第一行\n第二行 😀\n\né",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    import gguf

    from edgerun.export.tokenizer import build_tokenizer, read_gguf_tokenizer

    return build_tokenizer(read_gguf_tokenizer(gguf.GGUFReader(smollm2_gguf)))


def stream(tokenizer, tokens: list[int]) -> list[str]:
    ts = TextStream(tokenizer)
    return [ts.push(t) for t in tokens]


def check_stream(tokenizer, tokens: list[int]) -> list[str]:
    """Stream token by token and check the pieces against whole-sequence decoding."""
    ts = TextStream(tokenizer)
    emitted = ""
    pieces = []
    for i, token in enumerate(tokens):
        piece = ts.push(token)
        assert "\ufffd" not in piece, (i, piece)
        pieces.append(piece)
        emitted += piece
        so_far = tokenizer.decode(tokens[:i + 1])
        # never ahead of the text, and no lag once the text so far ends in a complete character
        assert so_far.startswith(emitted), (i, emitted, so_far)
        if not so_far.endswith("\ufffd"):
            assert emitted == so_far, (i, emitted, so_far)
    assert emitted == tokenizer.decode(tokens)
    return pieces


def test_english(tokenizer):
    tokens = tokenizer.encode(ENGLISH).ids
    pieces = check_stream(tokenizer, tokens)
    assert "".join(pieces) == ENGLISH
    assert sum(1 for p in pieces if p) == len(tokens)  # ASCII: every token gives its piece at once


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte(tokenizer, text):
    tokens = tokenizer.encode(text).ids
    pieces = check_stream(tokenizer, tokens)
    assert "".join(pieces) == text
    # the case is exercised: some character's UTF-8 bytes are split across tokens ...
    assert any("\ufffd" in tokenizer.decode([t]) for t in tokens)
    assert "" in pieces  # ... and the stream waited for the rest of it


def test_accented_split_across_tokens(tokenizer):
    """A 2-byte accented letter whose bytes land in different tokens (found in the vocabulary)."""
    text = "naïve"
    tokens = tokenizer.encode(text).ids
    split = [t for t in tokens if "\ufffd" in tokenizer.decode([t])]
    if not split:  # the merge exists: force the byte split with single-byte tokens for ï (C3 AF)
        vocab = tokenizer.get_vocab()
        byte_tokens = [vocab[c] for c in ("Ã", "¯")]  # GPT-2 byte-level symbols for 0xC3, 0xAF
        tokens = tokenizer.encode("na").ids + byte_tokens + tokenizer.encode("ve").ids
    assert tokenizer.decode(tokens) == text
    pieces = check_stream(tokenizer, tokens)
    assert "".join(pieces) == text


@pytest.mark.parametrize("text", NEWLINES)
def test_newlines(tokenizer, text):
    tokens = tokenizer.encode(text).ids
    assert "".join(check_stream(tokenizer, tokens)) == text


def test_random_texts(tokenizer):
    """Many seeded random strings mixing ASCII, accents, CJK, emoji, whitespace."""
    pool = list("abcxyz ABC 0123 .,!?'") + list("éèüñçøå") + list("日本語中文한") + \
        ["😀", "🎉", "👍🏽", "🇯🇵", "\n", "\n\n", "\t", "  ", "—", "€"]
    rng = random.Random(0)
    for _ in range(150):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 40)))
        tokens = tokenizer.encode(text).ids
        assert "".join(check_stream(tokenizer, tokens)) == text, text


def test_concatenated_sequences(tokenizer):
    """One long stream made of several texts: the window moves on without drifting."""
    tokens = []
    for text in [ENGLISH, *MULTIBYTE, *NEWLINES]:
        tokens += tokenizer.encode(text).ids
    pieces = check_stream(tokenizer, tokens)
    assert "".join(pieces) == "".join([ENGLISH, *MULTIBYTE, *NEWLINES])


def test_special_tokens_skipped_like_decode(tokenizer):
    im_start, im_end, eot = (tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert None not in (im_start, im_end, eot)
    tokens = ([im_start] + tokenizer.encode("assistant\nHi 😀 café").ids + [im_end]
              + tokenizer.encode("\n").ids + [eot, eot] + tokenizer.encode("日本").ids)
    pieces = check_stream(tokenizer, tokens)
    joined = "".join(pieces)
    assert joined == tokenizer.decode(tokens, skip_special_tokens=True) == "assistant\nHi 😀 café\n日本"
    assert joined != tokenizer.decode(tokens, skip_special_tokens=False)
    assert all("<|" not in p for p in pieces)
    for i, t in enumerate(tokens):
        if t in (im_start, im_end, eot):
            assert pieces[i] == ""


def test_special_token_between_split_bytes(tokenizer):
    """A special token inside a multi-byte character: skipped, the character still comes out whole
    (as decode of the whole sequence gives it)."""
    emoji = tokenizer.encode("😀").ids
    assert len(emoji) > 1
    tokens = emoji[:1] + [tokenizer.token_to_id("<|im_end|>")] + emoji[1:]
    pieces = check_stream(tokenizer, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens) == "😀"


def test_single_tokens_of_whole_vocab_slice(tokenizer):
    """Each complete-character token streams on its own to exactly its decode."""
    for token in range(0, tokenizer.get_vocab_size(), 97):
        text = tokenizer.decode([token])
        if "\ufffd" in text:
            continue
        assert stream(tokenizer, [token]) == [text]


def test_stream_with_stop_matcher(tokenizer):
    text = "The answer is 42.\nUser: what next?"
    tokens = tokenizer.encode(text).ids
    ts, matcher = TextStream(tokenizer), StopMatcher(["\nUser:"])
    out, stopped_at = "", None
    for i, t in enumerate(tokens):
        piece, stopped = matcher.push(ts.push(t))
        out += piece
        if stopped:
            stopped_at = i
            break
    assert stopped_at is not None and out == "The answer is 42."
    assert tokenizer.decode(tokens[:stopped_at + 1]).endswith("\nUser:")


# ------------------------------------------------------------------------------------ StopMatcher


def run(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    outs = []
    for piece in pieces:
        out, stopped = matcher.push(piece)
        outs.append(out)
        if stopped:
            return outs, True
    return outs, False


def test_stop_split_across_pieces():
    m = StopMatcher(["STOP"])
    assert m.push("Hello wor") == ("Hello wor", False)
    assert m.push("ld. ST") == ("ld. ", False)  # "ST" may begin STOP: held
    assert m.push("O") == ("", False)
    assert m.push("P and more") == ("", True)  # nothing after (or of) the stop string
    assert m.flush() == ""


def test_stop_inside_one_piece():
    m = StopMatcher(["</s>"])
    assert m.push("abc</s>def</s>") == ("abc", True)
    assert StopMatcher(["\n\n"]).push("one\n") == ("one", False)


def test_stop_split_into_single_characters():
    outs, stopped = run(StopMatcher(["<|user|>"]), list("answer <|user|> tail"))
    assert stopped and "".join(outs) == "answer "


def test_false_prefix_released():
    m = StopMatcher(["</answer>"])
    assert m.push("x <") == ("x ", False)
    assert m.push("/ans") == ("", False)
    assert m.push("wers>") == ("</answers>", False)  # disproved: released, in order
    assert m.push(" ok") == (" ok", False)
    assert m.flush() == ""


def test_false_prefix_then_real_stop():
    outs, stopped = run(StopMatcher(["STOP"]), ["ST", "ST", "OP", "after"])
    assert stopped and "".join(outs) == "ST"
    assert outs == ["", "ST", ""]
    outs, stopped = run(StopMatcher(["aab"]), ["a", "a", "a", "b"])
    assert stopped and "".join(outs) == "a"


def test_earliest_stop_wins():
    assert StopMatcher(["END", "\n\n"]).push("foo\n\nbar END baz") == ("foo", True)
    assert StopMatcher(["\n\n", "END"]).push("fooEND\n\n") == ("foo", True)
    assert StopMatcher(["abc", "ab"]).push("xabcd") == ("x", True)  # both at once: same start
    # several complete in the same push after being held: the one starting first cuts
    m = StopMatcher(["Q:", "A: no"])
    assert m.push("x A") == ("x ", False)
    assert m.push(": no Q:") == ("", True)  # "A: no" starts before "Q:"


def test_several_stops_hold_longest_possible_prefix():
    m = StopMatcher(["<end>", "<<x"])
    assert m.push("a<<") == ("a", False)  # "<<" may begin "<<x"; "<" may begin "<end>"
    assert m.push("e") == ("<", False)  # "<<e" rules out "<<x" but "<e" may begin "<end>"
    assert m.push("nd>") == ("", True)


def test_flush_returns_held_text():
    m = StopMatcher(["STOP"])
    assert m.push("Hello S") == ("Hello ", False)
    assert m.flush() == "S"
    assert m.flush() == ""
    m = StopMatcher(["\nUser:"])
    assert m.push("done\nUs") == ("done", False)
    assert m.flush() == "\nUs"


def test_no_stops_and_empty_stops():
    for stops in ([], [""], ["", ""]):
        m = StopMatcher(stops)
        assert m.push("anything at all") == ("anything at all", False)
        assert m.push("") == ("", False)
        assert m.flush() == ""
    assert StopMatcher(["", "X"]).push("abXc") == ("ab", True)


def test_stop_matcher_against_definition():
    """Random pieces over a small alphabet against the definition, for each push:
    a stop reached -> emit everything before the earliest stop in the text so far, and stop;
    otherwise emit all but the longest suffix that is a proper prefix of some stop."""
    rng = random.Random(1)
    for _ in range(2000):
        stops = [rng.choice(["ab", "aba", "bb", "abc", "ca", "cab", "a", "bcb"]) for _ in range(rng.randint(1, 3))]
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 8))]
        m = StopMatcher(stops)
        text, emitted = "", ""
        for piece in pieces:
            out, stopped = m.push(piece)
            text += piece
            found = [i for i in (text.find(s) for s in stops) if i >= 0]
            assert stopped == bool(found), (stops, pieces)
            if stopped:
                assert emitted + out == text[:min(found)], (stops, pieces)
                break
            emitted += out
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert emitted == text[:len(text) - hold], (stops, pieces)
        else:
            assert emitted + m.flush() == text
