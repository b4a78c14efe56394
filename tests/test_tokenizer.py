"""Tests for edgerun.export.tokenizer: GGUF tokenizer metadata -> ``tokenizers.Tokenizer``."""

from __future__ import annotations

import dataclasses
import functools
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers

from edgerun.export.tokenizer import GGUFTokenizerData, build_tokenizer, read_gguf_tokenizer

SPECIAL_STRINGS = [
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>x<|im_end|>",
    "a<|im_start|>b <|im_end|> ",
    "<repo_name>edge-run<file_sep>main.py",
    "<|im_start|",  # incomplete: must be split normally
]
TRICKY_STRINGS = [
    "héllo wörld 你好世界 こんにちは Ünïcödé",
    "emoji 🙂🚀👍🏽 👩‍👩‍👧 zero\u200bwidth nbsp\u00a0here",
    "12345 3.14159 1,000,000 0.5% 2024-01-01 4 ½ months x²",
    "0\n\n2 * (10x+4) = 20x + 8",
    "a  b   c    d\t\te",
    "\n\n\n",
    "  leading spaces",
    "trailing spaces   ",
    "CRLF\r\nline",
    "It's they're we've I'm you'll he'd",
    "def f(x):\n    return x**2\n",
    "",
    " ",
]


def _corpus() -> dict[str, list[str]]:
    """A few hundred WikiText-2 lines, all MT-Bench turns and references, and hand-made strings.

    Both data sets ship with edge-run (edgerun.data).
    """
    from edgerun import data as shipped

    corpus = {"special": SPECIAL_STRINGS, "tricky": TRICKY_STRINGS}
    corpus["wikitext"] = [line for line in shipped.wikitext("test").split("\n") if line.strip()][:400]
    corpus["mt_bench"] = [text for q in shipped.mt_bench() for text in q["turns"] + (q.get("reference") or [])]
    return corpus


@functools.cache
def _smollm2(path: Path) -> tuple[GGUFTokenizerData, Tokenizer]:
    gguf = pytest.importorskip("gguf")
    data = read_gguf_tokenizer(gguf.GGUFReader(path))
    return data, build_tokenizer(data)


@functools.cache
def _transformers_reference(path: Path) -> tuple[Tokenizer, Tokenizer]:
    """transformers' GGUF tokenizer as loaded, and with SmolLM2's own pre-tokenizer.

    transformers (5.x) has no "smollm" entry and falls back to plain GPT-2 splitting, while
    SmolLM2's tokenizer.json and llama.cpp's "smollm" pre-type first isolate every digit
    (``Digits(individual_digits=True)`` then ``ByteLevel``). The second tokenizer puts that back.
    """
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    loaded = auto.backend_tokenizer
    fixed = Tokenizer.from_str(loaded.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return loaded, fixed


def test_read_gguf_tokenizer(smollm2_gguf: Path) -> None:
    data, _ = _smollm2(smollm2_gguf)
    assert (data.model, data.pre) == ("gpt2", "smollm")
    assert len(data.tokens) == 49152 and len(data.token_types) == 49152
    assert data.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert data.token_types.count(3) == 17 and data.merges and data.scores is None
    assert (data.bos_token_id, data.eos_token_id, data.unk_token_id, data.pad_token_id) == (1, 2, 0, 2)
    assert not (data.add_bos_token or data.add_eos_token or data.add_space_prefix)


def test_matches_transformers(smollm2_gguf: Path) -> None:
    _, ours = _smollm2(smollm2_gguf)
    loaded, reference = _transformers_reference(smollm2_gguf)
    mismatches = []
    # the references encode without their post-processor: transformers 4.x's GGUF loader makes a
    # LlamaTokenizerFast that prepends BOS whatever the file says (5.x follows add_bos_token=false);
    # our BOS rule is test_special_tokens_whole_and_no_bos's subject
    for group, texts in _corpus().items():
        for text in texts:
            ids = ours.encode(text).ids
            if ids != reference.encode(text, add_special_tokens=False).ids:
                mismatches.append((group, "encode", text))
                continue
            has_number = any(unicodedata.category(c).startswith("N") for c in text)
            if not has_number and ids != loaded.encode(text, add_special_tokens=False).ids:  # only digits may differ
                mismatches.append((group, "encode (as loaded)", text))
            for skip in (False, True):
                decoded = ours.decode(ids, skip_special_tokens=skip)
                if decoded != reference.decode(ids, skip_special_tokens=skip):
                    mismatches.append((group, f"decode skip_special_tokens={skip}", text))
            if ours.decode(ids, skip_special_tokens=False) != text:
                mismatches.append((group, "round trip", text))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


def test_digits_split_like_smollm2(smollm2_gguf: Path) -> None:
    """Digits are isolated before GPT-2 splitting, so "\\n\\n" before a digit stays one token."""
    _, ours = _smollm2(smollm2_gguf)
    assert ours.encode("0\n\n2").tokens == ["0", "ĊĊ", "2"]
    assert ours.encode("12345 3.14").tokens == ["1", "2", "3", "4", "5", "Ġ", "3", ".", "1", "4"]
    assert ours.encode("4 ½").tokens == ["4", "Ġ", "Â½"]


def test_special_tokens_whole_and_no_bos(smollm2_gguf: Path, tmp_path: Path) -> None:
    _, ours = _smollm2(smollm2_gguf)
    encoding = ours.encode("<|im_start|>user\nHi<|im_end|>\n")
    assert encoding.tokens == ["<|im_start|>", "user", "Ċ", "Hi", "<|im_end|>", "Ċ"]
    assert encoding.ids[0] == 1  # the text's own <|im_start|>; the GGUF asks for no BOS
    assert ours.decode(encoding.ids, skip_special_tokens=True) == "user\nHi\n"
    ours.save(str(tmp_path / "tokenizer.json"))
    reloaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert reloaded.encode("Hi<|im_end|> 42").ids == ours.encode("Hi<|im_end|> 42").ids


# A tiny SentencePiece-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces scored longer-first.
_WORDS = ["▁hello", "▁world", "▁the", "hello"]
_SUBSTRINGS = {word[i:j] for word in _WORDS for i in range(len(word)) for j in range(i + 1, len(word) + 1)}
_PIECES = sorted(_SUBSTRINGS, key=lambda piece: (-len(piece), piece))


@pytest.fixture(scope="module")
def spm_data() -> GGUFTokenizerData:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES + ["<tool>"]
    return GGUFTokenizerData(
        model="llama",
        pre="default",
        tokens=tokens,
        token_types=[2, 3, 3] + [6] * 256 + [1] * len(_PIECES) + [4],
        merges=None,
        scores=[0.0] * 259 + [-float(i) for i in range(len(_PIECES))] + [0.0],
        bos_token_id=1,
        eos_token_id=2,
        unk_token_id=0,
        pad_token_id=None,
        add_bos_token=True,
        add_eos_token=False,
        add_space_prefix=True,
    )


def test_llama_path_merges_and_round_trip(spm_data: GGUFTokenizerData) -> None:
    tok = build_tokenizer(spm_data)
    encoding = tok.encode("hello world")
    assert encoding.tokens == ["<s>", "▁hello", "▁world"]
    assert encoding.ids[0] == 1
    for text in ["hello world", "the  world", " hello", "hello world  "]:
        assert tok.decode(tok.encode(text).ids) == text


def test_llama_path_byte_fallback(spm_data: GGUFTokenizerData) -> None:
    tok = build_tokenizer(spm_data)
    encoding = tok.encode("héllo 🙂")
    emoji = ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert encoding.tokens == ["<s>", "▁h", "<0xC3>", "<0xA9>", "llo", "▁", *emoji]
    assert tok.decode(encoding.ids) == "héllo 🙂"
    assert 0 not in encoding.ids  # no <unk>


def test_llama_path_added_tokens(spm_data: GGUFTokenizerData) -> None:
    tok = build_tokenizer(spm_data)
    assert tok.encode("</s>hello<tool>").tokens == ["<s>", "</s>", "▁hello", "<tool>"]
    ids = tok.encode("hello<tool>").ids
    assert tok.decode(ids, skip_special_tokens=True) == "hello<tool>"  # user-defined is not special
    plain = build_tokenizer(dataclasses.replace(spm_data, add_bos_token=False, add_space_prefix=False))
    assert plain.encode("hello world").tokens == ["hello", "▁world"]


def test_unsupported_model_raises(spm_data: GGUFTokenizerData) -> None:
    with pytest.raises(ValueError, match=r"'bert'.*supported.*'gpt2'.*'llama'"):
        build_tokenizer(dataclasses.replace(spm_data, model="bert"))


def test_unsupported_pre_raises(spm_data: GGUFTokenizerData) -> None:
    data = dataclasses.replace(spm_data, model="gpt2", pre="no-such-pre", merges=[])
    with pytest.raises(ValueError, match=r"'no-such-pre'.*supported.*'smollm'"):
        build_tokenizer(data)
