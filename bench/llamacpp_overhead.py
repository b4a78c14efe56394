"""What our Python decoding loop costs on llama.cpp: edge-run's llamacpp backend against
llama-cpp-python's own high-level loop (`Llama.generate`, greedy) on the same GGUF file.

    python -m edgerun.bench.llamacpp_overhead smollm2-135m --prompt-tokens 16 --new-tokens 128

Both run the same file with the same threads, context size and attention settings (flash
attention off, llama-cpp-python's default too), from the same WikiText-2 prompt; rounds
alternate between the two (one warm-up each, excluded) and the median decode speed is compared.
Each run also records the time spent outside `llama_decode` per generated token (sampling,
logits copy, batch filling, detokenizing: the Python loop's own cost), which a busy machine
disturbs far less than tokens/s.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .. import __version__
from .decode_speed import find_data_dir, measure


@contextmanager
def _timed_llama_decode() -> Iterator[list[float]]:
    """Time every llama_decode call (both loops call it through the llama_cpp module)."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings  # llama-cpp-python's high-level classes call this one

    spent: list[float] = []
    original = bindings.llama_decode

    def timed(ctx, batch):
        start = time.perf_counter()
        try:
            return original(ctx, batch)
        finally:
            spent.append(time.perf_counter() - start)

    llama_cpp.llama_decode = bindings.llama_decode = timed
    try:
        yield spent
    finally:
        llama_cpp.llama_decode = bindings.llama_decode = original


def _with_host_time(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run one generation; add host_us_per_token: wall time outside llama_decode per decode step."""
    with _timed_llama_decode() as spent:
        start = time.perf_counter()
        result = run()
        total = time.perf_counter() - start
    decode_steps = len(spent) - 1  # the first call is the prompt
    host = total - result["ttft_s"] - sum(spent[1:])
    return result | {"host_us_per_token": 1e6 * host / max(decode_steps, 1)}


def high_level_decode(llm, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy `Llama.generate` run; ttft_s and decode tokens/s after the first token."""
    llm.reset()
    start = time.perf_counter()
    stamps = []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == new_tokens:
            break
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def main(argv: list[str] | None = None) -> None:
    import llama_cpp

    import edgerun
    from edgerun.devices.providers import physical_cores

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=".gguf file, known model name or package with a GGUF")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)

    threads = args.threads or physical_cores()
    context = args.prompt_tokens + args.new_tokens + 8
    engine = edgerun.load(args.model, threads=threads, max_context=context, backend="llamacpp")
    gguf_path = engine.backend.path
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=min(context, 2048), flash_attn=False, verbose=False)
    prompt = engine.encode((find_data_dir() / "wikitext-2" / "test.txt").read_text())[:args.prompt_tokens]
    runners = {"edge-run llamacpp backend":
               lambda: _with_host_time(lambda: measure(engine, prompt, args.new_tokens)),
               "llama-cpp-python Llama.generate":
               lambda: _with_host_time(lambda: high_level_decode(llm, prompt, args.new_tokens))}
    for run in runners.values():
        run()  # warm-up, excluded
    rows: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rows[name].append(run())
    medians = {name: statistics.median(r["decode_tok_s"] for r in runs) for name, runs in rows.items()}
    base = medians["llama-cpp-python Llama.generate"]
    print(f"{gguf_path.name}: prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {threads} threads, "
          f"{args.rounds} rounds (min/median/max)")
    for name, runs in rows.items():
        tps = sorted(r["decode_tok_s"] for r in runs)
        ttft = statistics.median(r["ttft_s"] for r in runs) * 1e3
        host = statistics.median(r["host_us_per_token"] for r in runs)
        print(f"{name:34} decode {tps[0]:.1f}/{medians[name]:.1f}/{tps[-1]:.1f} tok/s | ttft {ttft:.0f} ms | "
              f"x{medians[name] / base:.3f} | outside llama_decode {host:.0f} us/token "
              f"({host * 1e-6 * medians[name]:.1%} of a decode step)")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": platform.processor() or platform.machine(), "edge_run": __version__,
            "llama_cpp_python": llama_cpp.__version__, "args": vars(args) | {"json": str(args.json)},
            "results": {name: runs for name, runs in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
