"""Qwen2 family: Qwen2, Qwen2.5, Qwen2.5-Coder. A Llama block with q/k/v projection biases.

llama.cpp runs qwen2 with NEOX (rotate-half) rope, so GGUF Q/K rows are in the HF layout already.
"""
from __future__ import annotations

from typing import Any

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register
from .common import LAYER, QKV_BIASES, gguf_spec, hf_spec, identity_tensor, name_tables

GGUF_NAMES, HF_NAMES = name_tables(LAYER, QKV_BIASES)


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `qwen2.*` metadata (prefix stripped) onto a ModelSpec."""
    return gguf_spec("qwen2", meta, attention_bias=True)


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Qwen2 `config.json` onto a ModelSpec (rope theta defaults to Qwen2's 1e6)."""
    if config.get("use_sliding_window"):
        raise PackageError("qwen2 with use_sliding_window=true is not supported yet (sliding-window attention)")
    return hf_spec("qwen2", config, default_theta=1e6, attention_bias=True)


FAMILY = register(Family(
    name="qwen2",
    aliases=(),
    spec_from_gguf=spec_from_gguf,
    spec_from_hf=spec_from_hf,
    gguf_names=GGUF_NAMES,
    hf_names=HF_NAMES,
    from_gguf_tensor=identity_tensor,
    to_gguf_tensor=identity_tensor,
))
