"""What the Llama-style families share: the block's tensor names and the metadata -> ModelSpec mapping.

A family module (llama, qwen2, qwen3, ...) picks its name tables here, adds its own tensors, and
states its differences as ModelSpec fields (`attention_bias`, `qk_norm`, `rope_scaling`).
"""
from __future__ import annotations

from typing import Any

from ...runtime.manifest import ModelSpec, PackageError

# canonical block weight -> (GGUF name part, HF name part), for `.weight` tensors
LAYER = {
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
# q/k/v projection biases (Qwen2): canonical -> (GGUF, HF) part, for `.bias` tensors
QKV_BIASES = {
    "q_bias": ("attn_q", "self_attn.q_proj"),
    "k_bias": ("attn_k", "self_attn.k_proj"),
    "v_bias": ("attn_v", "self_attn.v_proj"),
}
# per-head q/k RMSNorm weights [head_dim] (Qwen3, Gemma 3)
QK_NORMS = {
    "q_norm": ("attn_q_norm", "self_attn.q_norm"),
    "k_norm": ("attn_k_norm", "self_attn.k_norm"),
}
GLOBAL = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
}
ROPE_TYPES = ("default", "llama3")  # rope scalings the graph builders implement (onnx_graph.rotary_cache)


def name_tables(weights: dict[str, tuple[str, str]], biases: dict[str, tuple[str, str]] | None = None
                ) -> tuple[dict[str, str], dict[str, str]]:
    """(GGUF names, HF names): canonical name -> external name (`{i}` = layer index) for the
    global tensors, the block `weights` (`.weight`) and the block `biases` (`.bias`)."""
    gguf = {k: v[0] for k, v in GLOBAL.items()}
    hf = {k: v[1] for k, v in GLOBAL.items()}
    for table, suffix in ((weights, "weight"), (biases or {}, "bias")):
        for k, (gguf_part, hf_part) in table.items():
            gguf[f"layers.{{i}}.{k}"] = f"blk.{{i}}.{gguf_part}.{suffix}"
            hf[f"layers.{{i}}.{k}"] = f"model.layers.{{i}}.{hf_part}.{suffix}"
    return gguf, hf


def require(meta: dict[str, Any], key: str, where: str) -> Any:
    if key not in meta:
        raise PackageError(f"{where} lacks {key!r}; the checkpoint is incomplete")
    return meta[key]


def gguf_spec(architecture: str, meta: dict[str, Any], **flags: Any) -> ModelSpec:
    """Map GGUF `{arch}.*` metadata (prefix stripped) onto a ModelSpec; `flags` set the family's fields."""
    def g(key):
        return require(meta, key, "GGUF metadata")

    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    rope_dim = int(meta.get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise PackageError(f"partial rotary (rope dim {rope_dim} < head dim {head_dim}) is not supported yet")
    if "rope_freqs.weight" in meta["tensor_names"]:  # llama.cpp's form of Llama 3 rope scaling
        raise PackageError(f"{architecture} GGUF with rope_freqs (Llama 3.1+ rope scaling) is not supported yet; "
                           f"export the Hugging Face folder instead")
    return ModelSpec(
        architecture=architecture,
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
        **flags,
    )


def hf_rope(config: dict[str, Any], default_theta: float = 10000.0) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, rope scaling or None) of a config.json, old style (`rope_theta` + `rope_scaling`)
    or transformers 5 style (`rope_parameters` holding both)."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", default_theta)))
    scaling = params or dict(config.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise PackageError(f"rope scaling {kind!r} is not supported yet (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise PackageError(f"config.json rope scaling {kind!r} lacks {missing}; the checkpoint is incomplete")
    return theta, {"rope_type": kind, **{k: float(scaling[k]) for k in keys}}


def hf_spec(architecture: str, config: dict[str, Any], default_theta: float = 10000.0, **flags: Any) -> ModelSpec:
    """Map a Hugging Face `config.json` onto a ModelSpec; `flags` set the family's fields."""
    def g(key):
        return require(config, key, "config.json")

    if config.get("mlp_bias"):
        raise PackageError(f"{architecture} with mlp_bias=true is not supported yet")
    heads = int(g("num_attention_heads"))
    hidden = int(g("hidden_size"))
    theta, scaling = hf_rope(config, default_theta)
    return ModelSpec(
        architecture=architecture,
        vocab_size=int(g("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(g("intermediate_size")),
        num_layers=int(g("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        context_length=int(config.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        **flags,
    )


def identity_tensor(name: str, w: Any, spec: ModelSpec) -> Any:
    """GGUF layout = canonical layout (families llama.cpp runs with NEOX rope: no Q/K permutation)."""
    return w
