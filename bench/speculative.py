"""Speculative decoding benchmark: speedup over plain decoding of the same target, per drafter.

    python -m edgerun.bench.speculative TARGET --drafters lookup self:10 draft:PKG \
        --prompts mt_bench edit --n 8 --new-tokens 128 --json out.json
    python -m edgerun.bench.speculative TARGET --drafters lookup --prompts edit --llamacpp smollm2-135m
    python -m edgerun.bench.speculative TARGET --drafters lookup --draft-tokens auto 8   # policy vs fixed

For every prompt, plain greedy decoding and each drafter run back to back (interleaved, after a
warm-up), so machine noise hits all alike. A run ends at the model's end-of-turn token or after
--new-tokens, as a user's would; plain and speculative outputs are identical, so both generate
the same tokens. --ignore-eos makes every run generate --new-tokens (the model goes on past the
end of its answer, text no user asks for and that a lookup rarely finds in the prompt). Reported per drafter and prompt set: decode tokens/s
(median over prompts of generated tokens / wall time after the first token), speedup = plain
time / speculative time summed over prompts, from the call to the last token (prompt, a draft
model's own prefill and first token included; "decode only" counts from the first token on),
acceptance rate, mean accepted tokens per
verification, histogram of accepted lengths, and whether every output equalled plain greedy.
With --batch-invariant, a second engine of the same target with batch_invariant=True runs plain
and every drafter in the same rounds; its runs are compared with its own plain run (exactness)
and with the default engine's plain run (what invariance costs or gains overall).
With --llamacpp, llama-cpp-python's own loop runs in the same rounds on that GGUF, plain and with
its prompt lookup decoding, and its speedup is over its own plain run (same prompt tokens).
"""
from __future__ import annotations

import json
import logging
import platform
import re
import statistics
import time
from pathlib import Path

from .. import __version__
from .decode_speed import find_data_dir
from .report import write_json
from . import command, parser

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


def _run(engine, tokens: list[int], new_tokens: int, **kw) -> tuple[list[int], float, float]:
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


class LlamaCppPeer:
    """llama-cpp-python's own loop (`Llama.generate`, greedy) on a GGUF, plain and with its prompt
    lookup decoding (`LlamaPromptLookupDecoding` as `draft_model`): the peer a user would pick.

    Args:
        gguf: the GGUF file; threads: llama.cpp threads; n_ctx: context (prompt + new tokens);
        stop: token ids that end a run (included), as in our engine's runs;
        max_ngram, num_pred_tokens: LlamaPromptLookupDecoding's settings (its defaults: 2, 10).
    """

    def __init__(self, gguf: Path, threads: int, n_ctx: int, stop: frozenset[int] = frozenset(),
                 max_ngram: int = 2, num_pred_tokens: int = 10):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # flash attention off as in bench.llamacpp_overhead (llama-cpp-python's default too)
        kw = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, flash_attn=False,
                  verbose=False)
        self.plain = llama_cpp.Llama(str(gguf), **kw)
        self.lookup = llama_cpp.Llama(str(gguf), draft_model=LlamaPromptLookupDecoding(max_ngram, num_pred_tokens), **kw)
        self.settings = f"max_ngram_size={max_ngram}, num_pred_tokens={num_pred_tokens}"
        self.stop = stop

    def run(self, llm, tokens: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """As `_run`, with llama-cpp-python's greedy loop."""
        from .llamacpp_overhead import llama_cpp_greedy

        out, start, stamps = llama_cpp_greedy(llm, tokens, new_tokens, self.stop)
        return out, stamps[-1] - start, stamps[-1] - stamps[0]


def _runners(engines: dict[str, object], args, draft_tokens, peer: LlamaCppPeer | None) -> dict:
    """name -> (run(tokens, new_tokens) -> (tokens, seconds, decode seconds), name of the plain run it is compared
    with, the engine whose stats it reports or None)."""
    runners = {}
    for tag, engine in engines.items():
        plain = f"plain{tag}"
        runners[plain] = (lambda t, n, e=engine: _run(e, t, n), None, None)
        for d in args.drafters:
            for k in draft_tokens:  # "auto" keeps the drafter's name; a fixed length is named
                name = f"{d}{'' if k == 'auto' else f' k={k}'}{tag}"
                runners[name] = (lambda t, n, d=d, e=engine, k=k: _run(e, t, n, speculative=d, draft_tokens=k),
                                 plain, engine)
    if peer is not None:
        runners["llama.cpp plain"] = (lambda t, n: peer.run(peer.plain, t, n), None, None)
        runners["llama.cpp lookup"] = (lambda t, n: peer.run(peer.lookup, t, n), "llama.cpp plain", None)
    return runners


def main(argv: list[str] | None = None) -> dict:
    import edgerun
    from ..devices.providers import physical_cores

    p = parser("python -m edgerun.bench.speculative", __doc__)
    p.add_argument("target", help="target package or model")
    p.add_argument("--drafters", nargs="+", default=["lookup"], help="lookup, self:K, draft:PATH")
    p.add_argument("--prompts", nargs="+", default=["mt_bench", "edit"], choices=["mt_bench", "edit"])
    p.add_argument("--n", type=int, default=8, help="prompts per set")
    p.add_argument("--new-tokens", type=int, default=128, help="most tokens per run (default 128)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --new-tokens every run, past the model's end-of-turn token")
    p.add_argument("--draft-tokens", nargs="+", default=["auto"], metavar="N|auto",
                   help="draft lengths to run for every drafter, side by side (e.g. auto 8)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--llamacpp", default=None, metavar="GGUF",
                   help="also run llama-cpp-python plain and with its prompt lookup decoding on this GGUF "
                        "(file, known model name or package with a GGUF), interleaved with ours")
    p.add_argument("--batch-invariant", action="store_true",
                   help="also run plain and every drafter on a batch-invariant engine (tagged [inv]), "
                        "interleaved with the default engine's runs")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if any(k != "auto" and not (k.isdigit() and int(k) >= 1) for k in args.draft_tokens):
        p.error(f"--draft-tokens takes integers >= 1 or auto, got {' '.join(args.draft_tokens)}")
    draft_tokens = [k if k == "auto" else int(k) for k in args.draft_tokens]

    engine = edgerun.load(args.target, threads=args.threads, max_context=2048)
    engines = {"": engine}
    if args.batch_invariant:
        engines[" [inv]"] = edgerun.load(args.target, threads=args.threads, max_context=2048, batch_invariant=True)
    stop = frozenset() if args.ignore_eos else engine.eos_token_ids
    for e in engines.values():
        e.eos_token_ids = stop
    sets = prompt_sets(args.n)
    prompts_by_set = {name: [engine.encode(engine.apply_chat_template([{"role": "user", "content": t}]),
                                           add_special_tokens=False) for t in sets[name]] for name in args.prompts}
    peer = None
    if args.llamacpp:
        from ..export.models import resolve_package
        from ..runtime.manifest import read_manifest

        package = resolve_package(args.llamacpp, backend="llamacpp")  # no model loaded just for its path
        gguf = read_manifest(package).gguf_path(package)
        longest = max(len(t) for prompts in prompts_by_set.values() for t in prompts)
        peer = LlamaCppPeer(gguf, args.threads or physical_cores(), longest + args.new_tokens + 16, stop)
    runners = _runners(engines, args, draft_tokens, peer)
    results = []
    for set_name, prompts in prompts_by_set.items():
        for run, *_ in runners.values():
            run(prompts[0], 8)  # warm-up
        rows = {name: {"s": 0.0, "decode_s": 0.0, "identical": True, "proposed": 0, "accepted": 0, "rounds": 0, "histogram": {},
                       "tok_s": [], "tokens": 0} for name in runners}
        for tokens in prompts:
            outputs = {}
            for name, (run, base, stats_of) in runners.items():  # interleaved: noise hits every runner alike
                out, seconds, decode = outputs[name] = run(tokens, args.new_tokens)
                row = rows[name]
                row["s"] += seconds
                row["decode_s"] += decode
                row["tokens"] += len(out)
                if len(out) > 1:  # a run that ends at its first token has no decode rate
                    row["tok_s"].append((len(out) - 1) / decode)
                if base is not None:
                    row["identical"] &= out == outputs[base][0]
                if stats_of is not None:
                    st = stats_of.stats
                    row["proposed"] += st.proposed
                    row["accepted"] += st.accepted
                    row["rounds"] += st.rounds
                    for k, v in st.histogram.items():
                        row["histogram"][k] = row["histogram"].get(k, 0) + v
        generated = rows["plain"]["tokens"] / len(prompts)
        print(f"\n[{set_name}] {len(prompts)} prompts x {'' if args.ignore_eos else 'up to '}{args.new_tokens} tokens "
              f"({generated:.0f} per run on average), target {args.target}"
              + (f"; llama-cpp-python on {peer.plain.model_path} ({peer.settings})" if peer else ""))
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
    report = {"machine": platform.processor() or platform.machine(), "edge_run": __version__,
              "args": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.speculative")
