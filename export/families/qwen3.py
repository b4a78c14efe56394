"""Qwen3 family (dense): a Llama block with per-head q/k RMSNorm before rotary, no biases.

llama.cpp runs qwen3 with NEOX (rotate-half) rope, so GGUF Q/K rows are in the HF layout already.
"""
from __future__ import annotations

from typing import Any

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register
from .common import LAYER, QK_NORMS, gguf_spec, hf_spec, identity_tensor, name_tables

GGUF_NAMES, HF_NAMES = name_tables(LAYER | QK_NORMS)


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `qwen3.*` metadata (prefix stripped) onto a ModelSpec."""
    return gguf_spec("qwen3", meta, qk_norm=True)


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Qwen3 `config.json` onto a ModelSpec (rope theta defaults to Qwen3's 1e6)."""
    if config.get("attention_bias"):
        raise PackageError("qwen3 with attention_bias=true (biases on q/k/v/o) is not supported yet")
    if config.get("use_sliding_window"):
        raise PackageError("qwen3 with use_sliding_window=true is not supported yet (sliding-window attention)")
    return hf_spec("qwen3", config, default_theta=1e6, qk_norm=True)


FAMILY = register(Family(
    name="qwen3",
    aliases=(),
    spec_from_gguf=spec_from_gguf,
    spec_from_hf=spec_from_hf,
    gguf_names=GGUF_NAMES,
    hf_names=HF_NAMES,
    from_gguf_tensor=identity_tensor,
    to_gguf_tensor=identity_tensor,
))
