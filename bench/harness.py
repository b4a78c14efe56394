"""edge-run against its peers, side by side in one run: `edge-run bench`.

    edge-run bench smollm2-135m --repeats 3 --new-tokens 128 --prompt-tokens 128 512 --batch 2 4 8

Every engine (edge-run packages, edge-run on llama.cpp, llama.cpp through llama-cpp-python,
onnxruntime-genai on a model its own builder made, transformers on CPU torch) runs in its own
worker process (bench/worker.py), loaded once, all fed the same token ids. After one warm-up of
every case (excluded), each repeat runs every case on every engine in turn, the engine order
rotated per repeat, so machine noise lands on all alike; figures are min/median/max over repeats.
Peers that are not installed are skipped with a message; peers that fail are reported as failed
with their error. Writes bench.json (machine, versions, commit, settings, every figure), bench.png
and prints tables (rich).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import select
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import command, parser
from .artifacts import LLAMACPP_FLOATS, LLAMACPP_QUANTS, ORTGENAI_PRECISIONS
from .stats import TimingRecord, achieved_bandwidth, ratio, summarize
from .weights import engine_files

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("worker.py")
SCHEMA = "edge-run-bench/1"
PROMPT_FIGURES = ("ttft_ms", "prefill_tok_s", "decode_tok_s", "itl_ms_median", "itl_ms_p90", "cpu_share")
BATCH_FIGURES = ("ttft_ms", "decode_tok_s", "total_tok_s", "cpu_share")
INSTALL_HINT = "pip install 'edge-run[bench]'"
# modules each worker engine needs (checked before starting it: missing ones skip the engine)
REQUIRES = {"edgerun": (), "llamacpp": ("llama_cpp",), "ortgenai": ("onnxruntime_genai",),
            "transformers": ("torch", "transformers")}


class WorkerError(RuntimeError):
    """A worker failed a request, died, or did not answer in time."""


@dataclass(frozen=True)
class EngineSpec:
    """One engine at one precision.

    Attributes:
        label: name in the tables, e.g. "llama.cpp Q4_0".
        engine: worker engine (edgerun, llamacpp, ortgenai, transformers).
        precision: e.g. "fp32", "int4", "Q4_1".
        prepare: makes (or finds in the cache) the model path the worker loads.
        options: extra load options (edge-run's backend).
        ours: an edge-run engine (compared against the peers).
    """

    label: str
    engine: str
    precision: str
    prepare: Callable[[], str]
    options: dict = field(default_factory=dict)
    ours: bool = False


@dataclass(frozen=True)
class Case:
    """One measured generation: `batch` prompts of `prompt_tokens` tokens, `new_tokens` each."""

    name: str
    prompts: list[list[int]]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompts[0])


class Worker:
    """A worker process (bench/worker.py) and its JSON-lines pipe."""

    def __init__(self, log_path: Path, threads: int, timeout: float):
        self.timeout, self.log_path = timeout, log_path
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.stderr = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)

    def _tail(self) -> str:
        self.stderr.flush()
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-3:]) or "no output"

    def request(self, **request: Any) -> dict:
        """Send one request; its answer, or WorkerError naming what went wrong."""
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            raise WorkerError(f"worker exited (code {self.proc.wait()}): {self._tail()}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            raise WorkerError(f"no answer to {request['op']!r} within {self.timeout:.0f} s; raise --worker-timeout")
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"worker exited (code {self.proc.wait()}): {self._tail()}")
        answer = json.loads(line)
        if not answer["ok"]:
            log.debug("worker traceback:\n%s", answer.get("traceback"))
            raise WorkerError(answer["error"])
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except OSError:
                pass  # already gone: nothing to tell it
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@dataclass
class EngineRun:
    """An engine's state and results during a run."""

    spec: EngineSpec
    status: str = "pending"  # ok | failed | skipped
    error: str | None = None
    model: str | None = None
    info: dict = field(default_factory=dict)
    records: dict[str, list[dict]] = field(default_factory=dict)
    peak_rss_mb: float | None = None
    batch1_peak_rss_mb: float | None = None  # over batch-1 requests only
    perplexity: float | None = None
    worker: Worker | None = None

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error
        log.warning("%s failed: %s", self.spec.label, error)
        if self.worker:
            self.worker.close()
            self.worker = None


def precision_class(precision: str) -> str:
    """Comparable precision of an engine's weights: fp32, fp16, 8-bit, 4-bit, ... (for ratios)."""
    p = precision.lower()
    if p in ("fp32", "f32", "float32"):
        return "fp32"
    if p in ("fp16", "f16", "float16", "bf16"):
        return "fp16"
    for bits in ("8", "6", "5", "4", "3", "2"):
        if p.startswith((f"int{bits}", f"q{bits}", f"iq{bits}")):
            return f"{bits}-bit"
    return "ternary" if p.startswith(("ternary", "tq")) else p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `edge-run bench` flags (also `python -m edgerun.bench.harness`)."""
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="GGUF file or known model name the peers run (default: smollm2-135m)")
    p.add_argument("--packages", nargs="*", default=None, metavar="PKG",
                   help="edge-run packages to measure (default: the fp32 ONNX export of MODEL)")
    gguf_types = ("source", *LLAMACPP_FLOATS, *LLAMACPP_QUANTS)
    p.add_argument("--edgerun-llamacpp", nargs="*", default=["source"], metavar="TYPE", choices=gguf_types,
                   help="GGUF types edge-run runs on its llama.cpp backend (default: source; none: give no TYPE)")
    p.add_argument("--llamacpp", nargs="*", default=["source", "F32", "F16", "Q8_0", "Q4_0"], metavar="TYPE",
                   choices=gguf_types,
                   help="GGUF types llama-cpp-python runs: source (MODEL itself), F32, F16, Q8_0, Q4_0, ... "
                        "(default: source F32 F16 Q8_0 Q4_0)")
    p.add_argument("--ortgenai", nargs="*", default=["int4", "int8", "fp32"], metavar="PRECISION",
                   choices=ORTGENAI_PRECISIONS,
                   help="onnxruntime-genai builder precisions (default: int4 int8 fp32)")
    p.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                   help="measure Hugging Face transformers (fp32, CPU torch) (default: yes)")
    p.add_argument("--prompts", default="wikitext", choices=("wikitext", "mt_bench"),
                   help="prompt source (default: wikitext)")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512], help="prompt lengths (default: 128 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--batch", type=int, nargs="*", default=[2, 4, 8],
                   help="batch sizes for throughput (default: 2 4 8)")
    p.add_argument("--batch-prompt-tokens", type=int, default=None,
                   help="prompt length of the batch cases (default: the first --prompt-tokens)")
    p.add_argument("--repeats", type=int, default=3, help="measured repeats of every figure (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="threads per engine (default: physical cores)")
    p.add_argument("--ppl-windows", type=int, default=0,
                   help="WikiText-2 windows for perplexity (bench/eval.py's protocol uses 40; default: 0 = skip)")
    p.add_argument("--ppl-window-tokens", type=int, default=512, help="tokens per perplexity window (default: 512)")
    p.add_argument("--speculative", nargs="*", default=None, metavar="DRAFTER",
                   help="add the speculative section (bench/speculative_runs.py) on the first edge-run package "
                        "with these drafters (default when given alone: lookup)")
    p.add_argument("--speculative-prompts", type=int, default=4, help="prompts per set for --speculative (default: 4)")
    p.add_argument("--bandwidth-mb", type=int, default=1024,
                   help="buffer for the memory bandwidth probe (default: 1024)")
    p.add_argument("--worker-timeout", type=float, default=900, help="seconds a worker may take per request")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for bench.json, bench.png and worker logs (default: ./bench-results/<time>)")
    p.add_argument("--no-plot", action="store_true", help="do not draw bench.png")


def _check_args(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode speed needs tokens after the first), "
                         f"got {args.new_tokens}")
    if any(n < 1 for n in args.prompt_tokens) or any(b < 2 or b > 8 for b in args.batch):
        raise ValueError(f"--prompt-tokens must be >= 1 and --batch within 2..8, "
                         f"got {args.prompt_tokens}, {args.batch}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def _gguf_precision(path: Path) -> str:
    import gguf

    field_ = gguf.GGUFReader(path).get_field("general.file_type")
    if field_ is None:
        return "unknown"
    return gguf.LlamaFileType(field_.contents()).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _package_precision(package: Path) -> str:
    from ..runtime.manifest import read_manifest

    manifest = read_manifest(package)
    if manifest.quantization:
        return str(manifest.quantization.get("recipe", {}).get("name", "quantized"))
    if not manifest.stages:
        return _gguf_precision(manifest.gguf_path(package))
    dtype = manifest.weights.get("mlp", "float32")
    return {"float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


def plan_engines(args: argparse.Namespace, gguf: Path) -> list[EngineSpec]:
    """Every engine and precision the flags ask for, each with the step that makes its model."""
    from ..hub import resolve_package
    from . import artifacts

    specs = []
    packages = args.packages if args.packages is not None else [None]
    for package in packages:
        if package is None:
            specs.append(EngineSpec("edge-run onnx fp32", "edgerun", "fp32", ours=True,
                                    prepare=lambda: str(resolve_package(gguf, backend="onnx"))))
        else:
            precision = _package_precision(Path(package))
            specs.append(EngineSpec(f"edge-run {Path(package).name} {precision}", "edgerun", precision, ours=True,
                                    prepare=lambda p=package: str(p)))
    source_precision = _gguf_precision(gguf) if "source" in (*args.edgerun_llamacpp, *args.llamacpp) else None
    for kind in args.edgerun_llamacpp:
        precision = source_precision if kind == "source" else kind
        specs.append(EngineSpec(f"edge-run llama.cpp {precision}", "edgerun", precision, ours=True,
                                options={"backend": "llamacpp"},
                                prepare=lambda k=kind: str(artifacts.llamacpp_gguf(gguf, k))))
    for kind in args.llamacpp:
        precision = source_precision if kind == "source" else kind
        specs.append(EngineSpec(f"llama.cpp {precision}", "llamacpp", precision,
                                prepare=lambda k=kind: str(artifacts.llamacpp_gguf(gguf, k))))
    for precision in args.ortgenai:
        specs.append(EngineSpec(f"onnxruntime-genai {precision}", "ortgenai", precision,
                                prepare=lambda p=precision: str(artifacts.ortgenai_model(gguf, p))))
    if args.transformers:
        specs.append(EngineSpec("transformers fp32", "transformers", "fp32",
                                prepare=lambda: str(artifacts.hf_folder(gguf))))
    return specs


def missing_modules(engine: str, backend: str | None = None) -> list[str]:
    """Modules an engine needs that are not installed."""
    needed = REQUIRES[engine] + (("llama_cpp",) if backend == "llamacpp" else ())
    return [m for m in needed if importlib.util.find_spec(m) is None]


def start_engines(specs: list[EngineSpec], threads: int, max_context: int, logs: Path, timeout: float,
                  say: Callable[[str], None]) -> list[EngineRun]:
    """Prepare every engine's model and load it in its own worker (one at a time)."""
    runs = []
    for spec in specs:
        run = EngineRun(spec)
        runs.append(run)
        missing = missing_modules(spec.engine, spec.options.get("backend"))
        if missing:
            run.status, run.error = "skipped", f"{', '.join(missing)} not installed ({INSTALL_HINT})"
            say(f"[yellow]skip[/] {spec.label}: {run.error}")
            continue
        try:
            run.model = spec.prepare()
            weight_bytes, file_bytes = engine_files(spec.engine, Path(run.model))
        except Exception as e:  # any preparation failure is this engine's failure, reported in the results
            run.fail(f"preparing its model: {type(e).__name__}: {e}")
            say(f"[red]failed[/] {spec.label}: {run.error}")
            continue
        run.worker = Worker(logs / f"{spec.label.replace(' ', '_').replace('/', '_')}.log", threads, timeout)
        try:
            answer = run.worker.request(op="load", engine=spec.engine, model=run.model, threads=threads,
                                        max_context=max_context, options=spec.options)
        except WorkerError as e:
            run.fail(f"loading: {e}")
            say(f"[red]failed[/] {spec.label}: {run.error}")
            continue
        run.status, run.peak_rss_mb = "ok", answer["peak_rss_mb"]
        run.info = answer["info"] | {"weight_bytes_per_token": weight_bytes, "file_bytes": file_bytes}
        say(f"loaded {spec.label} ({run.info['load_s']:.1f} s)")
    return runs


def measure(runs: list[EngineRun], cases: list[Case], repeats: int, threads: int, say: Callable[[str], None]) -> None:
    """One warm-up of every case, then `repeats` interleaved rounds; fills run.records.

    Batch-1 cases (warm-up and rounds) all run before any batched case, so a worker's batch-1
    peak RSS is that of a process that has only decoded at batch 1: memory an engine keeps after
    a batch (allocator arenas, caches sized for the batch) is not charged to its batch-1 figure.
    """
    single = [case for case in cases if case.batch == 1]
    for group in (single, [case for case in cases if case.batch > 1]):
        if group:
            _measure_cases(runs, group, repeats, threads, say)


def _measure_cases(runs: list[EngineRun], cases: list[Case], repeats: int, threads: int,
                   say: Callable[[str], None]) -> None:
    for repeat in range(-1, repeats):  # -1: warm-up, excluded
        shift = max(repeat, 0) % max(len(runs), 1)
        order = runs[shift:] + runs[:shift]  # rotate who goes first
        for case in cases:
            for run in order:
                if run.status != "ok" or (case.batch > 1 and not run.info.get("batch")):
                    continue
                new_tokens = min(case.new_tokens, 8) if repeat < 0 else case.new_tokens
                try:
                    answer = run.worker.request(op="generate", prompts=case.prompts, new_tokens=new_tokens)
                    figures = TimingRecord(case.prompt_tokens, case.batch, tuple(answer["stamps"])).figures()
                except (WorkerError, ValueError) as e:
                    run.fail(f"{case.name}: {e}")
                    say(f"[red]failed[/] {run.spec.label}: {run.error}")
                    continue
                run.peak_rss_mb = max(run.peak_rss_mb or 0.0, answer["peak_rss_mb"])  # each answer: its own peak
                if case.batch == 1:
                    run.batch1_peak_rss_mb = max(run.batch1_peak_rss_mb or 0.0, answer["peak_rss_mb"])
                if repeat >= 0:
                    # CPU the engine got / CPU it could use: well below 1 when other work took the cores
                    figures["cpu_share"] = answer["cpu_s"] / (answer["wall_s"] * threads)
                    run.records.setdefault(case.name, []).append(figures)
        say("warm-up done" if repeat < 0 else f"repeat {repeat + 1}/{repeats} done")


def measure_perplexity(runs: list[EngineRun], windows: list[list[int]], say: Callable[[str], None]) -> None:
    for run in runs:
        if run.status != "ok":
            continue
        try:
            answer = run.worker.request(op="nll", windows=windows)
        except WorkerError as e:
            run.fail(f"perplexity: {e}")
            continue
        run.perplexity = math.exp(answer["nll"] / answer["count"])
        say(f"perplexity {run.spec.label}: {run.perplexity:.3f}")


def engine_result(run: EngineRun, cases: list[Case], machine_bw: float) -> dict:
    """The JSON entry of one engine: settings, status, and every figure summarized over repeats."""
    results = {}
    for case in cases:
        rows = run.records.get(case.name)
        if rows:
            names = BATCH_FIGURES if case.batch > 1 else PROMPT_FIGURES
            results[case.name] = {k: summarize([r[k] for r in rows]) for k in names}
        elif run.status == "ok" and case.batch > 1 and not run.info.get("batch"):
            results[case.name] = {"unsupported": "the engine's API generates one sequence at a time"}
    first = next((results[c.name] for c in cases if c.batch == 1 and c.name in results), None)
    weight_bytes = run.info.get("weight_bytes_per_token")
    decode = first["decode_tok_s"]["median"] if first else None
    bandwidth = achieved_bandwidth(weight_bytes, decode) if weight_bytes and decode else None
    return {
        "label": run.spec.label, "engine": run.spec.engine, "precision": run.spec.precision,
        "precision_class": precision_class(run.spec.precision), "ours": run.spec.ours,
        "options": run.spec.options, "model": run.model, "status": run.status, "error": run.error,
        "info": run.info, "peak_rss_mb": run.peak_rss_mb, "batch1_peak_rss_mb": run.batch1_peak_rss_mb,
        "file_mb": run.info["file_bytes"] / 1e6 if "file_bytes" in run.info else None,
        "weight_mb_per_token": weight_bytes / 1e6 if weight_bytes else None,
        "bandwidth_gb_s": bandwidth / 1e9 if bandwidth else None,
        "bandwidth_fraction": ratio(bandwidth, machine_bw), "perplexity": run.perplexity, "results": results,
    }


def comparisons(engines: list[dict], cases: list[Case]) -> list[dict]:
    """Ours / peer decode (and prefill) speed ratios at the same precision class."""
    out = []
    prompt_cases = [c.name for c in cases if c.batch == 1]
    for ours in (e for e in engines if e["ours"] and e["status"] == "ok"):
        for peer in (e for e in engines if not e["ours"] and e["status"] == "ok"):
            if peer["precision_class"] != ours["precision_class"]:
                continue
            row = {"ours": ours["label"], "peer": peer["label"], "precision_class": ours["precision_class"]}
            for name in prompt_cases:
                a, b = ours["results"].get(name, {}), peer["results"].get(name, {})
                for fig in ("decode_tok_s", "prefill_tok_s"):
                    row[f"{fig}_{name}"] = ratio(a.get(fig, {}).get("median"), b.get(fig, {}).get("median"))
            out.append(row)
    return out


def run_speculative(target: str, drafters: list[str], args: argparse.Namespace, threads: int,
                    out_dir: Path) -> dict:
    """bench/speculative_runs.py on `target` in its own process; its JSON report plus what it printed."""
    path = out_dir / "speculative.json"
    cmd = [sys.executable, "-m", "edgerun.bench.speculative_runs", target, "--drafters", *drafters,
           "--n", str(args.speculative_prompts), "--new-tokens", str(args.new_tokens),
           "--threads", str(threads), "--json", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        return {"status": "failed", "error": f"exit {result.returncode}: {tail}", "command": shlex.join(cmd)}
    return {"status": "ok", "command": shlex.join(cmd), "output": result.stdout,
            **json.loads(path.read_text())}


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark the flags describe; returns the report (also written to OUT/bench.json)."""
    try:
        from rich.console import Console
    except ImportError:
        raise ValueError(f"edge-run bench prints its tables with rich, which is not installed; "
                         f"{INSTALL_HINT}") from None

    from ..devices.providers import physical_cores
    from ..export.checkpoint import checkpoint_kind, load_checkpoint
    from ..hub import known_models, pull
    from . import machine, report
    from .prompts import make_prompts, perplexity_windows

    _check_args(args)
    console = Console(stderr=True)
    t0 = time.perf_counter()

    def say(message: str) -> None:
        console.print(f"[dim]{time.perf_counter() - t0:6.1f} s[/] {message}")

    gguf = Path(args.model)
    if not gguf.exists() and args.model in known_models():
        gguf = pull(args.model)
    if checkpoint_kind(gguf) != "gguf":
        raise ValueError(f"{args.model} is not a GGUF file; the peers need one (pass a .gguf or a known model)")
    out_dir = args.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")  # in the working directory
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    threads = args.threads or physical_cores()

    ckpt = load_checkpoint(gguf, weights=False)
    token = ckpt.tokenizer.id_to_token
    template = {"chat_template": ckpt.chat_template,
                "bos": token(ckpt.bos_token_id) if ckpt.bos_token_id is not None else "",
                "eos": token(ckpt.eos_token_ids[0]) if ckpt.eos_token_ids else ""}
    cases = [Case(f"prompt_{n}", make_prompts(ckpt.tokenizer, args.prompts, n, 1, **template), args.new_tokens)
             for n in args.prompt_tokens]
    batch_len = args.batch_prompt_tokens or args.prompt_tokens[0]
    cases += [Case(f"batch_{b}", make_prompts(ckpt.tokenizer, args.prompts, batch_len, b, **template), args.new_tokens)
              for b in args.batch]
    max_context = max(max(args.prompt_tokens), batch_len) + args.new_tokens + 8
    windows = perplexity_windows(ckpt.tokenizer, args.ppl_windows, args.ppl_window_tokens) if args.ppl_windows else []
    max_context = max(max_context, args.ppl_window_tokens + 1 if windows else 0)

    say(f"measuring this machine's read bandwidth ({args.bandwidth_mb} MB, {threads} threads)")
    bandwidth = {"threads": threads, "bytes_per_s": machine.read_bandwidth(args.bandwidth_mb, threads),
                 "single_thread_bytes_per_s": machine.read_bandwidth(args.bandwidth_mb, 1)}
    started = time.time()
    load_before = os.getloadavg()
    runs = start_engines(plan_engines(args, gguf), threads, max_context, out_dir / "logs", args.worker_timeout, say)
    try:
        measure(runs, cases, args.repeats, threads, say)
        if windows:
            measure_perplexity(runs, windows, say)
    finally:
        for r in runs:
            if r.worker:
                r.worker.close()
                r.worker = None
    engines = [engine_result(r, cases, bandwidth["bytes_per_s"]) for r in runs]
    speculative = None
    if args.speculative is not None:
        target = next((e["model"] for e in engines if e["ours"] and e["status"] == "ok"
                       and e["options"].get("backend") != "llamacpp"), None)
        speculative = run_speculative(target, args.speculative or ["lookup"], args, threads, out_dir) if target \
            else {"status": "skipped", "error": "no edge-run ONNX package ran"}
    notes = ["prefill tok/s = prompt tokens / time to first token (the first token's sampling included)",
             "decode tok/s = tokens after the first / time after the first; weights are read once per token",
             "quality reference: the source GGUF's dequantized weights are the full-precision model"]
    report_data = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": shlex.join(["edge-run", "bench", *args.argv] if hasattr(args, "argv") else sys.argv),
        "machine": machine.cpu_info() | {"read_bandwidth": bandwidth, "load_average_before": list(load_before),
                                         "load_average_after": list(os.getloadavg())},
        "versions": machine.versions(), "commit": machine.git_commit(),
        "settings": {"model": str(gguf), "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
                     "new_tokens": args.new_tokens, "batch": args.batch, "batch_prompt_tokens": batch_len,
                     "repeats": args.repeats, "threads": threads, "ppl_windows": args.ppl_windows,
                     "ppl_window_tokens": args.ppl_window_tokens, "seconds": time.time() - started},
        "engines": engines, "comparisons": comparisons(engines, cases), "speculative": speculative, "notes": notes,
    }
    report.write_json(out_dir / "bench.json", report_data)
    terminal = Console()
    report.print_report(report_data, terminal if terminal.is_terminal else Console(width=220))
    if not args.no_plot:
        report_data["plot"] = report.plot(report_data, out_dir / "bench.png")
    say(f"wrote {out_dir / 'bench.json'}" + ("" if args.no_plot else f" and {out_dir / 'bench.png'}"))
    return report_data


def main(argv: list[str] | None = None) -> dict:
    """`python -m edgerun.bench.harness [flags]`: the same as `edge-run bench [flags]`."""
    p = parser("edge-run bench", __doc__)
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.harness")
