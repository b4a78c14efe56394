"""Quantize a checkpoint by recipe for an ONNX package (MatMulNBits weights) or a GGUF.

    quantization = quantize_for_onnx(ckpt, load_recipe("int4-gptq"), device="cpu")
    quantization = quantize_for_gguf(ckpt, "int4-gptq")   # Q4_1 / Q8_0 blocks packed here
    quantization = quantize_for_gguf(ckpt, "q4_k_m")      # llama.cpp's quantizer

`export.package.write_package` writes the result; `export.pipeline.export` runs the whole chain.
The recipe (preset or file, see `edgerun.quant.recipe`) picks a format and method per tensor;
`plan` checks every tensor before any work is done. The manifest records the recipe, the format of
every tensor, the layout (MatMulNBits and its accuracy level, or the GGML type of every tensor);
the weight groups in `manifest.weights` summarize it. llama.cpp's own types (K-quants, IQ4_NL,
...) are made by `llama_model_quantize` from an F32 GGUF written first.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm import tqdm

from ..devices.profiles import get_profile
from ..quant.base import QuantFormat, QuantizedTensor
from ..quant.pack_gguf import gguf_type_for, pack_gguf
from ..quant.pack_ort import MatMulNBitsWeight, pack_matmulnbits
from ..quant.recipe import Recipe, TensorRule, load_recipe
from ..runtime.manifest import ModelSpec
from .calibrate import LAYER_LINEARS, calibration_tokens, quantize_calibrated, select_promotions, tensor_sensitivity
from .checkpoint import Checkpoint, head_weight_name
from .families import get_family
from .gguf_writer import PackedTensor
from .package import GgufQuantization, OnnxQuantization

log = logging.getLogger(__name__)

def accuracy_level_for(device: str) -> int:
    """MatMulNBits accuracy level of a device profile's variant ("cpu", "cuda", ...; devices/profiles.json).

    On CPU, int8 compute (4) is the fast path: for 8- and 2-bit weights the fp32 path dequantizes every
    step (README: design notes on export and quantization); other providers pick their own (0, unset).
    """
    return get_profile(device).variant.accuracy_level


def quantizable_names(spec: ModelSpec) -> list[str]:
    """Canonical names a recipe can address; `lm_head` exists for tied models too (the head's use)."""
    return ["embed", "lm_head"] + [f"layers.{i}.{n}" for i in range(spec.num_layers) for n in LAYER_LINEARS]


def _shape(ckpt: Checkpoint, name: str) -> tuple[int, ...]:
    key = head_weight_name(ckpt.weights) if name == "lm_head" else name
    return ckpt.weights[key].shape


def _fit(rule: TensorRule, shape: tuple[int, ...], name: str, target: str) -> TensorRule:
    """`rule`, or its fallback (recursively) when the tensor's shape does not fit its format."""
    fmt = rule.make_format(f"tensor {name}")
    try:
        if fmt is not None:
            fmt.check_shape(shape, name)
            if target == "gguf":
                gguf_type_for(fmt, shape, name, rule.gguf_type)
        return rule
    except ValueError as e:
        if rule.fallback is None:
            raise
        log.debug("%s; falling back to %s", e, rule.fallback.format)
        return _fit(rule.fallback, shape, name, target)


def plan(ckpt: Checkpoint, recipe: Recipe, target: str = "onnx") -> tuple[dict[str, QuantFormat | None],
                                                                       dict[str, str], dict[str, str | None]]:
    """Format, method and (for a GGUF target) GGML type per tensor, every shape checked.

    Returns:
        (formats, methods, gguf_types): canonical name -> format (None: float), method, GGML type.
    Raises:
        ValueError: a rule matching nothing, an invalid format, a block size a tensor cannot take,
            or (target "gguf") a format no GGUF block type holds.
    """
    rules = {name: _fit(rule, _shape(ckpt, name), name, target)
             for name, rule in recipe.resolve(quantizable_names(ckpt.spec)).items()}
    formats = {name: rule.make_format(f"tensor {name}") for name, rule in rules.items()}
    methods = {name: recipe.method_of(rule) for name, rule in rules.items()}
    gguf_types = {name: gguf_type_for(fmt, _shape(ckpt, name), name, rules[name].gguf_type)
                  if target == "gguf" and fmt is not None else None for name, fmt in formats.items()}
    if methods["embed"] == "gptq" and formats["embed"] is not None:
        log.info("embed is a lookup table with no layer input to calibrate on; it is rounded to nearest")
        methods["embed"] = "rtn"
    return formats, methods, gguf_types


def promote_sensitive(ckpt: Checkpoint, recipe: Recipe, formats: dict[str, QuantFormat | None],
                      progress: bool = False) -> dict[str, QuantFormat | None]:
    """`formats` with the tensors `recipe.promote` picks moved to its format (see `quant.recipe.Promote`).

    Candidates are the layer tensors in a format of fewer bits than the promoted one; the budget is
    `promote.budget` x the bytes of every quantized tensor in `formats` (the embedding and a tied
    head it shares counted once). The scan runs on the first `promote.windows` calibration windows.
    """
    promote = recipe.promote
    target = promote.make_format()
    spec = ckpt.spec
    shapes = {name: _shape(ckpt, name) for name, fmt in formats.items() if fmt is not None}
    tied_once = spec.tie_embeddings and formats.get("embed") is not None and formats["embed"] == formats["lm_head"]
    total = sum(formats[n].storage_bytes(shapes[n]) for n in shapes if not (tied_once and n == "lm_head"))
    candidates = {}
    for name in shapes:
        fmt = formats[name]
        if name.startswith("layers.") and fmt.bits < target.bits:
            try:
                target.check_shape(shapes[name], name)
            except ValueError:
                continue
            candidates[name] = fmt
    if not candidates:
        return formats
    tokens = calibration_tokens(ckpt.tokenizer, recipe.calibration)[:promote.windows]
    log.info("sensitivity scan of %d tensors on %d x %d calibration tokens", len(candidates), *tokens.shape)
    scores = tensor_sensitivity(spec, ckpt.weights, tokens, candidates, progress=progress)
    extra = {n: target.storage_bytes(shapes[n]) - candidates[n].storage_bytes(shapes[n]) for n in candidates}
    log.debug("sensitivity (KL, nats/token): %s", {n: float(f"{v:.4g}") for n, v in scores.items()})
    chosen = select_promotions(scores, extra, promote.budget * total)
    log.info("promoted to %s: %d tensors, +%.2f MB of %.2f MB (%s)", target.describe(), len(chosen),
             sum(extra[n] for n in chosen) / 1e6, total / 1e6, ", ".join(chosen))
    return {**formats, **{n: target for n in chosen}}


def quantize_checkpoint(ckpt: Checkpoint, recipe: Recipe, progress: bool = False,
                        target: str = "onnx") -> dict[str, QuantizedTensor]:
    """Quantize the checkpoint's weights as `recipe` says (for `target` "onnx" or "gguf").

    Returns:
        canonical name -> QuantizedTensor for the quantized tensors. For a tied model whose
        `embed` and `lm_head` get the same format, both names map to one tensor (GPTQ'd on the
        head's inputs when the lm_head rule says gptq).
    """
    formats, methods, _ = plan(ckpt, recipe, target)
    if recipe.promote is not None:
        formats = promote_sensitive(ckpt, recipe, formats, progress)
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
            key = head_weight_name(ckpt.weights) if name == "lm_head" else name
            done[name] = formats[name].quantize(ckpt.weights[key], name)
    if shared:
        if "lm_head" in done:  # GPTQ'd head doubles as the embedding table
            done["embed"] = done["lm_head"]
        done["lm_head"] = done["embed"]
    return done


def shares_embedding(quantized: dict[str, QuantizedTensor]) -> bool:
    """Whether the LM head is the quantized embedding table itself (one copy, tied)."""
    return quantized.get("lm_head") is not None and quantized.get("lm_head") is quantized.get("embed")


def _group(name: str) -> str:
    """The manifest weight group of a canonical tensor name."""
    if name in ("embed", "lm_head"):
        return "embedding" if name == "embed" else "lm_head"
    return "attention" if name.rsplit(".", 1)[-1] in ("q", "k", "v", "o") else "mlp"


def manifest_entries(spec: ModelSpec, recipe: Recipe, quantized: dict[str, QuantizedTensor],
                     **layout: Any) -> tuple[dict[str, str], dict[str, Any]]:
    """The manifest's weight-group summary and its `quantization` field (`layout` describes the packing)."""
    groups: dict[str, set[str]] = defaultdict(set)
    tensors = {}
    for name in quantizable_names(spec):
        qt = quantized.get(name)
        groups[_group(name)].add(qt.fmt.describe() if qt else "float32")
        if qt is not None:
            tensors[name] = qt.describe()
    weights = {g: "+".join(sorted(v)) for g, v in groups.items()} | {"norms": "float32"}
    shared = shares_embedding(quantized)
    if spec.tie_embeddings and (shared or ("lm_head" not in quantized and "embed" not in quantized)):
        weights["lm_head"] = "tied"
    formats = {qt.fmt.describe(): qt.fmt.spec() for qt in quantized.values()}
    info = {"recipe": recipe.to_dict(), **layout, "formats": formats, "tensors": tensors,
            "shared_embedding_head": shared}
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
                    "on a much slower fallback; int4_asym is the fast layout", len(slow), slow[0])
    weights, info = manifest_entries(ckpt.spec, recipe, quantized, layout="MatMulNBits", accuracy_level=level,
                                     target_device=device)
    return OnnxQuantization(packed=packed, accuracy_level=level, weights=weights, info=info)


def llama_quant_types() -> dict[str, int]:
    """llama.cpp's quantization types by lower-case name (q4_k_m, q6_k, iq4_nl, ...) -> llama_ftype."""
    import llama_cpp

    prefix = "LLAMA_FTYPE_MOSTLY_"
    return {n[len(prefix):].lower(): getattr(llama_cpp, n) for n in dir(llama_cpp)
            if n.startswith(prefix) and n[len(prefix):] not in ("F16", "BF16")}  # floats: --dtype


def resolve_quant(quant: str | Path | dict | Recipe, target: str) -> Recipe | str:
    """The recipe `--quant` names for `target` ("onnx" / "gguf"), or a llama.cpp type name (GGUF only).

    Raises:
        ValueError: an unknown preset or type, or an invalid recipe file.
    """
    from ..quant.recipe import TARGETS

    name = str(quant).lower() if isinstance(quant, (str, Path)) else None
    if target == "gguf" and name not in TARGETS["gguf"] and name in llama_quant_types():
        return name
    try:
        return load_recipe(quant, target=target)
    except ValueError as e:
        if target != "gguf" or not isinstance(quant, (str, Path)) or Path(quant).is_file():
            raise  # a recipe given but broken: llama.cpp's type names are no help there
        raise ValueError(f"{e}; for --format gguf, llama.cpp types work too: "
                         f"{', '.join(sorted(llama_quant_types()))}") from None


def quantize_for_gguf(ckpt: Checkpoint, quant: str | Path | dict | Recipe, progress: bool = False) -> GgufQuantization:
    """Quantize `ckpt` for a GGUF: by recipe into GGML blocks packed here, or by llama.cpp's quantizer.

    Args:
        quant: a GGUF preset (int8 -> Q8_0, int4 / int4-gptq -> Q4_1 with Q8_0 tables and sensitive
            tensors, ternary -> TQ2_0 with Q4_0 where rows are not multiples of 256), a recipe whose
            formats GGUF holds, or a llama.cpp type name such as q4_k_m (see `llama_quant_types`).
    Raises:
        ValueError: a recipe format no GGUF block type holds, or an unknown name.
    """
    recipe = resolve_quant(quant, "gguf")
    if isinstance(recipe, str):
        import llama_cpp

        return GgufQuantization(llama_ftype=llama_quant_types()[recipe], info={
            "quantizer": "llama.cpp llama_model_quantize", "llama_ftype": recipe.upper(),
            "source_dtype": "float32", "llama_cpp_python": llama_cpp.__version__})
    gguf_types = plan(ckpt, recipe, "gguf")[2]  # checks every format before any work
    quantized = quantize_checkpoint(ckpt, recipe, progress, target="gguf")
    family = get_family(ckpt.spec.architecture)
    shared = shares_embedding(quantized)
    packed, types = {}, {}
    for name, qt in quantized.items():
        if name == "lm_head" and shared:
            continue  # a tied GGUF has no output tensor: llama.cpp reuses token_embd
        types[name] = gguf_types[name]
        qtype, data = pack_gguf(qt, types[name])
        packed[name] = PackedTensor(np.ascontiguousarray(family.to_gguf_tensor(name, data, ckpt.spec)), qtype)
    if ckpt.spec.tie_embeddings and "embed" in quantized and "lm_head" not in quantized:
        # the recipe keeps the head float: it gets an output tensor of its own
        packed["lm_head"] = PackedTensor(np.ascontiguousarray(ckpt.weights["embed"], np.float32).view(np.uint8),
                                         gguf.GGMLQuantizationType.F32)
    counts: dict[str, int] = defaultdict(int)
    for name, qt in quantized.items():
        counts[types.get(name, "")] += qt.shape[0] * qt.shape[1]
    main_type = max((t for t in counts if t), key=counts.__getitem__, default=None)
    _, info = manifest_entries(ckpt.spec, recipe, quantized, layout="GGUF", gguf_types=types)
    return GgufQuantization(packed=packed, file_type=main_type and gguf.LlamaFileType[f"MOSTLY_{main_type}"],
                            info=info)

