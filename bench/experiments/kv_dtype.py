"""The same model with an f32 and an f16 KV cache, side by side: logits, greedy output, decode speed.

    python bench/experiments/kv_dtype.py F32_PKG F16_PKG [--prompt-tokens 700] [--new-tokens 64] [--rounds 3]

The two packages are one export with and without `--kv-cache f16`. After a WikiText-2 test prompt:
the logits' largest difference and top-1 agreement over the prompt's first 256 positions, whether
64 greedy tokens are identical (and how many agree position by position), then decode tokens/s
(from the first token on) over `--rounds` interleaved rounds, the median per package and the ratio
f32 / f16 time per token (< 1: f16 is slower).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from edgerun import data
from edgerun.bench import command, parser
from edgerun.runtime.engine import Engine


def _decode_seconds_per_token(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    first = None
    for _ in engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
        if first is None:
            first = time.perf_counter()
    return (time.perf_counter() - first) / (new_tokens - 1)


def main(argv: list[str] | None = None) -> dict:
    p = parser("python bench/experiments/kv_dtype.py", __doc__.split("\n\n")[0])
    p.add_argument("f32", help="package with an f32 KV cache")
    p.add_argument("f16", help="the same export with --kv-cache f16")
    p.add_argument("--prompt-tokens", type=int, default=700)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    engines = {k: Engine(getattr(args, k), max_context=1024, threads=args.threads) for k in ("f32", "f16")}
    prompt = engines["f32"].encode(data.wikitext("test")[:8000])[:args.prompt_tokens]
    a, b = (engines[k].logits(prompt[:256]) for k in ("f32", "f16"))
    outs = {k: [r.token for r in e.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)]
            for k, e in engines.items()}
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.rounds):
        for k, e in engines.items():
            times[k].append(_decode_seconds_per_token(e, prompt, args.new_tokens))
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {"logit_max_diff": float(np.abs(a - b).max()), "top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
              "greedy_identical": outs["f32"] == outs["f16"],
              "greedy_agreeing_positions": sum(x == y for x, y in zip(outs["f32"], outs["f16"])),
              "tok_s": {k: 1 / v for k, v in median.items()}, "f16_speed_ratio": median["f32"] / median["f16"],
              "kv_bytes": {k: e._kv.nbytes for k, e in engines.items()}}
    for key, value in report.items():
        print(f"{key}: {value}")
    return report


if __name__ == "__main__":
    command(main, "python bench/experiments/kv_dtype.py")
