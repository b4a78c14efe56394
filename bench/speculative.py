"""Speculative decoding benchmark: speedup over plain decoding of the same target, per drafter.

    python -m edgerun.bench.speculative TARGET --drafters lookup self:10 draft:PKG \
        --prompts mt_bench edit --n 8 --new-tokens 128 --json out.json

For every prompt, plain greedy decoding and each drafter run back to back (interleaved, after a
warm-up), so machine noise hits all alike. Reported per drafter and prompt set: decode tokens/s
(median over prompts of generated tokens / wall time after the first token), speedup = plain
time / speculative time summed over prompts, acceptance rate, mean accepted tokens per
verification, histogram of accepted lengths, and whether every output equalled plain greedy.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import time
from pathlib import Path

from .. import __version__
from .decode_speed import find_data_dir

log = logging.getLogger(__name__)


def _paragraphs(n: int, min_words: int = 90, max_words: int = 160) -> list[str]:
    """The first n WikiText-2 test paragraphs of a size a small model can rewrite."""
    lines = (find_data_dir() / "wikitext-2" / "test.txt").read_text().splitlines()
    out = []
    for line in lines:
        words = line.split()
        # whole, natural paragraphs: no headings, no <unk> placeholders of the WikiText vocabulary
        if min_words <= len(words) and not line.strip().startswith("=") and "<unk>" not in line:
            out.append(_detokenize(" ".join(words[:max_words])))
        if len(out) == n:
            break
    return out


_WIKITEXT_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                   (" : ", ": "), (" 's ", "'s "), (" n't ", "n't "), ("( ", "("), (" )", ")")]


def _detokenize(text: str) -> str:
    """Undo WikiText's spaced-out punctuation so the paragraphs read as ordinary prose."""
    for old, new in _WIKITEXT_JOINS:
        text = text.replace(old, new)
    return re.sub(r'" ([^"]*?) "', r'"\1"', text).rstrip(" .") + "."


def _typos(text: str) -> str:
    """Swap two inner letters of every 7th long word: a deterministic 'fix the typos' task."""
    words = text.split()
    for i in range(3, len(words), 7):
        w = words[i]
        if len(w) > 4 and w.isalpha():
            words[i] = w[0] + w[2] + w[1] + w[3:]
    return " ".join(words)


def prompt_sets(n: int) -> dict[str, list[str]]:
    """Prompt sets: MT-Bench first turns, and summarization/editing tasks over WikiText-2 test."""
    rows = [json.loads(line) for line in (find_data_dir() / "prompts" / "mt_bench.jsonl").read_text().splitlines()]
    per_category: dict[str, list[str]] = {}
    for r in rows:
        per_category.setdefault(r["category"], []).append(r["turns"][0])
    mt = [p for group in zip(*per_category.values()) for p in group][:n]  # round-robin over categories
    paras = _paragraphs(n)
    tasks = [("Fix the spelling mistakes in this text and return the corrected text in full:\n\n", _typos),
             ("Summarize the following text:\n\n", str),
             ("Rewrite the following text, keeping every sentence but changing \"the\" to \"that\" where it "
              "fits:\n\n", str)]
    edit = [tasks[i % len(tasks)][0] + tasks[i % len(tasks)][1](p) for i, p in enumerate(paras)]
    return {"mt_bench": mt, "edit": edit}


def _run(engine, tokens: list[int], new_tokens: int, **kw) -> tuple[list[int], float]:
    start = time.perf_counter()
    out, first = [], None
    for r in engine.generate(tokens, max_new_tokens=new_tokens, **kw):
        if first is None:
            first = time.perf_counter()
        out.append(r.token)
    return out, time.perf_counter() - (first or start)


def main(argv: list[str] | None = None) -> dict:
    import edgerun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="target package or model")
    p.add_argument("--drafters", nargs="+", default=["lookup"], help="lookup, self:K, draft:PATH")
    p.add_argument("--prompts", nargs="+", default=["mt_bench", "edit"], choices=["mt_bench", "edit"])
    p.add_argument("--n", type=int, default=8, help="prompts per set")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--draft-tokens", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    draft_tokens = args.draft_tokens if args.draft_tokens == "auto" else int(args.draft_tokens)

    engine = edgerun.load(args.target, threads=args.threads, max_context=2048)
    engine.eos_token_ids = frozenset()  # equal lengths: every run generates new_tokens
    sets = prompt_sets(args.n)
    results = []
    for set_name in args.prompts:
        prompts = [engine.encode(engine.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
                   for t in sets[set_name]]
        _run(engine, prompts[0], 8)  # warm-up
        for d in args.drafters:
            _run(engine, prompts[0], 8, speculative=d, draft_tokens=draft_tokens)
        plain_s, spec = 0.0, {d: {"s": 0.0, "identical": True, "proposed": 0, "accepted": 0, "rounds": 0,
                                  "histogram": {}, "tok_s": []} for d in args.drafters}
        plain_rates = []
        for tokens in prompts:
            base, t = _run(engine, tokens, args.new_tokens)
            plain_s += t
            plain_rates.append((len(base) - 1) / t)
            for d in args.drafters:
                out, ts = _run(engine, tokens, args.new_tokens, speculative=d, draft_tokens=draft_tokens)
                row, st = spec[d], engine.stats
                row["s"] += ts
                row["tok_s"].append((len(out) - 1) / ts)
                row["identical"] &= out == base
                row["proposed"] += st.proposed
                row["accepted"] += st.accepted
                row["rounds"] += st.rounds
                for k, v in st.histogram.items():
                    row["histogram"][k] = row["histogram"].get(k, 0) + v
        print(f"\n[{set_name}] {len(prompts)} prompts x {args.new_tokens} tokens, target {args.target}")
        print(f"  plain             {statistics.median(plain_rates):7.1f} tok/s")
        for d, row in spec.items():
            speedup = plain_s / row["s"]
            rate = row["accepted"] / row["proposed"] if row["proposed"] else 0.0
            mean = row["accepted"] / row["rounds"] if row["rounds"] else 0.0
            print(f"  {d:16} {statistics.median(row['tok_s']):7.1f} tok/s  x{speedup:.2f}  accepted {rate:.0%}, "
                  f"{mean:.2f}/verification, identical: {row['identical']}")
            results.append({"prompts": set_name, "drafter": d, "speedup": speedup, "acceptance_rate": rate,
                            "mean_accepted": mean, "identical": row["identical"],
                            "histogram": dict(sorted(row["histogram"].items())),
                            "tok_s_median": statistics.median(row["tok_s"]),
                            "plain_tok_s_median": statistics.median(plain_rates)})
    report = {"machine": platform.processor() or platform.machine(), "edge_run": __version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
