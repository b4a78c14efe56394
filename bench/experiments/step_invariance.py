"""Step-shape invariance: do a model's logits depend on how many tokens a decode step carries?

    python bench/experiments/step_invariance.py PACKAGE [PACKAGE ...] --prompt-tokens 54 --chunks 1 2 4 8

After a WikiText-2 prompt, the next 12 tokens are fed as single steps and as chunks of k tokens;
printed is the largest |logit difference| from the single steps, for the default engine and for
a batch_invariant=True one. Each package runs in its own process, because llama.cpp reads its
tiled-kernel switch (GGML_CPU_TILED_MM) once per process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from edgerun import data
from edgerun.bench import command, parser

CONTINUATION = 12


def _logits(engine, prompt: list[int], more: list[int], chunk: int) -> np.ndarray:
    backend = engine.backend
    cache = backend.new_cache(1, len(prompt) + len(more) + 1)
    backend.forward(np.array([prompt]), cache, np.array([len(prompt)]), np.array([[len(prompt) - 1]]))
    out = []
    for i in range(0, len(more), chunk):
        part = more[i:i + chunk]
        out.extend(backend.forward(np.array([part]), cache, np.array([len(part)]), np.arange(len(part))[None])[0])
    return np.array(out)


def probe(package: str, prompt_tokens: int, chunks: list[int], invariant: bool, threads: int | None) -> dict:
    from edgerun.hub import load

    engine = load(package, threads=threads, batch_invariant=invariant)
    text = data.wikitext("test")[5000:20000]
    tokens = engine.encode(text)[:prompt_tokens + CONTINUATION]
    prompt, more = tokens[:prompt_tokens], tokens[prompt_tokens:]
    single = _logits(engine, prompt, more, 1)
    return {"package": package, "backend": engine.backend.name, "batch_invariant": invariant,
            "weights": sorted({t for v in engine.manifest.weights.values() for t in v.split("+")}),
            "max_abs_diff": {k: float(np.abs(_logits(engine, prompt, more, k) - single).max()) for k in chunks}}


def main(argv: list[str] | None = None) -> list[dict]:
    p = parser("python bench/experiments/step_invariance.py", __doc__)
    p.add_argument("packages", nargs="+", help="packages, .gguf files or known model names")
    p.add_argument("--prompt-tokens", type=int, default=54)
    p.add_argument("--chunks", type=int, nargs="+", default=[2, 3, 4, 5, 8, 12])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # worker: one package, one mode
    p.add_argument("--invariant", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        result = probe(args.packages[0], args.prompt_tokens, args.chunks, args.invariant, args.threads)
        print(json.dumps(result))
        return [result]
    results = []
    for package in args.packages:
        for invariant in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), package, "--one",
                   "--prompt-tokens", str(args.prompt_tokens), "--chunks", *map(str, args.chunks)]
            cmd += ["--invariant"] if invariant else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:  # the probe's own one-line error (or its traceback's last line)
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
                raise ValueError(f"probe of {package} failed: {last.split(': error: ', 1)[-1]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            diffs = "  ".join(f"{k}: {v:.2g}" for k, v in result["max_abs_diff"].items())
            print(f"{package:40} {result['backend']:8} {'invariant' if invariant else 'default':9} "
                  f"{'/'.join(result['weights']):28} max |logit diff| vs 1-token steps, by chunk  {diffs}", flush=True)
    return results


if __name__ == "__main__":
    command(main, "python bench/experiments/step_invariance.py")
