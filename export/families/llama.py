"""Llama family: Llama 2/3, SmolLM, Mistral-style GQA with RoPE and RMSNorm."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register
from .common import LAYER, gguf_spec, hf_spec, name_tables

GGUF_NAMES, HF_NAMES = name_tables(LAYER)


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `llama.*` metadata (prefix stripped) onto a ModelSpec."""
    return gguf_spec("llama", meta)


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Hugging Face `config.json` onto a ModelSpec (Llama 3 rope scaling included)."""
    if config.get("attention_bias"):
        raise PackageError("llama with attention_bias=true (biases on q/k/v/o) is not supported yet")
    return hf_spec("llama", config)


def from_gguf_tensor(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation so every source shares the HF rotate-half layout."""
    heads = {"q": spec.num_heads, "k": spec.num_kv_heads}.get(name.rsplit(".", 1)[-1])
    if heads is None:
        return w
    return w.reshape(heads, spec.head_dim // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensor(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Re-apply llama.cpp's Q/K row permutation (rotate-half -> interleaved pairs) for a GGUF file."""
    heads = {"q": spec.num_heads, "k": spec.num_kv_heads}.get(name.rsplit(".", 1)[-1])
    if heads is None:
        return w
    return w.reshape(heads, 2, spec.head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)


FAMILY = register(Family(
    name="llama",
    aliases=("mistral",),
    spec_from_gguf=spec_from_gguf,
    spec_from_hf=spec_from_hf,
    gguf_names=GGUF_NAMES,
    hf_names=HF_NAMES,
    from_gguf_tensor=from_gguf_tensor,
    to_gguf_tensor=to_gguf_tensor,
))
