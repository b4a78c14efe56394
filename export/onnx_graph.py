"""Build onnxruntime decoder graphs for a run of layers, directly with `onnx.helper`.

Each stage graph uses onnxruntime's fused contrib ops: `GroupQueryAttention` (rotary inside,
KV written in place into a shared past/present buffer of length `max_len`),
`SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (RMSNorm fused with the
residual add). The runtime binds `past_*` and `present_*` to the same buffer, so a step
writes only the new K/V rows and a rollback is just a smaller `seqlens_k` next step.

Stage I/O (B batch, S new tokens, N scored positions):
  in:  input_ids int64 [B,S] | hidden_in float [B,S,H]; seqlens_k int32 [B] (index of the
       last new token per row); total_sequence_length int32 []; past_key_<i>/past_value_<i>
       float [B, kv_heads, max_len, head_dim]; logits_positions int64 [B,N,1] (head only)
  out: logits float [B,N,V] | hidden_out float [B,S,H]; present_key_<i>/present_value_<i>
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..runtime.manifest import ModelSpec

OPSET = 21
MS_DOMAIN = "com.microsoft"


def rotary_cache(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [context_length, head_dim/2] for rotate-half RoPE."""
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    angles = np.outer(np.arange(spec.context_length, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class _Graph:
    """Accumulates nodes and initializers; names every intermediate uniquely."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        self.count += 1
        outs = [f"{op_type}_{self.count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.count}",
                                           domain=domain, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def _linear(g: _Graph, x: str, weights: dict[str, np.ndarray], name: str) -> str:
    # weights are [out, in]; MatMul wants [in, out]
    return g.op("MatMul", [x, g.const(name, weights[name].T)])[0]


def _rms(g: _Graph, spec: ModelSpec, residual: str, pending: str | None, gamma: str) -> tuple[str, str]:
    """RMSNorm of `residual + pending` (fused when there is a pending add); returns (normed, sum)."""
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, gamma], axis=-1,
                    epsilon=spec.rms_norm_eps, stash_type=1)[0], residual
    out = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], n_out=4,
               domain=MS_DOMAIN, epsilon=spec.rms_norm_eps)
    return out[0], out[3]


def _layer(g: _Graph, spec: ModelSpec, w: dict[str, np.ndarray], i: int, local: int,
           residual: str, pending: str | None, outputs: list[str]) -> tuple[str, str]:
    p = f"layers.{i}."
    h, residual = _rms(g, spec, residual, pending, g.const(p + "attn_norm", w[p + "attn_norm"]))
    qkv_w = np.concatenate([w[p + "q"], w[p + "k"], w[p + "v"]], axis=0)
    qkv = g.op("MatMul", [h, g.const(p + "qkv", qkv_w.T)])[0]
    attn = g.op(
        "GroupQueryAttention",
        [qkv, "", "", f"past_key_{local}", f"past_value_{local}", "seqlens_k",
         "total_sequence_length", "cos_cache", "sin_cache"],
        n_out=3, domain=MS_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
        do_rotary=1, rotary_interleaved=0)
    g.nodes.append(helper.make_node("Identity", [attn[1]], [f"present_key_{local}"]))
    g.nodes.append(helper.make_node("Identity", [attn[2]], [f"present_value_{local}"]))
    outputs += [f"present_key_{local}", f"present_value_{local}"]
    a = _linear(g, attn[0], w, p + "o")
    h, residual = _rms(g, spec, residual, a, g.const(p + "ffn_norm", w[p + "ffn_norm"]))
    gate = _linear(g, h, w, p + "gate")
    up = _linear(g, h, w, p + "up")
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]
    return residual, _linear(g, g.op("Mul", [silu, up])[0], w, p + "down")


def build_stage(spec: ModelSpec, weights: dict[str, np.ndarray], first_layer: int, end_layer: int,
                embeds: bool, has_head: bool) -> onnx.ModelProto:
    """Build the graph for layers [first_layer, end_layer), optionally with embedding / head.

    Args:
        spec: model hyper-parameters.
        weights: canonical float32 weights ([out, in] matrices).
        first_layer, end_layer: the layers this stage runs (end exclusive).
        embeds: take `input_ids` and embed them (else take `hidden_in`).
        has_head: end with final norm + LM head and return logits (else `hidden_out`).
    Returns:
        The ONNX model (initializers inline; the writer moves them to external data).
    """
    g = _Graph()
    f32, kv_shape = TensorProto.FLOAT, ["batch", spec.num_kv_heads, "max_len", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]) if embeds
        else helper.make_tensor_value_info("hidden_in", f32, ["batch", "seq", spec.hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    cos, sin = rotary_cache(spec)
    g.const("cos_cache", cos)
    g.const("sin_cache", sin)
    head_name = "embed" if spec.tie_embeddings else "lm_head"
    if embeds:
        residual = g.op("Gather", [g.const("embed", weights["embed"]), "input_ids"])[0]
    else:
        residual = "hidden_in"
    pending, present = None, []
    for local, i in enumerate(range(first_layer, end_layer)):
        inputs += [helper.make_tensor_value_info(f"past_{kind}_{local}", f32, kv_shape)
                   for kind in ("key", "value")]
        residual, pending = _layer(g, spec, weights, i, local, residual, pending, present)
    if has_head:
        inputs.append(helper.make_tensor_value_info("logits_positions", TensorProto.INT64,
                                                    ["batch", "num_logits", 1]))
        normed, _ = _rms(g, spec, residual, pending, g.const("final_norm", weights["final_norm"]))
        picked = g.op("GatherND", [normed, "logits_positions"], batch_dims=1)[0]
        flat = g.op("Reshape", [picked, g.const("flat_shape", np.array([-1, spec.hidden_size]))])[0]
        if head_name == "lm_head" or not embeds:
            g.const(head_name, weights[head_name])
        scores = g.op("Gemm", [flat, head_name], transB=1)[0]
        lead = g.op("Shape", [picked], end=2)[0]
        shape = g.op("Concat", [lead, g.const("vocab_dim", np.array([spec.vocab_size]))], axis=0)[0]
        g.nodes.append(helper.make_node("Reshape", [scores, shape], ["logits"]))
        out = helper.make_tensor_value_info("logits", f32, ["batch", "num_logits", spec.vocab_size])
    else:
        final = residual if pending is None else g.op("Add", [residual, pending])[0]
        g.nodes.append(helper.make_node("Identity", [final], ["hidden_out"]))
        out = helper.make_tensor_value_info("hidden_out", f32, ["batch", "seq", spec.hidden_size])
    outputs = [out] + [helper.make_tensor_value_info(n, f32, kv_shape) for n in present]
    graph = helper.make_graph(g.nodes, f"edgerun_layers_{first_layer}_{end_layer}", inputs, outputs,
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model
