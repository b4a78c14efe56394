"""Step cost by width: how long one decode step of w new tokens takes after a prompt.

    python bench/experiments/step_cost.py PACKAGE [PACKAGE ...] --prompt-tokens 300 --widths 1 2 4 8 16

Speculative decoding verifies a pending token plus k drafts in one step of k + 1 tokens, so what
it gains depends on how much a wide step costs against a step of one. After a WikiText-2 prompt,
every width runs `--repeats` times, interleaved (noise hits all widths alike), each from the same
cache position (rolled back between steps). Printed per width: min and median milliseconds and
the median as a ratio of width 1's.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import numpy as np

from edgerun import data
from edgerun.bench import command, parser
from edgerun.bench.report import write_json
from edgerun.version import __version__


def measure(engine, prompt_tokens: int, widths: list[int], repeats: int) -> dict[int, list[float]]:
    """Seconds per step of each width, `repeats` each, after a `prompt_tokens`-token prompt."""
    text = data.wikitext("test")[:40000]
    tokens = engine.encode(text)
    if len(tokens) < prompt_tokens + max(widths):
        raise ValueError(f"--prompt-tokens {prompt_tokens} + width {max(widths)} is more than the "
                         f"{len(tokens)} tokens of text used; lower them")
    prompt, more = tokens[:prompt_tokens], tokens[prompt_tokens:prompt_tokens + max(widths)]
    backend = engine.backend
    cache = backend.new_cache(1, prompt_tokens + max(widths) + 1)
    engine.prefill([prompt], cache)
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for w in widths:
            cache.rollback(np.array([prompt_tokens], dtype=np.int32))
            start = time.perf_counter()
            backend.forward(np.array([more[:w]]), cache, np.array([w]), np.arange(w)[None])
            times[w].append(time.perf_counter() - start)
    return {w: t[1:] for w, t in times.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    from edgerun.hub import load

    p = parser("python bench/experiments/step_cost.py", __doc__)
    p.add_argument("packages", nargs="+", help="packages, .gguf files or known model names")
    p.add_argument("--prompt-tokens", type=int, default=300)
    p.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.prompt_tokens < 1 or args.repeats < 1 or min(args.widths) < 1:
        p.error("--prompt-tokens, --repeats and every width must be >= 1")
    widths = sorted(set(args.widths) | {1})  # width 1 is the reference of the ratios
    results = []
    for package in args.packages:
        engine = load(package, threads=args.threads, max_context=args.prompt_tokens + max(widths) + 1)
        times = measure(engine, args.prompt_tokens, widths, args.repeats)
        base = statistics.median(times[1])
        print(f"\n{package} ({engine.backend.name}), {args.prompt_tokens}-token prompt, {args.repeats} repeats")
        rows = []
        for w in widths:
            median = statistics.median(times[w])
            rows.append({"width": w, "min_ms": 1e3 * min(times[w]), "median_ms": 1e3 * median,
                         "ratio_to_one": median / base})
            print(f"  width {w:3d}: min {rows[-1]['min_ms']:6.1f} ms, median {rows[-1]['median_ms']:6.1f} ms, "
                  f"x{median / base:.2f} of one token")
        results.append({"package": package, "backend": engine.backend.name, "rows": rows})
    if args.json:
        write_json(args.json, {"machine": platform.processor() or platform.machine(), "edge_run": __version__,
                               "args": {k: str(v) for k, v in vars(args).items()}, "results": results})
    return results


if __name__ == "__main__":
    command(main, "python bench/experiments/step_cost.py")
