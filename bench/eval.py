"""Quality of packages: WikiText-2 perplexity, and KL divergence / top-1 agreement of next-token
distributions against a reference package; plus size on disk and bits per weight.

    python -m edgerun.bench.eval PACKAGE [PACKAGE ...] [--reference REF] [--json out.json]

Protocol (the one DESIGN.md's peer table uses): the WikiText-2 test text, tokenized as one
string without special tokens; its first `windows x window_tokens` tokens (default 40 x 512 =
20,480) cut into independent windows, each run from an empty cache; every position after the
first is scored (40 x 511 = 20,440 predictions). Perplexity = exp(mean negative log-likelihood).
KL(reference || package) and top-1 agreement are averaged over the same positions.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from .. import data
from ..runtime.backend import BACKEND_NAMES, KV_CACHE_TYPES
from ..runtime.manifest import package_file
from ..version import __version__
from . import command, parser
from .prompts import perplexity_windows
from .report import write_json
from .weights import disk_bytes, initializer_bytes

WEIGHT_PREFIXES = ("embed", "lm_head", "layers.", "final_norm")
LINEAR_PARTS = ("q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up")


@dataclass
class Result:
    package: str
    weights: str
    size_mb: float
    bits_per_weight: float
    linear_bits_per_weight: float
    perplexity: float
    kl: float | None = None
    top1: float | None = None
    seconds: float = 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def parameter_counts(spec) -> tuple[int, int]:
    """(all weights stored once, linear-layer weights) of a ModelSpec."""
    h, q_out, kv_out = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    linear = spec.num_layers * (h * (q_out + 2 * kv_out) + q_out * h + 3 * h * spec.intermediate_size)
    table = spec.vocab_size * h * (1 if spec.tie_embeddings else 2)
    return table + linear + (2 * spec.num_layers + 1) * h, linear


def _is_linear(name: str) -> bool:
    parts = name.split(".")
    return name.startswith("layers.") and len(parts) >= 3 and parts[2] in LINEAR_PARTS


def _onnx_weight_bytes(folder: Path, manifest) -> tuple[int, int]:
    import onnx

    total = linear = 0
    for k, stage in enumerate(manifest.stages):
        model = onnx.load(str(package_file(folder, stage.file, f"stages[{k}].file")), load_external_data=False)
        for init in model.graph.initializer:
            if not init.name.startswith(WEIGHT_PREFIXES) or init.data_type == onnx.TensorProto.INT64:
                continue
            size = initializer_bytes(init)
            total += size
            linear += size if _is_linear(init.name) else 0
    return total, linear


def _gguf_weight_bytes(path: Path) -> tuple[int, int]:
    import gguf

    reader = gguf.GGUFReader(path)
    total = sum(int(t.n_bytes) for t in reader.tensors)
    linear = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and "norm" not in t.name)
    return total, linear


def weight_bits(folder: Path, manifest) -> tuple[float, float]:
    """Bits per weight of everything stored (tied table once) and of the linear layers alone."""
    params, linear_params = parameter_counts(manifest.model)
    if manifest.stages:
        total, linear = _onnx_weight_bytes(Path(folder), manifest)
    else:
        total, linear = _gguf_weight_bytes(manifest.gguf_path(folder))
    return 8 * total / params, 8 * linear / linear_params


def evaluate(packages: list[str], reference: str | None = None, windows: int = 40, window_tokens: int = 512,
             threads: int | None = None, text_file: Path | None = None, progress: bool = False,
             kv_cache: str = "f32", backend: str = "auto") -> dict[str, Any]:
    """Score `packages` (and the reference) on the protocol in the module docstring.

    `kv_cache` and `backend` apply to `packages`, not to the reference: scoring a package with a
    smaller KV cache type against itself with the default f32 cache measures what that type costs.

    Returns:
        {"protocol": ..., "reference": Result | None, "results": [Result, ...]} as plain dicts.
    Raises:
        ValueError: packages whose tokenizers disagree, or too little text.
    """
    from tqdm import tqdm

    from ..hub import load

    names = ([reference] if reference else []) + list(packages)
    engines = [load(p, threads=threads, max_context=window_tokens + 1,
                    **({} if reference and k == 0 else {"kv_cache": kv_cache, "backend": backend}))
               for k, p in enumerate(names)]
    text = Path(text_file).read_text() if text_file else data.wikitext("test")
    batch = np.asarray(perplexity_windows(engines[0].tokenizer, windows, window_tokens, text))
    probe = text[:2000]
    for name, engine in zip(names[1:], engines[1:]):
        if engine.encode(probe, add_special_tokens=False) != engines[0].encode(probe, add_special_tokens=False):
            raise ValueError(f"{name} tokenizes differently from {names[0]}; compare packages of one model")
    nll = np.zeros(len(names))
    kl = np.zeros(len(names))
    agree = np.zeros(len(names))
    seconds = np.zeros(len(names))
    for tokens in tqdm(batch, desc="eval", unit="window", disable=not progress):
        ref_lp = None
        for k, engine in enumerate(engines):
            start = time.perf_counter()
            lp = log_softmax(engine.logits(tokens.tolist())[:-1].astype(np.float32))
            seconds[k] += time.perf_counter() - start
            nll[k] -= lp[np.arange(len(tokens) - 1), tokens[1:]].sum(dtype=np.float64)
            if reference and k == 0:
                ref_lp = lp
            elif ref_lp is not None:
                kl[k] += (np.exp(ref_lp) * (ref_lp - lp)).sum(dtype=np.float64)
                agree[k] += (ref_lp.argmax(-1) == lp.argmax(-1)).sum()
    scored = batch.shape[0] * (batch.shape[1] - 1)
    results = []
    for k, (name, engine) in enumerate(zip(names, engines)):
        bpw, linear_bpw = weight_bits(engine.package_dir, engine.manifest)
        has_ref = reference is not None and k > 0
        results.append(Result(
            package=str(name), weights=", ".join(f"{g}={v}" for g, v in engine.manifest.weights.items()),
            size_mb=disk_bytes(engine.package_dir) / 1e6, bits_per_weight=bpw, linear_bits_per_weight=linear_bpw,
            perplexity=float(np.exp(nll[k] / scored)), kl=float(kl[k] / scored) if has_ref else None,
            top1=float(agree[k] / scored) if has_ref else None, seconds=float(seconds[k])))
    protocol = {"text": str(text_file) if text_file else "WikiText-2 test (edgerun.data)",
                "windows": int(batch.shape[0]), "window_tokens": int(batch.shape[1]),
                "tokens": int(batch.size), "scored_positions": scored, "special_tokens": False,
                "kl": "KL(reference || package), nats per position", "kv_cache": kv_cache, "backend": backend}
    return {"protocol": protocol, "reference": asdict(results[0]) if reference else None,
            "results": [asdict(r) for r in (results[1:] if reference else results)]}


def format_table(report: dict[str, Any]) -> str:
    rows = ([report["reference"]] if report["reference"] else []) + report["results"]
    base = report["reference"]["perplexity"] if report["reference"] else None
    lines = ["| package | size MB | bits/weight (all / linear) | ppl | ppl vs ref | KL vs ref | top-1 vs ref |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else "-"
        kl = "-" if r["kl"] is None else f"{r['kl']:.4f}"
        top1 = "-" if r["top1"] is None else f"{100 * r['top1']:.2f}%"
        lines.append(f"| {r['package']} | {r['size_mb']:.1f} | {r['bits_per_weight']:.2f} / "
                     f"{r['linear_bits_per_weight']:.2f} | {r['perplexity']:.3f} | {delta} | {kl} | {top1} |")
    p = report["protocol"]
    kv = p.get("kv_cache", "f32")
    lines.append(f"\nWikiText-2 test, first {p['tokens']} tokens as {p['windows']} independent "
                 f"{p['window_tokens']}-token "
                 f"windows, {p['scored_positions']} positions scored; KL and top-1 against the reference"
                 + (f"; scored packages with a {kv} KV cache." if kv != "f32" else "."))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval flags, for `edge-run eval` (cli.py) and `python -m edgerun.bench.eval`."""
    p.add_argument("packages", nargs="+", help="package folders (or model names) to score")
    p.add_argument("--reference", default=None, help="package whose next-token distributions are the reference")
    p.add_argument("--windows", type=int, default=40, help="independent windows (default 40)")
    p.add_argument("--window-tokens", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--text", type=Path, default=None, help="text file (default: WikiText-2 test)")
    p.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="f32",
                   help="KV cache type of the scored packages (not the reference's): f16 and q8_0 on llama.cpp")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto", help="backend of the scored packages")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args: argparse.Namespace) -> int:
    """Evaluate as parsed by `add_arguments`; prints the table, writes JSON when asked."""
    if args.windows < 1 or args.window_tokens < 2:
        raise ValueError(f"--windows must be >= 1 and --window-tokens >= 2, "
                         f"got {args.windows} and {args.window_tokens}")
    report = evaluate(args.packages, args.reference, args.windows, args.window_tokens, args.threads,
                      args.text, progress=True, kv_cache=args.kv_cache, backend=args.backend)
    print(format_table(report))
    if args.json:
        report["machine"] = {"processor": platform.processor() or platform.machine(),
                             "python": platform.python_version(), "cpus": os.cpu_count()}
        report["versions"] = {"edge_run": __version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
        write_json(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`edge-run eval PACKAGE [PACKAGE ...] [--reference REF] [--windows 40] [--window-tokens 512]
    [--threads N] [--text FILE] [--json OUT]`."""
    p = parser("edge-run eval", __doc__)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.eval")
