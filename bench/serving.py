"""Serving benchmark: `edge-run serve` against llama-cpp-python's own server on the same GGUF.

    python -m edgerun.bench.serving smollm2-135m --clients 1 2 4 8 --requests 4 --max-tokens 64 \
        --threads 2 --json serving.json

Each server runs as its own process on a free loopback port with the same threads and context:
edge-run (continuous batching, --max-batch rows; `--target edgerun:PACKAGE[@BACKEND]` adds
other edge-run packages, e.g. fp32 or INT8 ONNX) and `python -m llama_cpp.server` (one llama
context; it runs one request at a time, the others wait: --interrupt_requests False). For every
number of concurrent clients, each client streams --requests chat completions back to back
(greedy, MT-Bench prompts, different ones per client, at most --max-tokens each); one request per
server runs first as a warm-up and is not counted. Reported per server and client count: total
generated tokens per second (all tokens / wall time from the first request sent to the last
token), its ratio to one client's, and the p50 / p90 of the time to first token and of the gaps
between a request's tokens, as the clients see them on the wire. Tokens are counted from the
usage chunk where the server sends one (edge-run), else one per streamed chunk.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import data
from ..version import __version__
from . import command, parser
from .machine import cpu_info, git_commit, versions
from .report import write_json

MODEL_ID = "bench"


@dataclass
class Target:
    """A server to measure: `kind` "edgerun" or "llamacpp", the model it loads, edge-run's backend."""

    kind: str
    model: str
    backend: str = "auto"

    @property
    def label(self) -> str:
        if self.kind == "llamacpp":
            return f"llama-cpp-python server ({Path(self.model).name})"
        backend = "" if self.backend == "auto" else f" [{self.backend}]"
        return f"edge-run serve ({Path(self.model).name}){backend}"


@dataclass
class RequestRecord:
    sent: float
    first: float | None = None
    times: list[float] = field(default_factory=list)  # arrival of each content chunk
    tokens: int = 0
    text: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_command(target: Target, port: int, args: argparse.Namespace) -> list[str]:
    if target.kind == "llamacpp":
        return [sys.executable, "-m", "llama_cpp.server", "--model", target.model, "--host", "127.0.0.1",
                "--port", str(port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                "--n_ctx", str(args.max_context), "--model_alias", MODEL_ID, "--interrupt_requests", "False"]
    cmd = [sys.executable, "-m", "edgerun", "serve", target.model, "--port", str(port), "--threads", str(args.threads),
           "--max-context", str(args.max_context), "--max-batch", str(args.max_batch), "--model-name", MODEL_ID,
           "--backend", target.backend]
    if args.batch_invariant:
        cmd.append("--batch-invariant")
    if args.speculative:
        cmd += ["--speculative", args.speculative]
    return cmd


@contextlib.contextmanager
def running(target: Target, args: argparse.Namespace, logs: Path, prompt_cache_mb: int | None = None):
    """Start the target's server; yields its base URL once it is ready (edge-run: /health; llama-cpp-python's
    server has none, it answers once loaded)."""
    import httpx

    port = _free_port()
    log_path = logs / f"{target.kind}-{port}.log"
    with open(log_path, "w") as log:
        cmd = _server_command(target, port, args)
        if prompt_cache_mb is not None:
            cmd += ["--prompt-cache-mb", str(prompt_cache_mb)]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text().strip().splitlines()[-3:]
                raise ValueError(f"{target.label} exited with status {proc.returncode}: {' | '.join(tail)}")
            with contextlib.suppress(httpx.TransportError):
                ready = "/v1/models" if target.kind == "llamacpp" else "/health"
                if httpx.get(f"{url}{ready}", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ValueError(f"{target.label} did not start within {args.start_timeout:.0f} s (log: {log_path})")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _one(client, url: str, prompt: str | list[dict], max_tokens: int) -> RequestRecord:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    body = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "repeat_penalty": 1.0}  # llama-cpp-python's server penalises repeats by default
    record = RequestRecord(time.perf_counter())
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise ValueError(f"{url} answered {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                record.text += choices[0]["delta"]["content"]
                now = time.perf_counter()
                record.first = record.first or now
                record.times.append(now)
    record.tokens = usage["completion_tokens"] if usage else len(record.times)
    return record


async def _level(url: str, prompts: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` clients, each sending `requests` requests back to back."""
    import httpx

    async def client_loop(c: int, client) -> list[RequestRecord]:
        return [await _one(client, url, prompts[(c * requests + i) % len(prompts)], max_tokens)
                for i in range(requests)]

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:
        start = time.perf_counter()
        per_client = await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
    records = [r for rs in per_client for r in rs]
    end = max(r.times[-1] if r.times else r.sent for r in records)
    ttft = [r.first - r.sent for r in records if r.first is not None]
    gaps = [b - a for r in records for a, b in zip(r.times, r.times[1:])]
    tokens = sum(r.tokens for r in records)
    return {"clients": clients, "requests": len(records), "tokens": tokens, "seconds": end - start,
            "tok_s": tokens / (end - start), "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p90": _pct(ttft, 90),
            "itl_ms_p50": _pct(gaps, 50), "itl_ms_p90": _pct(gaps, 90)}


async def _second_turns(url: str, prompts: list[str], max_tokens: int) -> dict:
    """Two-turn chats one after another: the second turn's time to first token (its prompt holds the
    first turn and its answer, which a prompt cache has computed already)."""
    import httpx

    ttft = []
    async with httpx.AsyncClient(timeout=None) as client:
        for prompt in prompts:
            first = await _one(client, url, prompt, max_tokens)
            history = [{"role": "user", "content": prompt}, {"role": "assistant", "content": first.text},
                       {"role": "user", "content": "Now say it again in one sentence."}]
            second = await _one(client, url, history, max_tokens)
            ttft.append(second.first - second.sent)
    return {"chats": len(prompts), "second_turn_ttft_ms_p50": _pct(ttft, 50),
            "second_turn_ttft_ms_mean": statistics.mean(ttft) * 1e3}


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1e3
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1e3


def _targets(args: argparse.Namespace) -> list[Target]:
    from ..hub import known_models, pull

    gguf = args.model
    if gguf in known_models() and not Path(gguf).exists():
        gguf = str(pull(gguf, progress=True))
    elif not Path(gguf).is_file():
        raise ValueError(f"{gguf} is neither a .gguf file nor a known model")
    targets = [Target("edgerun", gguf)]
    for spec in args.target:
        kind, _, rest = spec.partition(":")
        model, _, backend = rest.partition("@")
        if kind not in ("edgerun", "llamacpp") or not model:
            raise ValueError(f"--target takes edgerun:MODEL[@BACKEND] or llamacpp:GGUF, got {spec!r}")
        targets.append(Target(kind, model, backend or "auto"))
    if not args.no_llamacpp:
        targets.append(Target("llamacpp", gguf))
    return targets


def run(args: argparse.Namespace) -> dict:
    if args.threads < 1 or args.max_tokens < 1 or args.requests < 1 or min(args.clients) < 1:
        raise ValueError("--threads, --max-tokens, --requests and --clients must be >= 1")
    targets = _targets(args)
    prompts = [r["turns"][0][:args.prompt_chars] for r in data.mt_bench()]
    logs = Path(tempfile.mkdtemp(prefix="edgerun-serving-"))
    results = []
    for target in targets:
        print(f"{target.label}: starting", file=sys.stderr)
        with running(target, args, logs) as url:
            asyncio.run(_level(url, prompts[-1:], 1, 1, args.max_tokens))  # warm-up, not counted
            levels = []
            for clients in args.clients:
                level = asyncio.run(_level(url, prompts, clients, args.requests, args.max_tokens))
                levels.append(level)
                print(f"  {clients} client(s): {level['tok_s']:.1f} tok/s, TTFT p50 {level['ttft_ms_p50']:.0f} ms, "
                      f"ITL p50 {level['itl_ms_p50']:.1f} ms", file=sys.stderr)
        base = levels[0]["tok_s"] if levels and levels[0]["clients"] == 1 else None
        for level in levels:
            level["vs_one_client"] = level["tok_s"] / base if base else None
        result = {"label": target.label, "kind": target.kind, "model": target.model, "backend": target.backend,
                  "levels": levels}
        if args.second_turn and target.kind == "edgerun":
            for name, cache_mb in (("prompt_cache", args.prompt_cache_mb), ("no_prompt_cache", 0)):
                with running(target, args, logs, prompt_cache_mb=cache_mb) as url:
                    asyncio.run(_level(url, prompts[-1:], 1, 1, args.max_tokens))
                    result[name] = asyncio.run(_second_turns(url, prompts[:args.second_turn], args.max_tokens))
                print(f"  second turn, {name}: TTFT p50 {result[name]['second_turn_ttft_ms_p50']:.0f} ms",
                      file=sys.stderr)
        results.append(result)
    report = {"tool": "edgerun.bench.serving", "edge_run": __version__, "commit": git_commit(),
              "machine": cpu_info(), "versions": versions(), "python": platform.python_version(),
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
    print(table(report))
    if args.second_turn:
        for r in results:
            if "prompt_cache" in r:
                on, off = r["prompt_cache"], r["no_prompt_cache"]
                print(f"{r['label']}: second-turn TTFT p50 {on['second_turn_ttft_ms_p50']:.0f} ms with the prompt "
                      f"cache, {off['second_turn_ttft_ms_p50']:.0f} ms without ({on['chats']} chats)")
    if args.json:
        write_json(Path(args.json), report)
    return report


def table(report: dict) -> str:
    """The report as a markdown table."""
    def ms(v):
        return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"

    lines = ["| server | clients | total tok/s | vs 1 client | TTFT p50 / p90 ms | ITL p50 / p90 ms |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        for level in r["levels"]:
            ratio = f"x{level['vs_one_client']:.2f}" if level.get("vs_one_client") else "-"
            lines.append(f"| {r['label']} | {level['clients']} | {level['tok_s']:.1f} | {ratio} | "
                         f"{ms(level['ttft_ms_p50'])} / {ms(level['ttft_ms_p90'])} | "
                         f"{ms(level['itl_ms_p50'])} / {ms(level['itl_ms_p90'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m edgerun.bench.serving", __doc__.split("\n\n")[0])
    p.add_argument("model", help=".gguf file or known model name (both servers load it)")
    p.add_argument("--target", action="append", default=[], metavar="edgerun:MODEL[@BACKEND]",
                   help="another server to measure: an edge-run package (e.g. an fp32 or int8 ONNX one), "
                        "optionally on a given backend; repeatable")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama-cpp-python's server")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent clients (default: 1 2 4 8)")
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per answer (default: 64)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each server")
    p.add_argument("--max-context", type=int, default=1024, help="context per sequence (default: 1024)")
    p.add_argument("--max-batch", type=int, default=8, help="edge-run's batch rows (default: 8)")
    p.add_argument("--batch-invariant", action="store_true", help="edge-run serve --batch-invariant")
    p.add_argument("--speculative", default=None, help="edge-run serve --speculative MODE")
    p.add_argument("--second-turn", type=int, default=0, metavar="N",
                   help="also time the second turn of N two-turn chats on each edge-run server, with and without "
                        "its prompt cache")
    p.add_argument("--prompt-cache-mb", type=int, default=256, help="edge-run's prompt cache for --second-turn")
    p.add_argument("--prompt-chars", type=int, default=None, help="cut prompts to this many characters (tiny models)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to start")
    p.add_argument("--json", default=None, help="write the report here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.serving")
