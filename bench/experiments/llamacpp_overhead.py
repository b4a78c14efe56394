"""What our Python decoding loop costs on llama.cpp: edge-run's llamacpp backend against
llama-cpp-python's own high-level loop (`Llama.generate`, greedy) on the same GGUF file.

    python bench/experiments/llamacpp_overhead.py smollm2-135m --prompt-tokens 16 --new-tokens 128

Both run the same file with the same threads, context size and attention settings (flash
attention off, llama-cpp-python's default too), from the same WikiText-2 prompt; rounds
alternate between the two (one warm-up each, excluded) and the median decode speed is compared.
Each run also records the time spent outside `llama_decode` per generated token (sampling,
logits copy, batch filling, detokenizing: the Python loop's own cost), in wall time and in this
thread's CPU time (which other jobs on a busy machine disturb far less), and its share of the
median llama_decode time. Peak resident memory of each loop is measured in a fresh process of
its own (load, then one generation), since one process holds the high-water mark of both.
"""
from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from decode_speed import measure  # bench/experiments/decode_speed.py, beside this script

from edgerun import data
from edgerun.bench import command, parser
from edgerun.bench.harness import Worker
from edgerun.bench.report import write_json
from edgerun.version import __version__

EDGE_RUN, LLAMA_CPP = "edge-run llamacpp backend", "llama-cpp-python Llama.generate"


@contextmanager
def _timed_llama_decode() -> Iterator[list[tuple[float, float]]]:
    """Time every llama_decode call, (wall, thread CPU) seconds (both loops call it through the llama_cpp module)."""
    import llama_cpp
    import llama_cpp.llama_cpp as bindings  # llama-cpp-python's high-level classes call this one

    spent: list[tuple[float, float]] = []
    original = bindings.llama_decode

    def timed(ctx, batch):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(ctx, batch)
        finally:
            spent.append((time.perf_counter() - start, time.thread_time() - cpu))

    llama_cpp.llama_decode = bindings.llama_decode = timed
    try:
        yield spent
    finally:
        llama_cpp.llama_decode = bindings.llama_decode = original


def _with_host_time(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Run one generation; add per decode step: host_us_per_token (wall time outside llama_decode),
    host_cpu_us_per_token (this thread's CPU time outside it) and decode_us (median llama_decode)."""
    with _timed_llama_decode() as spent:
        start, cpu = time.perf_counter(), time.thread_time()
        result = run()
        total, total_cpu = time.perf_counter() - start, time.thread_time() - cpu
    steps = spent[1:]  # the first call is the prompt
    host = total - result["ttft_s"] - sum(wall for wall, _ in steps)
    # CPU time has no first-token stamp: the prompt's llama_decode and the setup count as host time,
    # spread over the steps (a few us per token at 128 tokens)
    host_cpu = total_cpu - sum(c for _, c in spent)
    return result | {"host_us_per_token": 1e6 * host / max(len(steps), 1),
                     "host_cpu_us_per_token": 1e6 * host_cpu / max(len(steps), 1),
                     "decode_us": 1e6 * statistics.median(wall for wall, _ in steps)}

def llama_cpp_greedy(llm, prompt: list[int], new_tokens: int, stop: frozenset[int] = frozenset()
                     ) -> tuple[list[int], float, list[float]]:
    """One greedy `Llama.generate` run of `new_tokens`, or up to and including a token in `stop`
    (`Llama.generate` itself never stops): the tokens, the start time and a perf_counter stamp per token."""
    llm.reset()
    start, out, stamps = time.perf_counter(), [], []
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        out.append(int(token))
        if len(out) == new_tokens or out[-1] in stop:
            break
    return out, start, stamps


def high_level_decode(llm, prompt: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy `Llama.generate` run; ttft_s and decode tokens/s after the first token."""
    _, start, stamps = llama_cpp_greedy(llm, prompt, new_tokens)
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def peak_rss(engine: str, model: str, threads: int, context: int, prompt: list[int], new_tokens: int,
             options: dict | None = None) -> float:
    """Peak resident MiB of a fresh bench worker process (bench/worker.py: only the standard library and
    numpy before the engine's own imports) that loads `engine` and generates once."""
    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(Path(tmp) / "worker.log", threads, timeout=600)
        try:
            worker.request(op="load", engine=engine, model=model, threads=threads, max_context=context,
                           options=options or {})
            return worker.request(op="generate", prompts=[prompt], new_tokens=new_tokens)["peak_rss_mb"]
        finally:
            worker.close()


def main(argv: list[str] | None = None) -> None:
    import llama_cpp

    from edgerun.devices.providers import physical_cores
    from edgerun.hub import load

    p = parser("python bench/experiments/llamacpp_overhead.py", __doc__)
    p.add_argument("model", help=".gguf file, known model name or package with a GGUF")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    args = p.parse_args(argv)

    threads = args.threads or physical_cores()
    context = args.prompt_tokens + args.new_tokens + 8
    # llama-cpp-python's default F16 KV cache on both sides: this bench isolates the Python loop
    engine = load(args.model, threads=threads, max_context=context, backend="llamacpp", kv_cache="f16")
    gguf_path = engine.backend.path
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=min(context, 2048), flash_attn=False, verbose=False)
    prompt = engine.encode(data.wikitext("test"))[:args.prompt_tokens]
    runners = {EDGE_RUN: lambda: _with_host_time(lambda: measure(engine, prompt, args.new_tokens)),
               LLAMA_CPP: lambda: _with_host_time(lambda: high_level_decode(llm, prompt, args.new_tokens))}
    for run in runners.values():
        run()  # warm-up, excluded
    rows: dict[str, list[dict]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            rows[name].append(run())
    rss = {EDGE_RUN: peak_rss("edgerun", args.model, threads, context, prompt, args.new_tokens,
                              {"backend": "llamacpp"}),
           LLAMA_CPP: peak_rss("llamacpp", str(gguf_path), threads, context, prompt, args.new_tokens)}
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} | {"peak_rss_mb": rss[name]}
               for name, runs in rows.items()}
    base = summary[LLAMA_CPP]
    print(f"{gguf_path.name}: prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {threads} threads, "
          f"{args.rounds} rounds (min/median/max; ratios are to llama-cpp-python)")
    for name, runs in rows.items():
        tps = sorted(r["decode_tok_s"] for r in runs)
        mine = summary[name]
        print(f"{name:32} decode {tps[0]:.1f}/{mine['decode_tok_s']:.1f}/{tps[-1]:.1f} tok/s "
              f"x{mine['decode_tok_s'] / base['decode_tok_s']:.3f} | ttft {mine['ttft_s'] * 1e3:.0f} ms | "
              f"llama_decode {mine['decode_us']:.0f} us")
        print(f"{'':32} outside llama_decode: {mine['host_us_per_token']:.0f} us/token wall "
              f"({mine['host_us_per_token'] / mine['decode_us']:.1%} of llama_decode, "
              f"x{mine['host_us_per_token'] / base['host_us_per_token']:.2f}), "
              f"{mine['host_cpu_us_per_token']:.0f} us CPU "
              f"(x{mine['host_cpu_us_per_token'] / base['host_cpu_us_per_token']:.2f}) | "
              f"peak RSS {mine['peak_rss_mb']:.0f} MB (x{mine['peak_rss_mb'] / base['peak_rss_mb']:.2f})")
    if args.json:
        write_json(args.json, {
            "machine": platform.processor() or platform.machine(), "edge_run": __version__,
            "llama_cpp_python": llama_cpp.__version__, "args": vars(args) | {"json": str(args.json)},
            "summary": summary, "results": rows})


if __name__ == "__main__":
    command(main, "python bench/experiments/llamacpp_overhead.py")
