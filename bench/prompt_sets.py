"""Evaluation prompt sets for speculative decoding, built deterministically from the shipped data.

Seven categories of work a user would speculate on, each split into a `tune` part and a `heldout`
part that no tuning may look at:

| category | built from | tune | heldout |
|---|---|---|---|
| summarization | one WikiText-2 article, its first ~450 words, "summarize" | valid | test |
| rag_qa | three passages of different articles, numbered, and a question on one of them | valid | test |
| translation | one WikiText-2 sentence of 12-35 words, into French / German / Spanish | valid | test |
| editing | one paragraph: fix planted typos, or rewrite keeping every sentence | valid | test |
| open_qa | MT-Bench stem and humanities first turns | even ids | odd ids |
| math | MT-Bench math and reasoning first turns | even ids | odd ids |
| chat | MT-Bench writing, roleplay, coding and extraction first turns | even ids | odd ids |

WikiText-2 valid is the data set's tuning split and test its reporting split, so the two parts of
the WikiText categories never share an article; MT-Bench splits by question id. Every prompt is a
single user message; `edgerun.bench.speculative_runs` wraps it in the model's chat template as
`edge-run run` does.
"""
from __future__ import annotations

import re

from .. import data

CATEGORIES = ("summarization", "rag_qa", "translation", "editing", "open_qa", "math", "chat")
SPLITS = ("tune", "heldout")
_MT_BENCH = {"open_qa": ("stem", "humanities"), "math": ("math", "reasoning"),
             "chat": ("writing", "roleplay", "coding", "extraction")}
_WIKITEXT_SPLIT = {"tune": "valid", "heldout": "test"}
_LANGUAGES = ("French", "German", "Spanish")
WIKITEXT_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                  (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")")]


def detokenize(text: str) -> str:
    """Undo WikiText's spaced-out punctuation so the text reads as ordinary prose."""
    for old, new in WIKITEXT_JOINS:
        text = text.replace(old, new)
    text = re.sub(r'" ([^"]*?) "', r'"\1"', text)
    return text.strip().removesuffix(" .").rstrip() + ("" if text.strip().endswith(".") else ".")


def articles(split: str) -> list[tuple[str, list[str]]]:
    """WikiText-2 `split` ("valid" or "test") as (title, paragraphs) per article; paragraphs under
    40 words or with more than two <unk> placeholders (shown as "[...]") are left out."""
    out: list[tuple[str, list[str]]] = []
    for line in data.wikitext(split).splitlines():
        text = line.strip()
        if re.fullmatch(r"= [^=].* =", text):
            out.append((detokenize(text.strip("= ")).rstrip("."), []))
        elif out and text and not text.startswith("=") and text.count("<unk>") <= 2 and len(text.split()) >= 40:
            out[-1][1].append(detokenize(text.replace("<unk>", "[...]")))
    return [(title, paras) for title, paras in out if paras]


def typos(text: str) -> str:
    """Swap two inner letters of every 7th long word: a deterministic 'fix the typos' task."""
    words = text.split()
    for i in range(3, len(words), 7):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def _words(text: str, most: int) -> str:
    words = text.split()
    return " ".join(words[:most]) + ("..." if len(words) > most else "")


def _summarization(arts: list, n: int) -> list[str]:
    out = []
    for _, paras in arts:
        body = "\n\n".join(paras)
        if len(body.split()) >= 350:
            out.append("Summarize the following article in a short paragraph.\n\n" + _words(body, 450))
        if len(out) == n:
            break
    return out


def _rag_qa(arts: list, n: int) -> list[str]:
    # from the second third of the articles on, so summaries and passages rarely share one
    usable = [(title, paras) for title, paras in arts[len(arts) // 3:] if len(paras[0].split()) >= 60]
    out = []
    for i in range(n):
        # three passages of neighbouring articles; the question asks about the middle one
        picked = usable[3 * i:3 * i + 3]
        if len(picked) < 3:
            break
        passages = "\n\n".join(f"Passage {k + 1}: {_words(p[0], 160)}" for k, (_, p) in enumerate(picked))
        out.append("Answer the question using only the passages below, and say which passage you used.\n\n"
                   f"{passages}\n\nQuestion: What do the passages say about {picked[1][0]}?")
    return out


def _translation(arts: list, n: int) -> list[str]:
    out = []
    for _, paras in arts[len(arts) // 2:]:
        sentence = next((s for s in re.split(r"(?<=\.) ", paras[0]) if 12 <= len(s.split()) <= 35), None)
        if sentence:
            out.append(f"Translate the following sentence into {_LANGUAGES[len(out) % 3]}:\n\n{sentence}")
        if len(out) == n:
            break
    return out


def _editing(arts: list, n: int) -> list[str]:
    tasks = [("Fix the spelling mistakes in this text and return the corrected text in full:\n\n", typos),
             ("Rewrite the following text in plain, simple English, keeping every sentence:\n\n", str)]
    out = []
    for _, paras in arts[2 * len(arts) // 3:]:  # not the articles summaries and passages start with
        para = next((p for p in paras if 90 <= len(p.split()) <= 200), None)
        if para:
            prefix, change = tasks[len(out) % len(tasks)]
            out.append(prefix + change(para))
        if len(out) == n:
            break
    return out


def _mt_bench(categories: tuple[str, ...], split: str, n: int) -> list[str]:
    keep = 0 if split == "tune" else 1
    by_category = {c: [r["turns"][0] for r in data.mt_bench()
                       if r["category"] == c and r["question_id"] % 2 == keep] for c in categories}
    mixed = [p for group in zip(*by_category.values()) for p in group]  # round-robin over categories
    return mixed[:n]


def prompt_set(category: str, split: str, n: int = 4) -> list[str]:
    """The first `n` prompts (user messages) of one category's `split` part.

    Raises:
        ValueError: an unknown category or split.
    """
    if category not in CATEGORIES:
        raise ValueError(f"unknown prompt category {category!r}; choose from {', '.join(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose tune or heldout")
    if category in _MT_BENCH:
        return _mt_bench(_MT_BENCH[category], split, n)
    arts = articles(_WIKITEXT_SPLIT[split])
    builders = {"summarization": _summarization, "rag_qa": _rag_qa, "translation": _translation,
                "editing": _editing}
    return builders[category](arts, n)


def prompt_sets(split: str, n: int = 4, categories: tuple[str, ...] = CATEGORIES) -> dict[str, list[str]]:
    """{category: its first n prompts of `split`}, in CATEGORIES order."""
    return {c: prompt_set(c, split, n) for c in categories}
