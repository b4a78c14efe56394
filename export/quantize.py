"""Quantize a checkpoint by recipe and write it as an ONNX package with MatMulNBits weights.

    export_quantized("model.gguf", "out/", quant="int4-gptq", device="cpu")

The recipe (preset or file, see `edgerun.quant.recipe`) picks a format and method per tensor;
everything is checked before the checkpoint is read or calibration starts. The manifest records
the recipe, the format of every tensor, the ONNX layout and the MatMulNBits accuracy level; the
weight groups in `manifest.weights` summarize it.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from ..quant.base import QuantFormat, QuantizedTensor
from ..quant.pack_ort import MatMulNBitsWeight, pack_matmulnbits
from ..quant.recipe import Recipe, load_recipe
from ..runtime.manifest import Manifest, ModelSpec
from .calibrate import LAYER_LINEARS, calibration_tokens, quantize_calibrated
from .checkpoint import Checkpoint, load_checkpoint
from .package import OnnxQuantization, write_package

log = logging.getLogger(__name__)

# MatMulNBits accuracy_level per target device. On CPU, int8 compute (4) is the fast path: for
# 8- and 2-bit weights the fp32 path dequantizes and is ~50-100x slower per decode step (measured
# in bench/QUANT.md). Other execution providers pick their own compute type, so 0 (unset).
ACCURACY_LEVELS = {"cpu": 4}


def accuracy_level_for(device: str) -> int:
    """MatMulNBits accuracy level for a target device name ("cpu", "cuda", ...)."""
    return ACCURACY_LEVELS.get(device, 0)


def quantizable_names(spec: ModelSpec) -> list[str]:
    """Canonical names a recipe can address; `lm_head` exists for tied models too (the head's use)."""
    return ["embed", "lm_head"] + [f"layers.{i}.{n}" for i in range(spec.num_layers) for n in LAYER_LINEARS]


def _shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    key = "embed" if name == "lm_head" and "lm_head" not in ckpt.weights else name
    return ckpt.weights[key].shape


def plan(ckpt: Checkpoint, recipe: Recipe) -> tuple[dict[str, QuantFormat | None], dict[str, str]]:
    """Format and method per tensor, with every shape checked against its format.

    Raises:
        ValueError: a rule matching nothing, an invalid format, or a block size a tensor cannot take.
    """
    rules = recipe.resolve(quantizable_names(ckpt.spec))
    formats = {name: rule.make_format(f"tensor {name}") for name, rule in rules.items()}
    methods = {name: recipe.method_of(rule) for name, rule in rules.items()}
    for name, fmt in formats.items():
        if fmt is not None:
            fmt.check_shape(_shape(ckpt, name), name)
    if methods["embed"] == "gptq" and formats["embed"] is not None:
        log.info("embed is a lookup table with no layer input to calibrate on; it is rounded to nearest")
        methods["embed"] = "rtn"
    return formats, methods


def quantize_checkpoint(ckpt: Checkpoint, recipe: Recipe, progress: bool = False) -> dict[str, QuantizedTensor]:
    """Quantize the checkpoint's weights as `recipe` says.

    Returns:
        canonical name -> QuantizedTensor for the quantized tensors. For a tied model whose
        `embed` and `lm_head` get the same format, both names map to one tensor (GPTQ'd on the
        head's inputs when the lm_head rule says gptq).
    """
    formats, methods = plan(ckpt, recipe)
    shared = ckpt.spec.tie_embeddings and formats["embed"] is not None and formats["embed"] == formats["lm_head"]
    if shared and methods["lm_head"] != "gptq":
        formats = {**formats, "lm_head": None}  # quantized once, as the embedding
    if any(methods[n] == "gptq" and f is not None for n, f in formats.items()):
        tokens = calibration_tokens(ckpt.tokenizer, recipe.calibration)
        log.info("calibrating on %d x %d tokens", *tokens.shape)
        done = quantize_calibrated(ckpt.spec, ckpt.weights, tokens, formats, methods, recipe.calibration, progress)
    else:
        done = {}
        for name in tqdm([n for n, f in formats.items() if f is not None], desc="quantize", unit="tensor",
                         disable=not progress):
            key = "embed" if name == "lm_head" and "lm_head" not in ckpt.weights else name
            done[name] = formats[name].quantize(ckpt.weights[key], name)
    if shared:
        if "lm_head" in done:  # GPTQ'd head doubles as the embedding table
            done["embed"] = done["lm_head"]
        done["lm_head"] = done["embed"]
    return done


def _group(name: str) -> str:
    """The manifest weight group of a canonical tensor name."""
    if name in ("embed", "lm_head"):
        return "embedding" if name == "embed" else "lm_head"
    return "attention" if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o") else "mlp"


def manifest_entries(spec: ModelSpec, recipe: Recipe, quantized: dict[str, QuantizedTensor],
                     accuracy_level: int, device: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The manifest's weight-group summary and its `quantization` field."""
    groups: dict[str, set[str]] = defaultdict(set)
    tensors = {}
    for name in quantizable_names(spec):
        qt = quantized.get(name)
        groups[_group(name)].add(qt.fmt.describe() if qt else "float32")
        if qt is not None:
            tensors[name] = qt.describe()
    weights = {g: "+".join(sorted(v)) for g, v in groups.items()} | {"norms": "float32"}
    shared = quantized.get("lm_head") is not None and quantized.get("lm_head") is quantized.get("embed")
    if spec.tie_embeddings and (shared or ("lm_head" not in quantized and "embed" not in quantized)):
        weights["lm_head"] = "tied"
    formats = {qt.fmt.describe(): qt.fmt.spec() for qt in quantized.values()}
    info = {"recipe": recipe.to_dict(), "layout": "MatMulNBits", "accuracy_level": accuracy_level,
            "target_device": device, "formats": formats, "tensors": tensors, "shared_embedding_head": shared}
    return weights, info


def quantize_for_onnx(ckpt: Checkpoint, recipe: Recipe, device: str = "cpu", accuracy_level: int | None = None,
                      progress: bool = False) -> OnnxQuantization:
    """Quantize `ckpt` by `recipe` and pack the result in MatMulNBits layout."""
    level = accuracy_level_for(device) if accuracy_level is None else accuracy_level
    if level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy level {level} is not one of 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16), 4 (int8)")
    embed_format = plan(ckpt, recipe)[0]["embed"]
    if embed_format is not None and embed_format.offset_kind == "float":
        raise ValueError(f"the embedding cannot be {embed_format.describe()} in an ONNX package: GatherBlockQuantized "
                         f"takes integer zero points only; use int4_asym or int8_block for embed")
    quantized = quantize_checkpoint(ckpt, recipe, progress)
    packed: dict[str, MatMulNBitsWeight] = {}
    by_tensor: dict[int, MatMulNBitsWeight] = {}
    for name, qt in quantized.items():  # one packed object per tensor keeps tied sharing visible
        packed[name] = by_tensor.setdefault(id(qt), pack_matmulnbits(qt))
    slow = sorted(n for n, w in packed.items() if w.zero_points is not None and w.zero_points.dtype != np.uint8)
    if slow:
        log.warning("%d tensors (e.g. %s) use float zero points, which onnxruntime's CPU MatMulNBits runs "
                    "on a slow fallback (about 10x slower decoding); int4_asym is the fast layout", len(slow), slow[0])
    weights, info = manifest_entries(ckpt.spec, recipe, quantized, level, device)
    return OnnxQuantization(packed=packed, accuracy_level=level, weights=weights, info=info)


def export_quantized(model: str | Path | Checkpoint, out_dir: str | Path, quant: str | Path | dict,
                     device: str = "cpu", accuracy_level: int | None = None,
                     stage_boundaries: Sequence[int] = (), force: bool = False,
                     progress: bool = False) -> Manifest:
    """Read a checkpoint, quantize it and write an ONNX package.

    Args:
        model: checkpoint path (.gguf or HF folder) or a loaded Checkpoint.
        out_dir: package folder to create.
        quant: preset ("int8", "int4", "int4-gptq", "ternary"), recipe file (.json/.toml) or dict.
        device: target device; sets the MatMulNBits accuracy level (cpu -> 4, int8 compute).
        accuracy_level: override the device's accuracy level (0 unset .. 4 int8).
        stage_boundaries, force, progress: as for `write_package`.
    Returns:
        The manifest written.
    Raises:
        ValueError: invalid recipe (checked before the checkpoint is read), shapes a format
            cannot take, or missing calibration data.
    """
    recipe = load_recipe(quant)
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(model)
    quantization = quantize_for_onnx(ckpt, recipe, device, accuracy_level, progress)
    return write_package(ckpt, out_dir, stage_boundaries, force=force, progress=progress, quantization=quantization)
