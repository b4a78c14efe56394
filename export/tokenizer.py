"""Rebuild a Hugging Face ``tokenizers.Tokenizer`` from the ``tokenizer.ggml.*`` metadata of a GGUF.

A GGUF carries no ``tokenizer.json``, so the export rebuilds one to ship and run without transformers:

    tokenizer = build_tokenizer(read_gguf_tokenizer(gguf.GGUFReader("model.gguf")))
    tokenizer.save("tokenizer.json")

Supported ``tokenizer.ggml.model``: ``"gpt2"`` (byte-level BPE), ``"llama"`` (SentencePiece BPE).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType).
_CONTROL = 3
_USER_DEFINED = 4

# Pre-tokenizer split regexes, as in llama.cpp's llama-vocab.cpp (applied in order, "isolated").
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: ``tokenizer.ggml.pre`` -> regexes splitting text before byte-level BPE. "default" follows
#: transformers (GPT-2 regex), not llama.cpp's DEFAULT pre-type.
BYTE_LEVEL_PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),  # single digits, then GPT-2
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
}


@dataclass(frozen=True)
class GGUFTokenizerData:
    """Tokenizer metadata read from the ``tokenizer.ggml.*`` fields of a GGUF file."""

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int] | None
    merges: list[str] | None
    scores: list[float] | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool


def read_gguf_tokenizer(reader: gguf.GGUFReader) -> GGUFTokenizerData:
    """Read the tokenizer fields of a GGUF file.

    Missing flags take llama.cpp's defaults: BOS and a space prefix for ``"llama"`` vocabularies,
    neither for the others; never EOS.

    Args:
        reader: An open ``gguf.GGUFReader``.

    Returns:
        The tokenizer metadata.

    Raises:
        ValueError: If the file has no ``tokenizer.ggml.model`` or ``tokenizer.ggml.tokens``.
    """

    def get(key: str, default: Any = None) -> Any:
        field = reader.get_field(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    model, tokens = get("model"), get("tokens")
    if model is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer.ggml.model / tokenizer.ggml.tokens metadata")
    is_spm = model == "llama"
    return GGUFTokenizerData(
        model=model,
        pre=get("pre"),
        tokens=list(tokens),
        token_types=get("token_type"),
        merges=get("merges"),
        scores=get("scores"),
        bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"),
        unk_token_id=get("unknown_token_id"),
        pad_token_id=get("padding_token_id"),
        add_bos_token=bool(get("add_bos_token", is_spm)),
        add_eos_token=bool(get("add_eos_token", False)),
        add_space_prefix=bool(get("add_space_prefix", is_spm)),
    )


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    """``["left right", ...]`` -> ``[("left", "right"), ...]``, order kept."""
    return [(left, right) for left, _, right in (merge.partition(" ") for merge in merges)]


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Recover SentencePiece BPE merges: every split of a token into two vocabulary tokens,
    ranked by the score of the merged token (highest first), as transformers does.

    Args:
        tokens: The vocabulary, indexed by id.
        scores: The score of each token.

    Returns:
        The merges, best first.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = [p for p in pairs if p[0] in vocab and p[1] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ranked += [(-score, -len(left), -len(right), left, right) for left, right in pairs]
    ranked.sort(key=lambda r: r[:3])  # best score, then longer left/right piece; stable otherwise
    return [(left, right) for *_, left, right in ranked]


def _byte_level_model(data: GGUFTokenizerData) -> Tokenizer:
    """Byte-level BPE (``"gpt2"``) with the pre-tokenizer named by ``data.pre``.

    Args:
        data: The GGUF tokenizer metadata; ``pre`` must be a key of ``BYTE_LEVEL_PRE_SPLITS``.

    Returns:
        The tokenizer, without added tokens or post-processor.
    """
    pre = data.pre or "default"
    if pre not in BYTE_LEVEL_PRE_SPLITS:
        raise ValueError(
            f"Unsupported tokenizer.ggml.pre {pre!r} for a byte-level BPE vocabulary; "
            f"supported: {sorted(BYTE_LEVEL_PRE_SPLITS)}"
        )
    if data.merges is None:
        raise ValueError("A 'gpt2' GGUF vocabulary needs tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(data.tokens)}
    merges = _split_merges(data.merges)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece_model(data: GGUFTokenizerData) -> Tokenizer:
    """SentencePiece-style BPE (``"llama"``): merges from scores, ``▁`` for spaces, byte fallback.

    Args:
        data: The GGUF tokenizer metadata, with ``scores`` or ``merges``.

    Returns:
        The tokenizer, without added tokens or post-processor.
    """
    if data.merges is not None:
        merges = _split_merges(data.merges)
    elif data.scores is not None:
        merges = _merges_from_scores(data.tokens, data.scores)
    else:
        raise ValueError("A 'llama' GGUF vocabulary needs tokenizer.ggml.scores or tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(data.tokens)}
    unk = data.tokens[data.unk_token_id] if data.unk_token_id is not None else None
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Like sentencepiece and llama.cpp: every space becomes "▁", and with add_space_prefix each stretch
    # of text (the start, and after each added token) gets one more, even if it starts with a space.
    prefix = [normalizers.Prepend("▁")] if data.add_space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(content=" ", left=1, right=0)] if data.add_space_prefix else []
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return tokenizer


#: ``tokenizer.ggml.model`` -> builder of the core tokenizer.
MODEL_BUILDERS: dict[str, Callable[[GGUFTokenizerData], Tokenizer]] = {
    "gpt2": _byte_level_model,
    "llama": _sentencepiece_model,
}


def _post_processor(data: GGUFTokenizerData) -> processors.TemplateProcessing:
    """Template adding BOS / EOS around each sequence as the GGUF flags ask (else pass-through)."""
    specials: list[tuple[str, int]] = []
    prefix: list[str] = []
    suffix: list[str] = []
    for wanted, token_id, side, name in (
        (data.add_bos_token, data.bos_token_id, prefix, "BOS"),
        (data.add_eos_token, data.eos_token_id, suffix, "EOS"),
    ):
        if not wanted:
            continue
        if token_id is None:
            logger.warning("GGUF asks to add %s but names no %s token; not adding it", name, name)
            continue
        side.append(data.tokens[token_id])
        specials.append((data.tokens[token_id], token_id))
    single = [*prefix, "$A:0", *suffix]
    pair = [*single, *prefix, "$B:1", *suffix]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def build_tokenizer(data: GGUFTokenizerData) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` equivalent to the GGUF's tokenizer.

    CONTROL tokens are added as special tokens and USER_DEFINED ones as non-special added tokens
    (as llama.cpp and transformers do); both are matched whole and never split.

    Args:
        data: Metadata from :func:`read_gguf_tokenizer`.

    Returns:
        The tokenizer, ready to ``encode``/``decode`` or ``save("tokenizer.json")``.

    Raises:
        ValueError: If ``data.model`` (or, for ``"gpt2"``, ``data.pre``) is not supported.
    """
    builder = MODEL_BUILDERS.get(data.model)
    if builder is None:
        raise ValueError(
            f"Unsupported tokenizer.ggml.model {data.model!r}; supported: {sorted(MODEL_BUILDERS)}"
        )
    tokenizer = builder(data)
    types = data.token_types or []
    for kind, add in ((_CONTROL, tokenizer.add_special_tokens), (_USER_DEFINED, tokenizer.add_tokens)):
        # Their ids come from the vocabulary, which already holds each of these tokens.
        tokens = [token for token, token_type in zip(data.tokens, types) if token_type == kind]
        add([AddedToken(token, special=kind == _CONTROL, normalized=False) for token in tokens])
    tokenizer.post_processor = _post_processor(data)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != len(data.tokens):
        logger.warning("Tokenizer has %d tokens but the GGUF lists %d (duplicates?)", size, len(data.tokens))
    logger.info("Built %r tokenizer (pre=%r) with %d tokens", data.model, data.pre, len(data.tokens))
    return tokenizer


# Text whose pre-tokenization tells the llama.cpp pre-tokenizers apart (digits, contractions,
# case, newlines, runs of spaces, punctuation, non-Latin letters).
_PRE_PROBE = ("Hello World! It's 2024: I've 12345 apples, they'LL cost $3.50...\n\n\n"
              "   indented\ttabs  and   spaces ÜNÏCÖDÉ 你好世界 ok?!\r\n'S done 7")


# `tokenizer.ggml.pre` values llama.cpp accepts, for the splits above (what the writer may emit)
LLAMACPP_PRE_NAMES = ("gpt-2", "smollm", "llama-bpe", "qwen2")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's split regexes for `tokenizer.ggml.pre` name `pre`, then GPT-2 byte-level mapping."""
    splits = [pre_tokenizers.Split(Regex(rx), behavior="isolated") for rx in BYTE_LEVEL_PRE_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _detect_pre(tokenizer: Tokenizer) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name whose split equals `tokenizer`'s pre-tokenizer."""
    if tokenizer.normalizer is not None or tokenizer.pre_tokenizer is None:
        raise ValueError("only byte-level BPE tokenizers without a normalizer can be written to GGUF")
    ours = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(_PRE_PROBE)]
    for name in LLAMACPP_PRE_NAMES:
        candidate = _byte_level_pre_tokenizer(name)
        if [piece for piece, _ in candidate.pre_tokenize_str(_PRE_PROBE)] == ours:
            return name
    raise ValueError(f"the tokenizer's pre-tokenizer matches none of the llama.cpp ones edge-run "
                     f"can write ({', '.join(LLAMACPP_PRE_NAMES)})")


def gguf_tokenizer_fields(tokenizer: Tokenizer, vocab_size: int, bos_token_id: int | None,
                          eos_token_id: int | None, add_bos_token: bool) -> dict[str, tuple[Any, tuple]]:
    """The ``tokenizer.ggml.*`` fields of a byte-level BPE ``tokenizers.Tokenizer`` (the inverse of
    :func:`build_tokenizer` for Hugging Face sources).

    Args:
        tokenizer: a byte-level BPE tokenizer (GPT-2 style, as most Llama-family HF models use).
        vocab_size: rows of the model's embedding; the vocabulary is padded with unused tokens to it.
        bos_token_id, eos_token_id, add_bos_token: special tokens and the BOS flag.
    Returns:
        key -> (value, GGUF value types), as `Checkpoint.gguf_metadata` holds them.
    Raises:
        ValueError: a tokenizer GGUF cannot describe (not byte-level BPE, unknown pre-tokenizer,
            more tokens than the embedding has rows).
    """
    from gguf import GGUFValueType as T
    from gguf import TokenType

    data = json.loads(tokenizer.to_str())
    if data["model"].get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"only byte-level BPE tokenizers can be written to GGUF (got a "
                         f"{data['model'].get('type')} model with a {(data.get('decoder') or {}).get('type')} decoder)")
    pre = _detect_pre(tokenizer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))) or len(vocab) > vocab_size:
        raise ValueError(f"token ids must be 0..n-1 with n <= the model's vocab_size {vocab_size} "
                         f"(got {len(vocab)} ids up to {max(vocab.values())})")
    tokens = sorted(vocab, key=vocab.__getitem__) + [f"[PAD{i}]" for i in range(len(vocab), vocab_size)]
    types = [int(TokenType.NORMAL)] * len(vocab) + [int(TokenType.UNUSED)] * (vocab_size - len(vocab))
    for added in data.get("added_tokens") or []:
        types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges") or []]
    fields: dict[str, tuple[Any, tuple]] = {
        "tokenizer.ggml.model": ("gpt2", (T.STRING,)),
        "tokenizer.ggml.pre": (pre, (T.STRING,)),
        "tokenizer.ggml.tokens": (tokens, (T.ARRAY, T.STRING)),
        "tokenizer.ggml.token_type": (types, (T.ARRAY, T.INT32)),
        "tokenizer.ggml.add_bos_token": (bool(add_bos_token), (T.BOOL,)),
        "tokenizer.ggml.add_eos_token": (False, (T.BOOL,)),
    }
    if merges:
        fields["tokenizer.ggml.merges"] = (merges, (T.ARRAY, T.STRING))
    for key, token_id in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                          ("unknown_token_id", vocab.get(data["model"].get("unk_token") or ""))):
        if token_id is not None:
            fields[f"tokenizer.ggml.{key}"] = (int(token_id), (T.UINT32,))
    return fields
