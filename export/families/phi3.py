"""Phi-3 family (Phi-3 / Phi-3.5 mini): a Llama block whose checkpoints fuse q/k/v into one projection
(`qkv_proj`, GGUF `attn_qkv`) and gate/up into another (`gate_up_proj`, GGUF `ffn_up`: the gate's rows
first), with full rotary in the rotate-half layout (llama.cpp runs phi3 with NEOX rope) and an
optional sliding window on every layer.

The fused tensors are split into the canonical q, k, v, gate and up weights on reading (each
canonical name points at the fused tensor and takes its rows), so the graph builders see a Llama
block. Not supported, each with a one-line error: longrope / su rope scaling (the 128k-context
models), partial rotary (Phi-4-mini), and writing a phi3 GGUF (our writer does not fuse tensors
back; export ONNX, or use llama.cpp's converter for GGUF).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register
from .common import LAYER, gguf_spec, hf_spec, name_tables

FUSED = {
    "q": ("attn_qkv", "self_attn.qkv_proj"),
    "k": ("attn_qkv", "self_attn.qkv_proj"),
    "v": ("attn_qkv", "self_attn.qkv_proj"),
    "gate": ("ffn_up", "mlp.gate_up_proj"),
    "up": ("ffn_up", "mlp.gate_up_proj"),
}
GGUF_NAMES, HF_NAMES = name_tables({**LAYER, **FUSED})


def _window(value: Any, layers: int) -> dict[str, Any]:
    window = int(value or 0)
    return dict(sliding_window=window, sliding_layers=tuple(range(layers))) if window else {}


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `phi3.*` metadata (prefix stripped) onto a ModelSpec."""
    if {"rope_factors_long.weight", "rope_factors_short.weight"} & meta["tensor_names"]:
        raise PackageError("phi3 with longrope scaling (rope_factors_long/short, the 128k-context models) is not "
                           "supported yet; use a 4k-context Phi-3 model")
    spec = gguf_spec("phi3", meta)
    flags = _window(meta.get("attention.sliding_window"), spec.num_layers)
    return dataclasses.replace(spec, **flags) if flags else spec


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Phi-3 `config.json` onto a ModelSpec."""
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise PackageError(f"phi3 with partial_rotary_factor={config['partial_rotary_factor']} (partial rotary, "
                           f"e.g. Phi-4-mini) is not supported yet")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) in ("longrope", "su"):
        raise PackageError("phi3 with longrope/su rope scaling (the 128k-context models) is not supported yet; "
                           "use a 4k-context Phi-3 model")
    if config.get("attention_bias"):
        raise PackageError("phi3 with attention_bias=true is not supported yet")
    layers = int(config["num_hidden_layers"])
    return hf_spec("phi3", config, **_window(config.get("sliding_window"), layers))


def _split(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The rows of fused tensor `w` that make canonical weight `name` (unfused weights pass through)."""
    part = name.rsplit(".", 1)[-1]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv),
            "gate": (0, spec.intermediate_size), "up": (spec.intermediate_size, 2 * spec.intermediate_size)}
    if part not in rows:
        return w
    start, end = rows[part]
    if w.shape[0] != (q + 2 * kv if part in "qkv" else 2 * spec.intermediate_size):
        raise PackageError(f"fused tensor for {name} has {w.shape[0]} rows, the config implies "
                           f"{q + 2 * kv if part in 'qkv' else 2 * spec.intermediate_size}; the checkpoint is corrupt")
    return np.ascontiguousarray(w[start:end])


def to_gguf_tensor(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    raise PackageError("writing a phi3 GGUF is not supported (its q/k/v and gate/up tensors are fused, our GGUF "
                       "writer writes them apart): export --format onnx, or convert with llama.cpp's "
                       "convert_hf_to_gguf.py")


FAMILY = register(Family(
    name="phi3",
    aliases=(),
    spec_from_gguf=spec_from_gguf,
    spec_from_hf=spec_from_hf,
    gguf_names=GGUF_NAMES,
    hf_names=HF_NAMES,
    from_gguf_tensor=_split,
    to_gguf_tensor=to_gguf_tensor,
    from_hf_tensor=_split,
))
