"""Exact speculation: which plain greedy output does default speculative greedy output equal?

    python bench/experiments/exact_speculation.py PKG [PKG ...] --drafters lookup draft:PKG --n 8 \
        --new-tokens 64 --threads 2 --rounds 3

Per package and MT-Bench prompt (first turns, round-robin over categories, through the chat
template): plain greedy on the default engine (fast one-token kernels) and on a batch_invariant=True
engine (the invariant reference); per drafter, speculative greedy with the default exact=True (on a
backend that chooses its kernels at load, llama.cpp, from an engine loaded with speculative=True,
as `edge-run run --speculative` loads it) and with exact=False on the default engine. Printed per
drafter: in how many prompts each speculative output equals each plain one. Then what making plain
decoding invariant would cost: `--rounds` interleaved rounds of fast and invariant plain decoding
over the same prompts, decode time from the first token on, the median of the rounds' ratios.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from edgerun.bench import command, parser
from edgerun.bench.report import write_json
from edgerun.bench.speculative_runs import prompt_sets


def _greedy(engine, tokens: list[int], new_tokens: int, **kw) -> tuple[list[int], float]:
    """Generated tokens (up to the end-of-turn token) and seconds from the first token to the last."""
    out, first = [], None
    for r in engine.generate(tokens, max_new_tokens=new_tokens, **kw):
        first = first or time.perf_counter()
        out.append(r.token)
    return out, time.perf_counter() - first


def probe(package: str, drafters: list[str], n: int, new_tokens: int, rounds: int, threads: int | None) -> dict:
    from edgerun.hub import load

    fast = load(package, threads=threads, max_context=2048)
    invariant = load(package, threads=threads, max_context=2048, batch_invariant=True)
    at_load = getattr(fast.backend, "invariant_at_load", False)
    exact = load(package, threads=threads, max_context=2048, speculative=True) if at_load else fast
    prompts = [fast.encode(fast.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in prompt_sets(n)["mt_bench"]]
    plain = [_greedy(fast, p, new_tokens)[0] for p in prompts]
    reference = [_greedy(invariant, p, new_tokens)[0] for p in prompts]
    result = {"package": package, "backend": fast.backend.name, "prompts": len(prompts), "new_tokens": new_tokens,
              "weights": sorted({t for v in fast.manifest.weights.values() for t in v.split("+")}),
              "invariant_plain_equals_fast_plain": sum(a == b for a, b in zip(reference, plain)), "drafters": {}}
    for drafter in drafters:
        row = {}
        for name, engine, kw in (("exact", exact, {}), ("inexact", fast, {"exact": False})):
            outs = [_greedy(engine, p, new_tokens, speculative=drafter, **kw)[0] for p in prompts]
            row[name] = {"equals_fast_plain": sum(a == b for a, b in zip(outs, plain)),
                         "equals_invariant_plain": sum(a == b for a, b in zip(outs, reference))}
        result["drafters"][drafter] = row
    ratios = []
    for r in range(rounds + 1 if rounds else 0):  # round 0 warms up
        seconds, steps = {"fast": 0.0, "invariant": 0.0}, {"fast": 0, "invariant": 0}
        for i, p in enumerate(prompts):
            order = (("fast", fast), ("invariant", invariant))
            for name, engine in order if (i + r) % 2 == 0 else order[::-1]:  # alternate who goes first
                out, s = _greedy(engine, p, new_tokens)
                seconds[name] += s
                steps[name] += len(out) - 1
        if r:  # seconds per decode step, invariant over fast
            ratios.append(seconds["invariant"] / steps["invariant"] / (seconds["fast"] / steps["fast"]))
            result.setdefault("fast_tok_s", []).append(steps["fast"] / seconds["fast"])
    if ratios:
        result["invariant_plain_time_ratio"] = {"median": statistics.median(ratios), "rounds": ratios}
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser("python bench/experiments/exact_speculation.py", __doc__)
    p.add_argument("packages", nargs="+", help="packages, .gguf files or known model names")
    p.add_argument("--drafters", nargs="+", default=["lookup"], help="lookup, draft:PATH, self:K")
    p.add_argument("--n", type=int, default=8, help="MT-Bench prompts (default 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds, after one warm-up (0: none)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.n < 1 or args.new_tokens < 2 or args.rounds < 0:
        p.error("--n must be >= 1, --new-tokens >= 2 and --rounds >= 0")
    results = []
    for package in args.packages:
        result = probe(package, args.drafters, args.n, args.new_tokens, args.rounds, args.threads)
        results.append(result)
        k = result["prompts"]
        print(f"{package} ({result['backend']}, {'/'.join(result['weights'])}), {k} prompts x {args.new_tokens} "
              f"tokens: invariant plain = fast plain in {result['invariant_plain_equals_fast_plain']}/{k}", flush=True)
        for drafter, row in result["drafters"].items():
            for name, counts in row.items():
                print(f"  {drafter:28} {name:8} = fast plain {counts['equals_fast_plain']}/{k}, "
                      f"= invariant plain {counts['equals_invariant_plain']}/{k}", flush=True)
        if args.rounds:
            ratio = result["invariant_plain_time_ratio"]
            print(f"  plain decoding made invariant: x{ratio['median']:.2f} the fast decode time (rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratio['rounds'])}; fast "
                  f"{statistics.median(result['fast_tok_s']):.0f} tok/s)", flush=True)
    if args.json:
        write_json(args.json, {"results": results})
    return results


if __name__ == "__main__":
    command(main, "python bench/experiments/exact_speculation.py")
