"""Time to first token and decode speed of one or more packages, side by side in one run.

    python bench/experiments/decode_speed.py PACKAGE [PACKAGE ...] --prompt-tokens 128 --new-tokens 128
    python bench/experiments/decode_speed.py smollm2-135m smollm2-135m --backend llamacpp --backend onnx
    python bench/experiments/decode_speed.py int4 int4 --invariant no --invariant yes   # invariant steps' cost

Each round runs every package once (interleaved, so machine noise hits all alike) after one
warm-up run per package; prints min/median/max and the ratio of each package's median decode
speed to the first package's. The prompt is the start of WikiText-2 test, exactly N tokens.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

from edgerun import data
from edgerun.bench import command, parser
from edgerun.bench.report import write_json
from edgerun.version import __version__


def measure(engine, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy generation of exactly `new_tokens` (end-of-sequence ignored); returns ttft_s and
    decode tokens/s (tokens after the first)."""
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)]
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def main(argv: list[str] | None = None) -> None:
    from edgerun.hub import load

    p = parser("python bench/experiments/decode_speed.py", __doc__)
    p.add_argument("packages", nargs="+", help="package folders or model names")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backend", action="append", default=None,
                   help="auto, onnx or llamacpp: once for every package, or once per package in order")
    p.add_argument("--invariant", action="append", default=None, choices=["yes", "no"],
                   help="load batch-invariant (plain decoding on the invariant steps): once for every "
                        "package, or once per package in order")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)

    def per_package(values: list[str], flag: str) -> list[str]:
        values = values * len(args.packages) if len(values) == 1 else values
        if len(values) != len(args.packages):
            p.error(f"give {flag} once or once per package ({len(args.packages)}), not {len(values)} times")
        return values

    backends = per_package(args.backend or ["auto"], "--backend")
    invariant = [v == "yes" for v in per_package(args.invariant or ["no"], "--invariant")]
    engines = [load(pkg, threads=args.threads, backend=b, batch_invariant=inv)
               for pkg, b, inv in zip(args.packages, backends, invariant)]
    prompt = engines[0].encode(data.wikitext("test"))[:args.prompt_tokens]
    runs: list[list[dict]] = [[] for _ in engines]
    for engine in engines:
        measure(engine, prompt, 8)  # warm-up, excluded
    for _ in range(args.rounds):
        for engine, rows in zip(engines, runs):
            rows.append(measure(engine, prompt, args.new_tokens))
    base = statistics.median(r["decode_tok_s"] for r in runs[0])
    results = []
    print(f"prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.rounds} rounds (min/median/max)")
    for pkg, backend, inv, rows in zip(args.packages, backends, invariant, runs):
        ttft = sorted(r["ttft_s"] * 1e3 for r in rows)
        tps = sorted(r["decode_tok_s"] for r in rows)
        med = statistics.median(tps)
        label = f"{pkg} [{backend}{', invariant' if inv else ''}]"
        print(f"{label}: ttft {ttft[0]:.0f}/{statistics.median(ttft):.0f}/{ttft[-1]:.0f} ms | decode "
              f"{tps[0]:.1f}/{med:.1f}/{tps[-1]:.1f} tok/s | x{med / base:.3f} vs first")
        results.append({"package": str(pkg), "backend": backend, "batch_invariant": inv, "ttft_ms": ttft,
                        "decode_tok_s": tps})
    if args.json:
        write_json(args.json, {"machine": platform.processor() or platform.machine(), "edge_run": __version__,
                               "args": vars(args) | {"json": str(args.json)}, "results": results})


if __name__ == "__main__":
    command(main, "python bench/experiments/decode_speed.py")
