"""CUDA in one run: our host-KV path, our GPU-resident fp16 variant, onnxruntime-genai's CUDA builds.

    python bench/experiments/cuda_resident.py [--model smollm2-135m] [--prompts 8] [--new-tokens 64]
                                              [--rounds 3] [--no-genai] [--out FILE.json]

Needs onnxruntime-gpu (the CUDAExecutionProvider) on a machine with an NVIDIA GPU; anywhere else it
stops at once with a one-line error. It exports three packages of the model (cached in edge-run's
bench cache): the fp32 package (`--device cpu`: fp32 attention, KV cache on the host when run on
CUDA), the `--device cuda` fp16-attention variant (KV cache on the GPU) with float weights, and the
same with `--quant int4`. For each, on CUDA: greedy identity against the same package on the CPU
provider over `--prompts` MT-Bench prompts x `--new-tokens` tokens, the largest logit difference
on the first prompt, the KV tensors copied between host and device per decode step (the backend's
counter), and decode tokens/s (batch 1, from the first token on; median over `--prompts` prompts
x `--rounds`, after a warm-up). When onnxruntime-genai and its model builder are importable, its
CUDA fp16 and int4 builds of the same (dequantized) model are timed the same way and their greedy
agreement with ours is reported. Ratios: resident / host, and ours / onnxruntime-genai at the same
precision (the goal is >= 1.0). Prints a table and writes JSON.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgerun import data
from edgerun.bench import command, parser
from edgerun.bench.artifacts import bench_cache, ortgenai_model
from edgerun.bench.machine import git_commit, versions
from edgerun.export.pipeline import ExportOptions, export
from edgerun.hub import pull
from edgerun.runtime.engine import Engine

log = logging.getLogger(__name__)
VARIANTS = {  # label -> export options; each runs on CUDA and, for the reference, on the CPU provider
    "host-KV fp32 (--device cpu)": {},
    "GPU-resident fp16 (--device cuda)": {"device": "cuda"},
    "GPU-resident int4 (--device cuda --quant int4)": {"device": "cuda", "quant": "int4"},
}
GENAI = {"onnxruntime-genai CUDA fp16": "fp16", "onnxruntime-genai CUDA int4": "int4"}
PEERS = {"GPU-resident fp16 (--device cuda)": "onnxruntime-genai CUDA fp16",
         "GPU-resident int4 (--device cuda --quant int4)": "onnxruntime-genai CUDA int4"}


def require_cuda() -> None:
    """Raises ValueError (one line) unless onnxruntime has the CUDA provider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ValueError(f"this script needs onnxruntime's CUDAExecutionProvider on a machine with an NVIDIA GPU "
                         f"(providers here: {', '.join(ort.get_available_providers())}); "
                         f"pip uninstall -y onnxruntime && pip install onnxruntime-gpu")


def _package(gguf: Path, options: dict) -> Path:
    name = "pkg-" + ("-".join(f"{k}-{v}" for k, v in sorted(options.items())) or "fp32")
    out = bench_cache(gguf) / name
    if not (out / "manifest.json").is_file():
        export(gguf, out, ExportOptions(**options, force=True))
    return out


def _decode_tok_s(run, prompts: list[list[int]], new_tokens: int, rounds: int) -> float:
    """Median decode tokens/s of `run(prompt, new_tokens)` -> token timestamps (first token excluded)."""
    run(prompts[0], 8)  # warm-up: kernels chosen, buffers allocated
    rates = []
    for _ in range(rounds):
        for prompt in prompts:
            stamps = run(prompt, new_tokens)
            rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return statistics.median(rates)


def _ours(engine: Engine):
    def run(prompt, new_tokens):
        stamps = []
        for _ in engine.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True):
            stamps.append(time.perf_counter())
        return stamps
    return run


def _measure_ours(label: str, package: Path, prompts, args) -> dict:
    cpu = Engine(package, max_context=1024)
    gpu = Engine(package, device="cuda", max_context=1024)
    want, got = cpu.logits(prompts[0]), gpu.logits(prompts[0])
    steps: list[int] = []
    forward = gpu.backend.forward

    def counted(*a, **k):
        out = forward(*a, **k)
        steps.append(gpu.backend.step_kv_copies)
        return out

    gpu.backend.forward = counted
    identical, outputs = 0, []
    for prompt in prompts:
        expected = [r.token for r in cpu.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)]
        tokens = [r.token for r in gpu.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True)]
        identical += tokens == expected
        outputs.append(tokens)
    gpu.backend.forward = forward
    return {"label": label, "kv_on_device": gpu.backend.kv_device, "greedy_identical": f"{identical}/{len(prompts)}",
            "logit_max_diff": float(np.abs(got - want).max()), "logit_max": float(np.abs(want).max()),
            "kv_copies_per_step": max(steps), "outputs": outputs,
            "tok_s": _decode_tok_s(_ours(gpu), prompts[:3], args.new_tokens, args.rounds)}


def _measure_genai(label: str, precision: str, gguf: Path, prompts, ours: list[list[int]] | None, args) -> dict:
    import onnxruntime_genai as og

    model = og.Model(str(ortgenai_model(gguf, precision, execution_provider="cuda")))

    def run(prompt, new_tokens):
        params = og.GeneratorParams(model)
        length = len(prompt) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array([prompt], dtype=np.int32))
        stamps, tokens = [], []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        run.tokens = tokens
        return stamps

    agree = []
    for k, prompt in enumerate(prompts):
        run(prompt, args.new_tokens)
        if ours is not None:
            agree.append(next((i for i, (a, b) in enumerate(zip(run.tokens, ours[k])) if a != b), len(run.tokens)))
    return {"label": label, "version": og.__version__, "tok_s": _decode_tok_s(run, prompts[:3], args.new_tokens,
                                                                             args.rounds),
            "greedy_tokens_agreeing_with_ours": agree}


def main(argv: list[str] | None = None) -> dict:
    p = parser("python bench/experiments/cuda_resident.py", __doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a known model name (edge-run pull) or a GGUF file")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai's builds")
    p.add_argument("--out", default="cuda_resident.json")
    args = p.parse_args(argv)
    require_cuda()
    begun = time.perf_counter()
    gguf = Path(args.model) if args.model.endswith(".gguf") else pull(args.model)
    first: dict[str, str] = {}
    for r in data.mt_bench():
        first.setdefault(r["category"], r["turns"][0])
    rows: dict[str, dict] = {}
    prompts = None
    for label, options in VARIANTS.items():
        try:
            package = _package(gguf, options)
            if prompts is None:
                e = Engine(package, max_context=1024)
                prompts = [e.encode(e.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
                           for q in list(first.values())[:args.prompts]]
            rows[label] = _measure_ours(label, package, prompts, args)
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            rows[label] = {"label": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    if not args.no_genai and prompts is not None:
        if importlib.util.find_spec("onnxruntime_genai") is None:
            log.warning("onnxruntime-genai is not installed: its CUDA builds are skipped")
        else:
            for label, precision in GENAI.items():
                ours = next((rows[k].get("outputs") for k, v in PEERS.items() if v == label), None)
                try:
                    rows[label] = _measure_genai(label, precision, gguf, prompts, ours, args)
                except Exception as e:  # noqa: BLE001 - the builder or its CUDA session may fail
                    rows[label] = {"label": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    ratios = {}
    host = rows[next(iter(VARIANTS))].get("tok_s")
    for label, peer in PEERS.items():
        ours = rows.get(label, {}).get("tok_s")
        if ours and host:
            ratios[f"{label} / host-KV fp32"] = ours / host
        if ours and rows.get(peer, {}).get("tok_s"):
            ratios[f"{label} / {peer}"] = ours / rows[peer]["tok_s"]
    print(f"\n{'engine':52} {'decode tok/s':>12} {'greedy = CPU':>12} {'KV copies/step':>14} {'max logit diff':>14}")
    for row in rows.values():
        if "error" in row:
            print(f"{row['label']:52} failed: {row['error']}")
            continue
        print(f"{row['label']:52} {row['tok_s']:12.1f} {row.get('greedy_identical', '-'):>12} "
              f"{row.get('kv_copies_per_step', '-'):>14} {row.get('logit_max_diff', float('nan')):14.4f}")
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x")
    report = {"rows": {k: {f: v for f, v in r.items() if f != "outputs"} for k, r in rows.items()},
              "ratios": ratios, "seconds": time.perf_counter() - begun, "versions": versions(),
              "commit": git_commit(Path(__file__).parent), "onnxruntime": ort.__version__,
              "prompts": len(prompts or []), "new_tokens": args.new_tokens}
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    command(main, "python bench/experiments/cuda_resident.py")
