"""Llama family: Llama 2/3, SmolLM, Mistral-style GQA with RoPE and RMSNorm."""
from __future__ import annotations

from typing import Any

import numpy as np

from ...runtime.manifest import ModelSpec, PackageError
from . import Family, register

_LAYER = {
    "attn_norm": ("attn_norm", "input_layernorm"),
    "q": ("attn_q", "self_attn.q_proj"),
    "k": ("attn_k", "self_attn.k_proj"),
    "v": ("attn_v", "self_attn.v_proj"),
    "o": ("attn_output", "self_attn.o_proj"),
    "ffn_norm": ("ffn_norm", "post_attention_layernorm"),
    "gate": ("ffn_gate", "mlp.gate_proj"),
    "up": ("ffn_up", "mlp.up_proj"),
    "down": ("ffn_down", "mlp.down_proj"),
}
_GLOBAL = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
}
GGUF_NAMES = {k: v[0] for k, v in _GLOBAL.items()} | {
    f"layers.{{i}}.{k}": f"blk.{{i}}.{v[0]}.weight" for k, v in _LAYER.items()}
HF_NAMES = {k: v[1] for k, v in _GLOBAL.items()} | {
    f"layers.{{i}}.{k}": f"model.layers.{{i}}.{v[1]}.weight" for k, v in _LAYER.items()}


def _require(meta: dict[str, Any], key: str, where: str) -> Any:
    if key not in meta:
        raise PackageError(f"{where} lacks {key!r}; the checkpoint is incomplete")
    return meta[key]


def spec_from_gguf(meta: dict[str, Any]) -> ModelSpec:
    """Map GGUF `llama.*` metadata (prefix stripped) onto a ModelSpec."""
    def g(key):
        return _require(meta, key, "GGUF metadata")

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    rope_dim = int(meta.get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise PackageError(f"partial rotary (rope dim {rope_dim} < head dim {head_dim}) is not supported yet")
    return ModelSpec(
        architecture="llama",
        vocab_size=int(meta.get("vocab_size") or len(meta["tokenizer.ggml.tokens"])),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("rope.freq_base", 10000.0)),
        context_length=int(g("context_length")),
        tie_embeddings="output.weight" not in meta["tensor_names"],
    )


def spec_from_hf(config: dict[str, Any]) -> ModelSpec:
    """Map a Hugging Face `config.json` onto a ModelSpec."""
    def g(key):
        return _require(config, key, "config.json")

    if config.get("rope_scaling"):
        raise PackageError(f"rope_scaling {config['rope_scaling']} is not supported yet")
    heads = int(g("num_attention_heads"))
    hidden = int(g("hidden_size"))
    return ModelSpec(
        architecture="llama",
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("intermediate_size")),
        num_layers=int(g("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
        context_length=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


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
