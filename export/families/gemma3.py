"""Gemma 3 family (text): embeddings scaled by sqrt(hidden), RMSNorm with (1 + w), four norms per block
(pre/post attention, pre/post MLP), per-head q/k norm, GeGLU (gelu tanh), sliding-window attention on
5 of every 6 layers with its own rope base, tied embeddings.

Canonical norm weights are the factors applied, (1 + w): llama.cpp's GGUF stores them so already, a
Hugging Face checkpoint stores w.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register
from .common import LAYER, QK_NORMS, gguf_spec, hf_rope, hf_spec, identity_tensor, name_tables

_BLOCK = LAYER | QK_NORMS | {
    "post_attn_norm": ("post_attention_norm", "post_attention_layernorm"),
    "ffn_norm": ("ffn_norm", "pre_feedforward_layernorm"),
    "post_ffn_norm": ("post_ffw_norm", "post_feedforward_layernorm"),
}
GGUF_NAMES, HF_NAMES = name_tables(_BLOCK)
SLIDING_PATTERN = 6  # llama.cpp's gemma3: every 6th layer global, the others sliding-window
LOCAL_ROPE_THETA = 10000.0


def _gemma_flags(hidden: int, num_layers: int, window: int, pattern: list[bool]) -> dict[str, Any]:
    return dict(embed_scale=float(np.float32(math.sqrt(hidden))), qk_norm=True, post_norms=True,
                activation="gelu_tanh", sliding_window=window,
                sliding_layers=tuple(i for i in range(num_layers) if pattern[i]))


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `gemma3.*` metadata (prefix stripped) onto a ModelSpec."""
    if meta.get("rope.scaling.type") not in (None, "none"):
        raise PackageError(f"gemma3 GGUF with rope scaling {meta['rope.scaling.type']!r} is not supported yet")
    hidden, layers = int(meta["embedding_length"]), int(meta["block_count"])
    pattern = [(i + 1) % SLIDING_PATTERN != 0 for i in range(layers)]
    flags = _gemma_flags(hidden, layers, int(meta.get("attention.sliding_window", 0)), pattern)
    return gguf_spec("gemma3", meta, rope_local_theta=LOCAL_ROPE_THETA, **flags)


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Gemma 3 text `config.json` (model_type gemma3_text) onto a ModelSpec."""
    if "text_config" in config:
        raise PackageError("a multimodal Gemma 3 folder is not supported yet; export its text model "
                           "(Gemma3ForCausalLM, model_type gemma3_text)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise PackageError(f"gemma3 with {key}={config[key]} is not supported yet")
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise PackageError(f"gemma3 with hidden_activation {config['hidden_activation']!r} is not supported yet")
    layers = int(config["num_hidden_layers"])
    types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % SLIDING_PATTERN else "full_attention" for i in range(layers)]
    params = config.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one rope per layer type
        _, local_scaling = hf_rope({"rope_parameters": params["sliding_attention"]})
        if local_scaling:
            raise PackageError("gemma3 with rope scaling on its sliding-window layers is not supported yet")
        local_theta = float(params["sliding_attention"]["rope_theta"])
        config = {k: v for k, v in config.items() if k != "rope_parameters"} | {
            "rope_parameters": params["full_attention"]}
    else:
        local_theta = float(config.get("rope_local_base_freq", LOCAL_ROPE_THETA))
    flags = _gemma_flags(int(config["hidden_size"]), layers, int(config.get("sliding_window") or 0),
                         [t == "sliding_attention" for t in types])
    scalar = config.get("query_pre_attn_scalar")
    return hf_spec("gemma3", config | {"tie_word_embeddings": config.get("tie_word_embeddings", True)},
                   default_theta=1e6, rope_local_theta=local_theta,
                   attention_scale=None if scalar is None else float(scalar) ** -0.5, **flags)


def from_hf_tensor(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Gemma's RMSNorm multiplies by (1 + w): store the factor, as llama.cpp's GGUF does."""
    return w + np.float32(1.0) if name.endswith("norm") else w


# Gemma's turn format: <start_of_turn>user / model ... <end_of_turn>; a system message is folded into
# the first user turn (Gemma has no system role)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] ~ '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ (system if loop.first else '') ~ (m['content'] | trim) }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

FAMILY = register(Family(
    name="gemma3",
    aliases=("gemma3_text",),
    spec_from_gguf=spec_from_gguf,
    spec_from_hf=spec_from_hf,
    gguf_names=GGUF_NAMES,
    hf_names=HF_NAMES,
    from_gguf_tensor=identity_tensor,
    to_gguf_tensor=identity_tensor,
    from_hf_tensor=from_hf_tensor,
    chat_template=CHAT_TEMPLATE,
    end_of_turn=("<end_of_turn>",),
))
