"""Speculative decoding runs: speedup over plain decoding of the same target, per drafter.

    python -m edgerun.bench.speculative_runs TARGET --drafters lookup self:10 draft:PKG \
        --prompts mt_bench edit --n 8 --new-tokens 128 --json out.json
    python -m edgerun.bench.speculative_runs TARGET --drafters lookup suffix draft:PKG auto:PKG \
        --prompts all --split tune heldout --n 2 --new-tokens 64 --check-invariant

The speculative section of `edge-run bench --speculative` (which runs this module in its own
process); bench/experiments/speculative.py adds llama-cpp-python's loop as a peer on the same runs.
For every prompt, plain greedy decoding and each drafter run back to back (interleaved, after a
warm-up), so machine noise hits all alike. A run ends at the model's end-of-turn token or after
--new-tokens, as a user's would; plain and speculative outputs are identical, so both generate
the same tokens. --ignore-eos makes every run generate --new-tokens (the model goes on past the
end of its answer, text no user asks for and that a lookup rarely finds in the prompt). Reported
per drafter and prompt set: decode tokens/s (median over prompts of generated tokens / wall time
after the first token), speedup = plain time / speculative time summed over prompts, from the
call to the last token (prompt, a draft model's own prefill and first token included; "decode
only" counts from the first token on), acceptance rate, mean accepted tokens per verification,
histogram of accepted lengths, and whether every output equalled plain greedy. The categories of
bench/prompt_sets.py run once per --split, each part reported per set and as the mean over its
sets (never one set alone); --check-invariant checks every output against plain greedy of a
batch-invariant engine, the exact reference of speculation on quantized weights. Speculation runs
as `edge-run run --speculative` does: exact by default (with quantized weights, invariant steps;
on llama.cpp from a second engine loaded with speculative=True), so against the default engine's
fast plain decoding "identical" can be False at near-ties (README, "Exactness"); with
--inexact-speculation every drafter also runs with exact=False (tagged [inexact]). With
--batch-invariant, a second engine of the same target with batch_invariant=True runs plain and
every drafter in the same rounds; its runs are compared with its own plain run (exactness) and
with the default engine's plain run (what invariance costs or gains overall).
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from .. import data
from ..version import __version__
from . import command, parser
from .prompt_sets import CATEGORIES, SPLITS, WIKITEXT_JOINS, prompt_set, typos
from .report import write_json

# a run: (tokens, new_tokens) -> (generated tokens, seconds from the call, seconds from the first token)
Run = Callable[[list[int], int], tuple[list[int], float, float]]
# name -> (run, name of the plain run it is compared with or None, engine whose stats it reports or None)
Runners = dict[str, tuple[Run, "str | None", object]]
PROMPT_SETS = ("mt_bench", "edit")  # the sets the drafters were first tuned on (README)


def _paragraphs(n: int, min_words: int = 90, max_words: int = 160) -> list[str]:
    """The first n WikiText-2 test paragraphs of a size a small model can rewrite."""
    out = []
    for line in data.wikitext("test").splitlines():
        words = line.split()
        # whole, natural paragraphs: no headings, no <unk> placeholders of the WikiText vocabulary
        if min_words <= len(words) and not line.strip().startswith("=") and "<unk>" not in line:
            out.append(_detokenize(" ".join(words[:max_words])))
        if len(out) == n:
            break
    return out


def _detokenize(text: str) -> str:
    """Undo WikiText's spaced-out punctuation so the paragraphs read as ordinary prose."""
    for old, new in WIKITEXT_JOINS:
        text = text.replace(old, new)
    return re.sub(r'" ([^"]*?) "', r'"\1"', text).rstrip(" .") + "."


def prompt_sets(n: int) -> dict[str, list[str]]:
    """Prompt sets: MT-Bench first turns, and summarization/editing tasks over WikiText-2 test."""
    per_category: dict[str, list[str]] = {}
    for r in data.mt_bench():
        per_category.setdefault(r["category"], []).append(r["turns"][0])
    mt = [p for group in zip(*per_category.values()) for p in group][:n]  # round-robin over categories
    paras = _paragraphs(n)
    tasks = [("Fix the spelling mistakes in this text and return the corrected text in full:\n\n", typos),
             ("Summarize the following text:\n\n", str),
             ("Rewrite the following text, keeping every sentence but changing \"the\" to \"that\" where it "
              "fits:\n\n", str)]
    edit = [tasks[i % len(tasks)][0] + tasks[i % len(tasks)][1](p) for i, p in enumerate(paras)]
    return {"mt_bench": mt, "edit": edit}


def timed_run(engine, tokens: list[int], new_tokens: int, **kw) -> tuple[list[int], float, float]:
    """One generation: its tokens, seconds from the call to the last token, and from the first."""
    start = time.perf_counter()
    out, first = [], None
    for r in engine.generate(tokens, max_new_tokens=new_tokens, **kw):
        if first is None:
            first = time.perf_counter()
        out.append(r.token)
    end = time.perf_counter()
    return out, end - start, end - (first or start)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def engine_runners(engines: dict[str, object], drafters: list[str], draft_tokens: list[int | str],
                   ignore_eos: bool, speculating: dict[str, object] | None = None) -> Runners:
    """Plain and every drafter x draft length on each engine (tagged by its key in `engines`);
    a tag's drafters run on `speculating[tag]` when given (an engine loaded for exact speculation),
    and a tag ending in "[inexact]" runs them with exact=False after the plain run of tag "" ."""
    runners: Runners = {}
    for tag, engine in engines.items():
        plain = "plain" if tag.endswith("[inexact]") else f"plain{tag}"
        if plain not in runners:
            runners[plain] = (lambda t, n, e=engine: timed_run(e, t, n, ignore_eos=ignore_eos), None, None)
        spec = (speculating or {}).get(tag, engine)
        kw = {"exact": False} if tag.endswith("[inexact]") else {}
        for d in drafters:
            for k in draft_tokens:  # "auto" keeps the drafter's name; a fixed length is named
                name = f"{d}{'' if k == 'auto' else f' k={k}'}{tag}"
                runners[name] = (lambda t, n, d=d, e=spec, k=k, kw=kw: timed_run(e, t, n, speculative=d, draft_tokens=k,
                                                                                ignore_eos=ignore_eos, **kw),
                                 plain, spec)
    return runners


def compare(runners: Runners, prompts_by_set: dict[str, list[list[int]]], new_tokens: int, ignore_eos: bool,
            title: str, references: dict[str, str] | None = None) -> list[dict]:
    """Run every runner on every prompt, interleaved; print a table per prompt set; the result rows.
    `references` names, per runner, the run its output must equal when that is not its baseline
    (a batch-invariant plain run for exact speculation on quantized weights)."""
    results, references = [], references or {}
    for set_name, prompts in prompts_by_set.items():
        for run, *_ in runners.values():
            run(prompts[0][:12], 8)  # warm-up, on the template's start: no output of a measured prompt
        rows = {name: {"s": 0.0, "decode_s": 0.0, "identical": True, "proposed": 0, "accepted": 0, "rounds": 0,
                       "histogram": {}, "tok_s": [], "tokens": 0} for name in runners}
        for tokens in prompts:
            outputs = {}
            for name, (run, _, stats_of) in runners.items():  # interleaved: noise hits every runner alike
                out, seconds, decode = outputs[name] = run(tokens, new_tokens)
                row = rows[name]
                row["s"] += seconds
                row["decode_s"] += decode
                row["tokens"] += len(out)
                if len(out) > 1:  # a run that ends at its first token has no decode rate
                    row["tok_s"].append((len(out) - 1) / decode)
                if stats_of is not None:
                    st = stats_of.stats
                    row["proposed"] += st.proposed
                    row["accepted"] += st.accepted
                    row["rounds"] += st.rounds
                    for k, v in st.histogram.items():
                        row["histogram"][k] = row["histogram"].get(k, 0) + v
            for name, (_, base, _) in runners.items():  # once every run of this prompt is done
                if base is not None:
                    rows[name]["identical"] &= outputs[name][0] == outputs[references.get(name, base)][0]
        generated = rows["plain"]["tokens"] / len(prompts)
        print(f"\n[{set_name}] {len(prompts)} prompts x {'' if ignore_eos else 'up to '}{new_tokens} tokens "
              f"({generated:.0f} per run on average), {title}")
        for name, (_, base, _) in runners.items():
            row = rows[name]
            tok_s = _median(row["tok_s"])
            line = f"  {name:18} {tok_s:7.1f} tok/s"
            result = {"prompts": set_name, "drafter": name, "tok_s_median": tok_s,
                      "tokens_per_run": row["tokens"] / len(prompts)}
            if base is not None:
                speedup, decode_speedup = rows[base]["s"] / row["s"], rows[base]["decode_s"] / row["decode_s"]
                line += f"  x{speedup:.2f} over {base} (decode only x{decode_speedup:.2f})"
                result |= {"baseline": base, "speedup": speedup, "decode_speedup": decode_speedup,
                           "identical": row["identical"],
                           "plain_tok_s_median": _median(rows[base]["tok_s"])}
                if row["proposed"]:
                    rate, mean = row["accepted"] / row["proposed"], row["accepted"] / row["rounds"]
                    line += f", accepted {rate:.0%}, {mean:.2f}/verification"
                    result |= {"acceptance_rate": rate, "mean_accepted": mean,
                               "histogram": dict(sorted(row["histogram"].items()))}
                line += f", identical: {row['identical']}"
            if name.endswith(" [inv]"):  # the batch-invariant engine against the default one
                result["speedup_over_default_plain"] = rows["plain"]["s"] / row["s"]
                line += f"; x{result['speedup_over_default_plain']:.2f} over plain"
            print(line)
            results.append(result)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of these runs (bench/experiments/speculative.py adds its own)."""
    p.add_argument("target", help="target package or model")
    p.add_argument("--drafters", nargs="+", default=["lookup"], help="lookup, self:K, draft:PATH")
    p.add_argument("--prompts", nargs="+", default=list(PROMPT_SETS), choices=[*PROMPT_SETS, *CATEGORIES, "all"],
                   help="prompt sets: the first-tuned mt_bench and edit, or categories of bench/prompt_sets.py "
                        "(all: every category), run on each --split")
    p.add_argument("--split", nargs="+", default=["heldout"], choices=SPLITS,
                   help="parts of the categories' sets to run (default heldout; tune is what tuning may look at)")
    p.add_argument("--n", type=int, default=8, help="prompts per set")
    p.add_argument("--new-tokens", type=int, default=128, help="most tokens per run (default 128)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --new-tokens every run, past the model's end-of-turn token")
    p.add_argument("--draft-tokens", nargs="+", default=["auto"], metavar="N|auto",
                   help="draft lengths to run for every drafter, side by side (e.g. auto 8)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-invariant", action="store_true",
                   help="also run plain and every drafter on a batch-invariant engine (tagged [inv]), "
                        "interleaved with the default engine's runs")
    p.add_argument("--check-invariant", action="store_true",
                   help="also run plain decoding on a batch-invariant engine and check every drafter's output "
                        "against it (exact speculation on quantized weights equals that reference)")
    p.add_argument("--inexact-speculation", action="store_true",
                   help="also run every drafter with exact=False on the default engine (tagged [inexact])")
    p.add_argument("--json", type=Path, default=None)


def draft_lengths(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[int | str]:
    """--draft-tokens as "auto" or integers >= 1; anything else ends in the parser's error."""
    if any(k != "auto" and not (k.isdigit() and int(k) >= 1) for k in args.draft_tokens):
        p.error(f"--draft-tokens takes integers >= 1 or auto, got {' '.join(args.draft_tokens)}")
    return [k if k == "auto" else int(k) for k in args.draft_tokens]


# more runners on the same prompts: (prompts by set, the tokens that end a run) -> (runners, title note)
Extra = Callable[[dict[str, list[list[int]]], frozenset[int]], tuple[Runners, str]]


def run(args: argparse.Namespace, draft_tokens: list[int | str], extra: Extra | None = None) -> dict:
    """The runs `add_arguments`' flags describe; prints a table per prompt set, returns the report
    (also written to --json)."""
    from ..hub import load
    from ..runtime.backend import inexact_verification_types

    engine = load(args.target, threads=args.threads, max_context=2048)
    engines, speculating = {"": engine}, {}
    if getattr(engine.backend, "invariant_at_load", False) and inexact_verification_types(engine.manifest.weights):
        # exact speculation there needs kernels chosen at load, as `edge-run run --speculative` loads them
        speculating[""] = load(args.target, threads=args.threads, max_context=2048, speculative=True)
    if args.inexact_speculation:
        engines[" [inexact]"] = engine
    if args.batch_invariant:
        engines[" [inv]"] = load(args.target, threads=args.threads, max_context=2048, batch_invariant=True)
    texts = _texts(args.prompts, args.split, args.n)
    prompts_by_set = {name: [engine.encode(engine.apply_chat_template([{"role": "user", "content": t}]),
                                           add_special_tokens=False) for t in batch] for name, batch in texts.items()}
    runners = engine_runners(engines, args.drafters, draft_tokens, args.ignore_eos, speculating)
    references = {}
    if args.check_invariant:
        invariant = load(args.target, threads=args.threads, max_context=2048, batch_invariant=True)
        runners["plain [inv ref]"] = (lambda t, n: timed_run(invariant, t, n, ignore_eos=args.ignore_eos), None, None)
        references = {name: "plain [inv ref]" for name, (_, base, _) in runners.items() if base == "plain"}
    title = f"target {args.target}"
    if extra is not None:
        more, note = extra(prompts_by_set, frozenset() if args.ignore_eos else engine.eos_token_ids)
        runners |= more
        title += note
    results = compare(runners, prompts_by_set, args.new_tokens, args.ignore_eos, title, references)
    means = mean_speedups(results)
    report = {"machine": platform.processor() or platform.machine(), "edge_run": __version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "results": results, "means": means}
    if args.json:
        write_json(args.json, report)
    return report


def _texts(names: list[str], splits: list[str], n: int) -> dict[str, list[str]]:
    """User messages per prompt set: a category of bench/prompt_sets.py once per split, named
    "category[split]", or a first-tuned set (mt_bench, edit) by name."""
    legacy = prompt_sets(n) if set(names) & set(PROMPT_SETS) else {}
    names = [c for name in names for c in (CATEGORIES if name == "all" else [name])]
    out = {}
    for split in splits:
        out |= {f"{name}[{split}]": prompt_set(name, split, n) for name in dict.fromkeys(names) if name in CATEGORIES}
    return out | {name: legacy[name] for name in names if name in PROMPT_SETS}


def mean_speedups(results: list[dict]) -> list[dict]:
    """Per drafter and part (tune, heldout, other): the mean speedup over its sets, printed."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        if "speedup" in r:
            part = r["prompts"].partition("[")[2].rstrip("]") or "other"
            groups.setdefault((r["drafter"], part), []).append(r)
    means = []
    if groups:
        print("\nmean over prompt sets (speedup end to end, decode only; identical in every set)")
    for (drafter, part), rows in groups.items():
        mean = {"drafter": drafter, "part": part, "sets": len(rows),
                "speedup": statistics.fmean(r["speedup"] for r in rows),
                "decode_speedup": statistics.fmean(r["decode_speedup"] for r in rows),
                "min_speedup": min(r["speedup"] for r in rows), "identical": all(r["identical"] for r in rows)}
        print(f"  {drafter:18} {part:8} x{mean['speedup']:.2f} (decode x{mean['decode_speedup']:.2f}) over "
              f"{len(rows)} sets, lowest x{mean['min_speedup']:.2f}, identical: {mean['identical']}")
        means.append(mean)
    return means


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m edgerun.bench.speculative_runs", __doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args, draft_lengths(p, args))


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.speculative_runs")
