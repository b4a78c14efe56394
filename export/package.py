"""Write an edge-run package: manifest.json, stage graphs with external data and/or a GGUF file,
tokenizer.json.

Writing is atomic: everything goes into a temporary sibling folder that is renamed into place
only when complete, so a failed export never leaves a half-written package.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from ..devices.profiles import get_profile
from ..quant.pack_ort import MatMulNBitsWeight
from ..runtime.manifest import Manifest, PackageError, Stage
from ..version import __version__
from .checkpoint import Checkpoint, load_checkpoint
from .onnx_graph import build_stage

log = logging.getLogger(__name__)


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block completes."""
    target = Path(target)
    if target.exists() and not force:
        raise PackageError(f"{target} already exists; choose another -o folder or pass --force")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise PackageError(f"cannot create {target}: {e.strerror or e} ({e.filename or target.parent}); "
                           f"choose a writable -o folder") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a package is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@dataclass(frozen=True)
class OnnxQuantization:
    """Quantized weights for an ONNX package (made by `export.quantize.quantize_for_onnx`).

    Attributes:
        packed: canonical weight name -> MatMulNBits layout (one object under both "embed" and
            "lm_head" when a tied head shares the embedding's bytes).
        accuracy_level: MatMulNBits compute precision written into every node.
        weights: the manifest's weight-group summary (group -> format description).
        info: the manifest's `quantization` field.
    """

    packed: Mapping[str, MatMulNBitsWeight]
    accuracy_level: int
    weights: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GgufQuantization:
    """Quantized weights for a GGUF (made by `export.quantize.quantize_for_gguf`).

    Either `packed` holds GGML blocks made by `quant/` (numpy), or `llama_ftype` names a llama.cpp
    type (K-quants, ...) that `llama_model_quantize` makes from an F32 GGUF written first.

    Attributes:
        packed: canonical weight name -> tensor packed in llama.cpp's layout.
        file_type: `general.file_type` of the file (the type of most weights).
        llama_ftype: a `llama_ftype` value for llama.cpp's quantizer, or None.
        info: the manifest's `quantization` field.
    """

    packed: Mapping[str, Any] = field(default_factory=dict)
    file_type: Any = None
    llama_ftype: int | None = None
    info: dict[str, Any] = field(default_factory=dict)


def llama_quantize(source: Path, target: Path, ftype: int) -> None:
    """Quantize GGUF `source` into `target` with llama.cpp's own quantizer (all cores).

    Raises:
        PackageError: llama.cpp refused (it logs the reason to stderr; some types need an
            importance matrix, which edge-run does not compute).
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise PackageError(f"llama.cpp could not quantize to type {ftype} (see its log above; IQ1/IQ2 types "
                           f"need an importance matrix); choose another type such as q4_k_m")


def split_layers(num_layers: int, boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Turn stage boundaries (first layer of each later stage) into [start, end) ranges."""
    cuts = [0, *boundaries, num_layers]
    if any(b <= a for a, b in pairwise(cuts)) or not all(0 < b < num_layers for b in boundaries):
        raise PackageError(f"stage boundaries {list(boundaries)} must be increasing layer indices "
                           f"inside 1..{num_layers - 1}")
    return list(pairwise(cuts))


FORMATS = ("onnx", "gguf")
_GGML_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # GGML -> manifest names


def _weight_dtypes(spec_tied: bool, matrices: str) -> dict[str, str]:
    return {"embedding": matrices, "attention": matrices, "mlp": matrices, "norms": "float32",
            "lm_head": "tied" if spec_tied else matrices}


def gguf_weight_dtypes(tensor_types: Mapping[str, str]) -> dict[str, str]:
    """Manifest `weights` (group -> dtype) of a GGUF, from its tensors' GGML type names."""
    groups: dict[str, set[str]] = {}
    for name, ggml_type in tensor_types.items():
        part = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        group = ("norms" if "norm" in part else "embedding" if part == "token_embd" else
                 "lm_head" if part == "output" else "attention" if part.startswith("attn") else
                 "mlp" if part.startswith("ffn") else "other")
        groups.setdefault(group, set()).add(_GGML_DTYPES.get(ggml_type, ggml_type))
    out = {group: "+".join(sorted(types)) for group, types in sorted(groups.items())}
    return out if "lm_head" in out else out | {"lm_head": "tied"}


def write_package(ckpt: Checkpoint, out_dir: str | Path, stage_boundaries: Sequence[int] = (),
                  force: bool = False, progress: bool = False, separate_head: bool = False,
                  quantization: OnnxQuantization | GgufQuantization | None = None, *,
                  formats: Sequence[str] = ("onnx",),
                  gguf_dtype: str = "f32", exits: tuple[dict, list] | None = None,
                  device: str | None = None, max_memory: int | None = None) -> Manifest:
    """Write `ckpt` as a package: ONNX stage graphs, a GGUF file (model.gguf), or both.

    Args:
        ckpt: the checkpoint to export.
        out_dir: package folder to create.
        stage_boundaries: first layer of every ONNX stage after the first (empty: one graph).
        force: replace an existing folder.
        progress: show a progress bar on stderr.
        separate_head: put the final norm + LM head in a stage of its own (no layers), so the
            hidden states of any stage boundary can be scored (early exit, self-speculation).
        quantization: packed ONNX weights or GGUF quantization (see `export.quantize`); None
            writes float weights.
        formats: "onnx" and/or "gguf".
        exits: (adapters {layer: array}, manifest entries) from `export.exits.fit_exits`; the
            exit layers must be stage boundaries and the head a stage of its own.
        gguf_dtype: "f32" or "f16" for the GGUF's matrices (a package holding ONNX graphs too
            must be f32 and unquantized: one `weights` entry describes both).
        device: the device profile the ONNX graphs are built for (recorded in the manifest); a
            profile whose variant has `ort_format` also gets ORT-format models and
            required_operators.config (see `export.mobile`). None: a "cpu" package without the record.
        max_memory: a memory budget in bytes (see `runtime.memory.fit_memory`, on the weight files'
            size): the package is refused (nothing written) when it cannot run in it at the shortest
            context; else the longest context that fits is recorded (`extra["memory_budget"]`).
    Returns:
        The manifest written.
    """
    from .gguf_writer import GGUF_DTYPES

    formats = tuple(dict.fromkeys(formats))
    if not formats or set(formats) - set(FORMATS):
        raise ValueError(f"formats must be some of {', '.join(FORMATS)}, got {', '.join(formats) or 'none'}")
    if gguf_dtype not in GGUF_DTYPES:
        raise ValueError(f"unknown GGUF dtype {gguf_dtype!r}; choose one of: {', '.join(GGUF_DTYPES)}")
    gguf_quant = quantization if isinstance(quantization, GgufQuantization) else None
    quantization = quantization if isinstance(quantization, OnnxQuantization) else None
    if "gguf" in formats and quantization is not None:
        raise ValueError("ONNX quantization (MatMulNBits) does not apply to a GGUF; export the GGUF "
                         "with --format gguf to a folder of its own")
    if gguf_quant is not None and formats != ("gguf",):
        raise ValueError("a quantized GGUF goes in a package of its own: use --format gguf")
    if "gguf" in formats and "onnx" in formats and gguf_dtype != "f32":
        raise ValueError(f"the ONNX graphs are fp32, so a package with both formats must be --dtype f32 "
                         f"(one `weights` entry describes both); export --format gguf --dtype {gguf_dtype} "
                         f"to a folder of its own")
    ranges = split_layers(ckpt.spec.num_layers, stage_boundaries) if "onnx" in formats else []
    if ranges and separate_head:
        ranges.append((ckpt.spec.num_layers, ckpt.spec.num_layers))
    packed = quantization.packed if quantization else None
    invariant = _step_invariant(ckpt, quantization)
    stages = []
    with atomic_dir(Path(out_dir), force=force) as tmp:
        for k, (start, end) in enumerate(tqdm(ranges, desc="export", unit="stage", disable=not progress or not ranges)):
            stage = Stage(file=f"stage{k}.onnx", first_layer=start, end_layer=end,
                          embeds=k == 0, has_head=k == len(ranges) - 1)
            model = build_stage(ckpt.spec, ckpt.weights, start, end, stage.embeds, stage.has_head, packed=packed,
                                accuracy_level=quantization.accuracy_level if quantization else 0,
                                pad_attention=invariant)
            onnx.save_model(model, tmp / stage.file, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{stage.file}.data", size_threshold=1024)
            stages.append(stage)
        ort_models, operators = [], None
        if stages and device is not None and get_profile(device).variant.ort_format:
            from .mobile import write_ort_models

            ort_models, operators = write_ort_models(tmp, [s.file for s in stages])
        weights = None
        if "gguf" in formats:
            weights = _write_gguf(ckpt, tmp / "model.gguf", gguf_dtype, gguf_quant, progress)
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        adapters, exit_entries = exits or ({}, [])
        if adapters and not (separate_head and set(adapters) <= {s.end_layer for s in stages}):
            raise ValueError(f"exits after layers {sorted(adapters)} need stage boundaries there and a "
                             f"separate head stage (--exit-layers does both)")
        for layer, arrays in adapters.items():
            np.savez(tmp / f"exit{layer}.npz", **arrays)
        extra = {"attention_rows": True} if stages and invariant else {}
        if max_memory is not None:
            extra["memory_budget"] = _memory_budget(ckpt.spec, tmp, [s.file for s in stages], max_memory)
        manifest = _write_manifest(
            tmp, ckpt, stages=tuple(stages),
            weights=quantization.weights if quantization else weights or
            _weight_dtypes(ckpt.spec.tie_embeddings, "float32" if gguf_dtype == "f32" else "float16"),
            exits=tuple(exit_entries),
            gguf="model.gguf" if "gguf" in formats else None,
            device=device if stages else None, ort_models=tuple(ort_models), required_operators=operators, extra=extra,
            quantization=(quantization or gguf_quant).info if quantization or gguf_quant else {})
    log.info("wrote package %s (%s)", out_dir, ", ".join(formats))
    return manifest


def _write_gguf(ckpt: Checkpoint, path: Path, dtype: str, quant: GgufQuantization | None,
                progress: bool) -> dict[str, str] | None:
    """Write the package's GGUF; returns its weight groups when quantized (read back from the file)."""
    from .gguf_writer import write_gguf

    if quant is None:
        write_gguf(ckpt, path, dtype=dtype, progress=progress)
        return None
    if quant.llama_ftype is not None:
        source = path.with_name("source.f32.gguf")
        write_gguf(ckpt, source, dtype="f32", progress=progress)
        try:
            llama_quantize(source, path, quant.llama_ftype)
        finally:
            source.unlink()
    else:
        write_gguf(ckpt, path, dtype=dtype, packed=quant.packed, file_type=quant.file_type, progress=progress)
    import gguf

    reader = gguf.GGUFReader(path)
    return gguf_weight_dtypes({t.name: t.tensor_type.name for t in reader.tensors})


def write_gguf_reference(gguf_path: str | Path, out_dir: str | Path, force: bool = False) -> Manifest:
    """Write a light llama.cpp package for a GGUF file: manifest + tokenizer, no weights copied.

    The manifest's `gguf` is the file's absolute path; its spec, tokenizer and chat template come
    from the file's metadata (its weights are never read, so any architecture llama.cpp runs works).
    """
    gguf_path = Path(gguf_path).resolve()
    ckpt = load_checkpoint(gguf_path, weights=False)
    with atomic_dir(Path(out_dir), force=force) as tmp:
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        return _write_manifest(tmp, ckpt, stages=(), weights=gguf_weight_dtypes(ckpt.source_types),
                               gguf=str(gguf_path))


def _memory_budget(spec, folder: Path, stage_files: list[str], budget: int) -> dict[str, Any]:
    """The longest context (and KV type) the package in `folder` runs at within `budget` bytes.

    Raises:
        ValueError: nothing fits (names the smallest fit).
    """
    from ..runtime.memory import fit_memory, weight_file_bytes

    gguf = folder / "model.gguf"
    weights = weight_file_bytes(folder, stage_files, gguf if gguf.is_file() else None)
    kv_types = ("f32",) if stage_files else ("f32", "f16")  # a GGUF-only package runs on llama.cpp
    fit = fit_memory(spec, budget, weights, kv_types)
    return {"bytes": budget, "max_context": fit.max_context, "kv_cache": fit.kv_cache, "need": fit.total}


def _step_invariant(ckpt: Checkpoint, quantization: OnnxQuantization | None) -> bool:
    """Whether the ONNX graphs can compute a step's logits independently of how many tokens it
    carries: every matrix product a MatMulNBits of 4- or 8-bit codes (integer zero points) at
    accuracy level 4, whose rows do not depend on the number of rows, and attention padded to
    two or more rows (onnx_graph.build_stage, pad_attention). Float matrix products (an
    unquantized projection or head, a pruned model's healing map) take other kernels for one row."""
    if quantization is None or quantization.accuracy_level != 4:
        return False
    packed = quantization.packed
    linear = [n for n, w in ckpt.weights.items() if w.ndim == 2 and n != "embed"]
    if "lm_head" not in linear:
        linear.append("lm_head")
    return all(n in packed and packed[n].bits in (4, 8)
               and (packed[n].zero_points is None or packed[n].zero_points.dtype == np.uint8) for n in linear)


def _write_manifest(folder: Path, ckpt: Checkpoint, **fields: Any) -> Manifest:
    """Describe `ckpt` (spec, tokenizer, provenance, kept layers) plus `fields`; validate and write it."""
    extra = {"transforms": ckpt.transforms} if ckpt.transforms else {}
    extra.update(fields.pop("extra", {}))
    manifest = Manifest(
        model=ckpt.spec,
        tokenizer="tokenizer.json",
        bos_token_id=ckpt.bos_token_id,
        eos_token_ids=ckpt.eos_token_ids,
        add_bos_token=ckpt.add_bos_token,
        chat_template=ckpt.chat_template,
        source=ckpt.source,
        tool_version=__version__,
        kept_layers=ckpt.kept_layers or tuple(range(ckpt.spec.num_layers)),
        extra=extra,
        **fields,
    )
    # the checks a reader runs, so that a checkpoint with bad metadata makes no package (naming the checkpoint)
    Manifest.from_dict(manifest.to_dict(), f"the manifest made from {ckpt.source.get('path')}")
    manifest.write(folder)
    return manifest

