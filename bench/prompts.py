"""Benchmark inputs as token ids, made once by the harness and sent to every engine alike.

Prompts of an exact length come from WikiText-2 test (consecutive text) or MT-Bench (first turns
joined into one user message, wrapped in the model's chat template, the message cut to fit).
Perplexity windows follow bench/eval.py's protocol: WikiText-2 test tokenized as one string
without special tokens, its first `windows x window_tokens` tokens cut into independent windows.
"""
from __future__ import annotations

from tokenizers import Tokenizer

from .. import data

PROMPT_SETS = ("wikitext", "mt_bench")
_MARK = "\u2063EDGE-RUN-BENCH\u2063"  # stands in for the message while splitting the template


def _wikitext_ids(tokenizer: Tokenizer, need: int) -> list[int]:
    """The first `need` token ids of WikiText-2 test, tokenizing just enough of its start."""
    text = data.wikitext("test")
    chars = 16 * need + 4096
    while True:
        ids = tokenizer.encode(text[:chars], add_special_tokens=False).ids
        if len(ids) > need or chars >= len(text):
            break
        chars *= 4
    if len(ids) >= need:
        return ids[:need]
    raise ValueError(f"WikiText-2 test holds {len(ids)} tokens, fewer than the {need} asked for; "
                     f"ask for fewer or shorter prompts")


def _template_parts(chat_template: str | None, bos: str, eos: str) -> tuple[str, str]:
    """The chat template's text before and after a user message (with the generation prompt)."""
    if not chat_template:
        return "", ""
    from ..runtime.engine import render_chat_template

    text = render_chat_template(chat_template, [{"role": "user", "content": _MARK}], bos, eos)
    before, _, after = text.partition(_MARK)
    return before, after


def make_prompts(tokenizer: Tokenizer, prompt_set: str, length: int, count: int,
                 chat_template: str | None = None, bos: str = "", eos: str = "") -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens each.

    Raises:
        ValueError: unknown prompt set, a length too short for the chat template, or too little text.
    """
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompt_set!r}; choose one of {', '.join(PROMPT_SETS)}")
    if length < 1 or count < 1:
        raise ValueError(f"prompt length and count must be >= 1, got {length}, {count}")
    if prompt_set == "wikitext":
        ids = _wikitext_ids(tokenizer, length * count)
        return [ids[k * length:(k + 1) * length] for k in range(count)]
    questions = [r["turns"][0] for r in data.mt_bench()]
    before, after = _template_parts(chat_template, bos, eos)
    head = tokenizer.encode(before, add_special_tokens=False).ids
    tail = tokenizer.encode(after, add_special_tokens=False).ids
    budget = length - len(head) - len(tail)
    if budget < 1:
        raise ValueError(f"a {length}-token prompt cannot hold the chat template ({len(head) + len(tail)} "
                         f"tokens); ask for longer prompts")
    prompts = []
    for k in range(count):
        body: list[int] = []
        j = k
        while len(body) < budget:  # this prompt's questions start at question k, in file order
            body += tokenizer.encode(questions[j % len(questions)] + "\n\n", add_special_tokens=False).ids
            j += 1
        prompts.append(head + body[:budget] + tail)
    return prompts


def perplexity_windows(tokenizer: Tokenizer, windows: int, window_tokens: int,
                       text: str | None = None) -> list[list[int]]:
    """The perplexity protocol (bench/eval.py's docstring): the text (default WikiText-2 test)
    tokenized as one string without special tokens, its first windows x window_tokens tokens cut
    into independent windows."""
    if windows < 1 or window_tokens < 2:
        raise ValueError(f"need windows >= 1 and window_tokens >= 2, got {windows}, {window_tokens}")
    ids = tokenizer.encode(data.wikitext("test") if text is None else text, add_special_tokens=False).ids
    if len(ids) < windows * window_tokens:
        source = "WikiText-2 test" if text is None else "the text"
        raise ValueError(f"{source} holds {len(ids)} tokens, fewer than {windows} x {window_tokens}; "
                         f"lower the number of windows or their length")
    return [ids[k * window_tokens:(k + 1) * window_tokens] for k in range(windows)]
