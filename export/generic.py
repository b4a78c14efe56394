"""The long tail: a Hugging Face folder of an architecture without a family module, exported through
optimum's ONNX exporter (`optimum-onnx`, the `export` extra) into a package of one generic graph.

edge-run did not build that graph, so it cannot split, prune or re-quantize it by recipe; it runs
it with the generic onnx backend (runtime/generic_backend.py, whose LIMITS list what is not
available) and can quantize its matrix weights with onnxruntime's own MatMulNBits quantizer.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..runtime.generic_backend import graph_layout
from ..runtime.manifest import Manifest, ModelSpec, PackageError, Stage
from .checkpoint import Checkpoint, hf_metadata
from .families import find_family, supported_architectures
from .package import _write_manifest, atomic_dir

log = logging.getLogger(__name__)

EXPORTER = "optimum-onnx"
TASK = "text-generation-with-past"
EXTRA = 'pip install "edge-run[export]"'
# onnxruntime's weight-only MatMulNBits quantizer (its dynamic int8 quantizer is not used: it quantizes
# activations with one scale per step, so a token's logits would depend on the other tokens of its step,
# and batched or speculative greedy output could leave plain batch-1 output)
QUANTS = {"int8": 8, "int4": 4}
BLOCK = 32
GRAPH = "model.onnx"


def generic_architecture(path: str | Path) -> str | None:
    """The `model_type` of a Hugging Face folder that no family module reads, else None (a family's
    folder, a GGUF file, or anything else `load_checkpoint` judges)."""
    path = Path(path)
    config = path / "config.json"
    if not path.is_dir() or not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # load_checkpoint names the problem
    return str(model_type) if isinstance(model_type, str) and find_family(model_type) is None else None


def _versions() -> dict[str, str]:
    names = ("optimum-onnx", "optimum", "transformers", "torch", "onnxruntime")
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _transformers_wanted() -> str | None:
    """optimum-onnx's transformers requirement when the installed transformers does not meet it."""
    from packaging.requirements import InvalidRequirement, Requirement  # optimum's own dependency

    have = _versions().get("transformers")
    for text in importlib.metadata.requires("optimum-onnx") or []:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.name == "transformers" and requirement.marker is None and have is not None \
                and not requirement.specifier.contains(have, prereleases=True):
            return f"transformers{requirement.specifier}"
    return None


def _main_export(architecture: str):
    """optimum's export function, or a PackageError naming the extra (and the versions, when optimum is
    installed next to a transformers it does not support)."""
    versions = _versions()
    why = f"edge-run has no family module for {architecture!r} (it has: {', '.join(supported_architectures())})"
    if "optimum-onnx" not in versions:
        raise PackageError(f"{why}; such models export through optimum's ONNX exporter, which is not installed: "
                           f"{EXTRA}")
    have = f"this environment has transformers {versions.get('transformers', 'none')}"
    wanted = _transformers_wanted()
    if wanted:
        raise PackageError(f"{why}; it exports through optimum-onnx {versions['optimum-onnx']}, which needs {wanted} "
                           f"and {have}: {EXTRA} installs a matching set (or export in an environment of its own)")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise PackageError(f"{why}, and optimum-onnx {versions['optimum-onnx']} cannot be imported here "
                           f"({str(e).splitlines()[0]}; {have}): {EXTRA} installs a matching set") from None
    return main_export


def check_generic_options(options, architecture: str) -> None:
    """Refuse export settings a generic graph cannot take, naming the setting and why.

    Raises:
        ValueError: prune / heal / exits / stage boundaries, GGUF, f16 KV cache, another device,
            a memory budget, or a quant other than int8 / int4 (presets; recipes need a family).
    """
    why = f"{architecture!r} has no edge-run family module, so it exports through optimum as one generic graph"
    refused = [(options.prunes, "--prune-layers / --keep-layers / --heal", "edge-run cannot edit a graph it did "
                "not build"),
               (bool(options.exit_layers or options.stage_boundaries or options.separate_head),
                "--exit-layers / --stage-boundaries", "the graph is one piece"),
               ("gguf" in options.formats, "--format gguf", "no family module maps its tensors to llama.cpp's"),
               (options.kv_cache == "f16", "--kv-cache f16", "the graph keeps its KV cache in float32"),
               (options.device != "cpu", f"--device {options.device}", "only the CPU variant exists"),
               (options.max_memory is not None, "--max-memory", "edge-run cannot size a graph it did not build")]
    for bad, flag, reason in refused:
        if bad:
            raise ValueError(f"{flag} is not available: {why} ({reason})")
    if options.quant is not None and options.quant not in QUANTS:
        raise ValueError(f"--quant {options.quant} is not available: {why}, which only onnxruntime's own quantizers "
                         f"take: --quant int8 or int4 (MatMulNBits, weight-only)")
    if options.accuracy_level is not None and options.quant != "int4":
        raise ValueError("--accuracy-level sets MatMulNBits' compute precision: use it with --quant int4")


def _spec(folder: Path, architecture: str, layout: tuple[int, int, int, int]) -> ModelSpec:
    """A ModelSpec for the manifest: sizes from the graph, the rest from the folder's config."""
    import transformers

    layers, kv_heads, head_dim, vocab = layout
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)

    def first(*names: str, default: Any = None) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
        return default

    context = first("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
    if context is None:
        raise PackageError(f"{folder / 'config.json'} names no context length (max_position_embeddings or "
                           f"n_positions); add it to the config")
    hidden = int(first("hidden_size", "n_embd", "d_model", default=kv_heads * head_dim))
    heads = max(int(first("num_attention_heads", "n_head", default=kv_heads)), kv_heads)
    return ModelSpec(
        architecture=architecture, vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(first("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", default=1e-5)),
        rope_theta=float(first("rope_theta", default=10000.0)), context_length=int(context),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)))


def _source_dtypes(folder: Path) -> list[str]:
    from safetensors import safe_open

    dtypes = set()
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            dtypes |= {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
    return sorted(dtypes)


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite every Gemm whose weight is a constant (alpha = beta = 1, no transposed input) as MatMul
    (+ Add of its bias), so onnxruntime's quantizers, which take MatMul only, reach those weights too
    (GPT-2's Conv1D layers export as Gemm). Returns how many were rewritten."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    transposed: dict[str, str] = {}
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            if weight not in transposed:
                transposed[weight] = f"{weight}.transposed"
                array = numpy_helper.to_array(initializers[weight]).T
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), transposed[weight]))
            weight = transposed[weight]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = _inputs_used(graph)
    kept = [t for t in graph.initializer if t.name in used or t.name not in transposed]  # transposed originals go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewritten


def _inputs_used(graph) -> set[str]:
    """Names every node of `graph` and of its subgraphs (If/Loop bodies) reads."""
    used = set()
    for node in graph.node:
        used |= set(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _inputs_used(sub)
    return used


def _quantize(model: onnx.ModelProto, quant: str, accuracy_level: int | None
              ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, Any]]:
    """The graph with its MatMul weights quantized by onnxruntime; (model, manifest weights, info).

    Raises:
        ValueError: the graph has no MatMul with a constant weight to quantize.
    """
    rewritten = gemm_to_matmul(model)
    initializers = {t.name for t in model.graph.initializer}
    matrices = sum(n.op_type == "MatMul" and n.input[1] in initializers for n in model.graph.node)
    if not matrices:
        raise ValueError(f"--quant {quant}: this generic graph has no MatMul or Gemm with a constant weight, which "
                         f"is all onnxruntime's quantizers take; export it without --quant")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = QUANTS[quant]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=accuracy_level)
    quantizer.process()
    model = quantizer.model.model
    done = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    method = f"onnxruntime MatMulNBits, {bits} bits, symmetric, blocks of {BLOCK} (round to nearest)"
    weights = {"embedding": "float32", "norms": "float32", "other": quant}
    info = {"method": method, "matrices": matrices, "quantized": done, "gemm_rewritten_as_matmul": rewritten,
            "accuracy_level": accuracy_level or 0}
    return model, weights, info


def export_generic(folder: str | Path, out: str | Path, options, progress: bool = False) -> Manifest:
    """Export a Hugging Face folder of an architecture without a family module through optimum.

    Args:
        folder: config.json + *.safetensors + tokenizer.json (+ tokenizer_config.json).
        out: the package folder, written atomically (see `export.package.atomic_dir`).
        options: an `ExportOptions`; only `quant` ("int8", "int4"), `accuracy_level` and `force` apply.
        progress: log what runs (optimum's export takes a while on large models).
    Returns:
        The manifest written; its `generic` records the exporter, versions and task.
    Raises:
        PackageError: optimum is missing (names the extra to install) or cannot export this
            architecture, or its graph is not a decoder edge-run can run.
        ValueError: an option a generic graph cannot take.
    """
    folder = Path(folder)
    architecture = generic_architecture(folder)
    if architecture is None:
        raise PackageError(f"{folder} is not a Hugging Face folder of an architecture without a family module")
    check_generic_options(options, architecture)
    main_export = _main_export(architecture)
    from .checkpoint import checkpoint_kind

    checkpoint_kind(folder)  # names a missing tokenizer.json / safetensors
    versions = _versions()
    with atomic_dir(Path(out), force=options.force) as tmp:
        work = tmp / "optimum"
        if progress:
            log.info("exporting %s (%s) through optimum-onnx %s", folder, architecture, versions.get("optimum-onnx"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's tracer warnings about python control flow
                main_export(str(folder), output=work, task=TASK, local_files_only=True, do_validation=False,
                            library_name="transformers", device="cpu")
        except (ValueError, KeyError, NotImplementedError, RuntimeError, OSError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise PackageError(f"optimum-onnx {versions.get('optimum-onnx')} cannot export {folder} "
                               f"({architecture}) for {TASK}: {reason}") from None
        source = work / GRAPH
        if not source.is_file():
            raise PackageError(f"optimum-onnx wrote no {GRAPH} for {folder}: it exports {architecture} as other "
                               f"graphs than one decoder ({', '.join(sorted(p.name for p in work.iterdir()))})")
        model = onnx.load(str(source))
        layout = graph_layout(model.graph, f"optimum's graph of {folder}")
        spec = _spec(folder, architecture, layout)
        weights = {"embedding": "float32", "attention": "float32", "mlp": "float32", "norms": "float32",
                   "lm_head": "float32"}
        quantization: dict[str, Any] = {}
        if options.quant is not None:
            model, weights, quantization = _quantize(model, options.quant, options.accuracy_level)
        onnx.save_model(model, str(tmp / GRAPH), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{GRAPH}.data", size_threshold=1024)
        del model
        shutil.rmtree(work)
        config = json.loads((folder / "config.json").read_text())
        ckpt = Checkpoint(spec=spec, weights={}, **hf_metadata(folder, config, None, _source_dtypes(folder)))
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        generic = {"exporter": EXPORTER, "version": versions.get(EXPORTER), "task": TASK,
                   "versions": {k: v for k, v in versions.items() if k != EXPORTER}}
        manifest = _write_manifest(tmp, ckpt, stages=(Stage(GRAPH, 0, spec.num_layers, True, True),),
                                   weights=weights, quantization=quantization, generic=generic)
    log.info("wrote package %s (generic %s graph of %s)", out, EXPORTER, architecture)
    return manifest
