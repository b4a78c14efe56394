"""Build onnxruntime decoder graphs for a run of layers, directly with `onnx.helper`.

Each stage graph uses onnxruntime's fused contrib ops: `GroupQueryAttention` (rotary inside,
KV written in place into a shared past/present buffer of length `max_len`),
`SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` (RMSNorm fused with the
residual add). The runtime binds `past_*` and `present_*` to the same buffer, so a step
writes only the new K/V rows and a rollback is just a smaller `seqlens_k` next step.

Linear weights given in `packed` (ORT MatMulNBits layout, see `edgerun.quant.pack_ort`) become
`MatMulNBits` nodes; a packed embedding becomes `GatherBlockQuantized` over the same bytes, so a
tied LM head in the same format costs no second copy.

Stage I/O (B batch, S new tokens, N scored positions):
  in:  input_ids int64 [B,S] | hidden_in float [B,S,H]; seqlens_k int32 [B] (index of the
       last new token per row); total_sequence_length int32 []; past_key_<i>/past_value_<i>
       float [B, kv_heads, max_len, head_dim]; logits_positions int64 [B,N,1] (head only)
  out: logits float [B,N,V] | hidden_out float [B,S,H]; present_key_<i>/present_value_<i>
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..quant.pack_ort import MatMulNBitsWeight, can_concat, concat_rows
from ..runtime.manifest import ModelSpec

OPSET = 21
MS_DOMAIN = "com.microsoft"


def inverse_frequencies(spec: ModelSpec) -> np.ndarray:
    """RoPE inverse frequencies [head_dim/2], with the spec's rope scaling applied.

    Raises:
        ValueError: a rope scaling type the graphs do not implement.
    """
    inv_freq = 1.0 / spec.rope_theta ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    scaling = spec.rope_scaling or {"rope_type": "default"}
    kind = scaling.get("rope_type")
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not implemented (have: default, llama3)")
    # Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * np.pi / inv_freq
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(medium, blended, scaled)


def rotary_cache(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [context_length, head_dim/2] for rotate-half RoPE."""
    inv_freq = inverse_frequencies(spec)
    angles = np.outer(np.arange(spec.context_length, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class _Graph:
    """Accumulates nodes and initializers; names every intermediate uniquely."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    count: int = 0
    names: set = field(default_factory=set)
    packed: Mapping[str, MatMulNBitsWeight] = field(default_factory=dict)  # quantized linear weights
    accuracy_level: int = 0  # MatMulNBits compute precision
    pad_attention: bool = False  # attention rows picked by an input (see build_stage)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        self.count += 1
        outs = [f"{op_type}_{self.count}_{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.count}",
                                           domain=domain, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self.names:  # shared initializers (tied embedding / head) are added once
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            self.names.add(name)
        return name

    def nbits(self, x: str, name: str, w: MatMulNBitsWeight) -> str:
        """MatMulNBits of activations `x` [..., K] with packed weight `w` stored under `name.*`."""
        inputs = [x, self.const(f"{name}.qweight", w.qweight), self.const(f"{name}.scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(self.const(f"{name}.zero_points", w.zero_points))
        return self.op("MatMulNBits", inputs, domain=MS_DOMAIN, **w.attributes(self.accuracy_level))[0]


def _linear(g: _Graph, x: str, weights: dict[str, np.ndarray], name: str) -> str:
    if name in g.packed:
        return g.nbits(x, name, g.packed[name])
    # weights are [out, in]; MatMul wants [in, out]
    return g.op("MatMul", [x, g.const(name, weights[name].T)])[0]


def _qkv_inputs(g: _Graph, h: str, w: dict[str, np.ndarray], p: str) -> list[str]:
    """GroupQueryAttention's query/key/value inputs: one packed projection where the three share
    a layout, else three separate ones (mixed formats)."""
    names = [p + "q", p + "k", p + "v"]
    quantized = [n in g.packed for n in names]
    if all(quantized) and can_concat([g.packed[n] for n in names]):
        return [g.nbits(h, p + "qkv", concat_rows([g.packed[n] for n in names])), "", ""]
    if not any(quantized):
        qkv_w = np.concatenate([w[n] for n in names], axis=0)
        return [g.op("MatMul", [h, g.const(p + "qkv", qkv_w.T)])[0], "", ""]
    return [_linear(g, h, w, n) for n in names]


def _attention_inputs(g: _Graph, spec: ModelSpec, h: str, w: dict[str, np.ndarray], p: str) -> list[str]:
    """GroupQueryAttention's query/key/value inputs, with what the spec adds after the projections:
    q/k/v biases (GQA takes none) and per-head q/k RMSNorm (before GQA's rotary, as in transformers)."""
    qkv = _qkv_inputs(g, h, w, p)
    if spec.attention_bias:
        if qkv[1] == "":  # one packed projection: one packed bias
            bias = np.concatenate([w[p + "q_bias"], w[p + "k_bias"], w[p + "v_bias"]])
            qkv = [g.op("Add", [qkv[0], g.const(p + "qkv_bias", bias)])[0], "", ""]
        else:
            qkv = [g.op("Add", [x, g.const(p + n, w[p + n])])[0] for x, n in zip(qkv, ("q_bias", "k_bias", "v_bias"))]
    if spec.qk_norm:
        if qkv[1] == "":
            q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            sizes = g.const("qkv_split", np.array([q_size, kv_size, kv_size], dtype=np.int64))
            qkv = g.op("Split", [qkv[0], sizes], n_out=3, axis=-1)
        heads = g.const("per_head_shape", np.array([0, 0, -1, spec.head_dim], dtype=np.int64))
        flat = g.const("merged_heads_shape", np.array([0, 0, -1], dtype=np.int64))
        for k, n in ((0, "q_norm"), (1, "k_norm")):
            per_head = g.op("Reshape", [qkv[k], heads])[0]  # [B, S, heads, head_dim]
            normed = g.op("SimplifiedLayerNormalization", [per_head, g.const(p + n, w[p + n])], axis=-1,
                          epsilon=spec.rms_norm_eps, stash_type=1)[0]
            qkv[k] = g.op("Reshape", [normed, flat])[0]
    return qkv


def _gate_up(g: _Graph, h: str, w: dict[str, np.ndarray], p: str) -> tuple[str, str]:
    """The MLP's gate and up projections, as two nodes. One MatMulNBits over both and a Split
    decoded 6-9% slower at batch 1 on SmolLM2 and Qwen2.5 INT4 (README, design notes on export)."""
    return _linear(g, h, w, p + "gate"), _linear(g, h, w, p + "up")


def _embed(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray]) -> str:
    """Token embeddings [B, S, H]: Gather over the float table, or GatherBlockQuantized over the
    MatMulNBits bytes [V, k_blocks, blob] of a packed table (quantize_axis 2)."""
    if "embed" not in g.packed:
        return g.op("Gather", [g.const("embed", weights["embed"]), "input_ids"])[0]
    return _gather_packed(g, spec)


def _embed_scaled(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray]) -> str:
    """Token embeddings times `spec.embed_scale` (Gemma), which cannot be folded into a tied table."""
    x = _embed(g, spec, weights)
    if spec.embed_scale == 1.0:
        return x
    return g.op("Mul", [x, g.const("embed_scale", np.array(spec.embed_scale, dtype=np.float32))])[0]


def _gather_packed(g: _Graph, spec: ModelSpec) -> str:
    w = g.packed["embed"]
    nb = w.qweight.shape[1]
    scales = g.op("Reshape", [g.const("embed.scales", w.scales),
                              g.const("embed.gather_scale_shape", np.array([w.N, nb, 1]))])[0]
    inputs = [g.const("embed.qweight", w.qweight), "input_ids", scales]
    if w.zero_points is not None:
        inputs.append(g.const("embed.gather_zero_points", w.gather_zero_points()))
    blocks = g.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                  block_size=w.block_size, bits=w.bits)[0]
    flat = g.op("Reshape", [blocks, g.const("embed.flat_shape", np.array([0, 0, -1]))])[0]
    if nb * w.block_size == spec.hidden_size:
        return flat
    return g.op("Slice", [flat, g.const("embed.slice_start", np.array([0])),
                          g.const("embed.slice_end", np.array([spec.hidden_size])),
                          g.const("embed.slice_axes", np.array([2]))])[0]


def _head(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], flat: str) -> str:
    """Logits [N, V] of normed hidden states `flat` [N, H]."""
    if "lm_head" in g.packed:
        w = g.packed["lm_head"]
        shared = spec.tie_embeddings and g.packed.get("embed") is w
        return g.nbits(flat, "embed" if shared else "lm_head", w)
    if spec.tie_embeddings:
        # the float table: shared with a float Gather, else its own copy
        table = "embed" if "embed" not in g.packed else "lm_head"
        return g.op("Gemm", [flat, g.const(table, weights["embed"])], transB=1)[0]
    return g.op("Gemm", [flat, g.const("lm_head", weights["lm_head"])], transB=1)[0]


def _rms(g: _Graph, spec: ModelSpec, residual: str, pending: str | None, gamma: str) -> tuple[str, str]:
    """RMSNorm of `residual + pending` (fused when there is a pending add); returns (normed, sum)."""
    if pending is None:
        return g.op("SimplifiedLayerNormalization", [residual, gamma], axis=-1,
                    epsilon=spec.rms_norm_eps, stash_type=1)[0], residual
    out = g.op("SkipSimplifiedLayerNormalization", [pending, residual, gamma], n_out=4,
               domain=MS_DOMAIN, epsilon=spec.rms_norm_eps)
    return out[0], out[3]


def _cut(g: _Graph, w: dict[str, np.ndarray], i: int, residual: str, pending: str | None) -> tuple[str, str | None]:
    """Healing correction of a depth-pruned model before layer i (i = num_layers: before the
    final norm): residual <- residual @ W^T + b. No-op without `cut.<i>.*` weights."""
    if f"cut.{i}.weight" not in w:
        return residual, pending
    if pending is not None:
        residual = g.op("Add", [residual, pending])[0]
    mapped = g.op("MatMul", [residual, g.const(f"cut.{i}.weight", w[f"cut.{i}.weight"].T)])[0]
    return g.op("Add", [mapped, g.const(f"cut.{i}.bias", w[f"cut.{i}.bias"])])[0], None


def _layer(g: _Graph, spec: ModelSpec, w: dict[str, np.ndarray], i: int, local: int,
           residual: str, pending: str | None, outputs: list[str]) -> tuple[str, str]:
    p = f"layers.{i}."
    residual, pending = _cut(g, w, i, residual, pending)
    h, residual = _rms(g, spec, residual, pending, g.const(p + "attn_norm", w[p + "attn_norm"]))
    sliding = i in spec.sliding_layers
    rope = "_local" if sliding and spec.rope_local_theta is not None else ""
    extra = {"local_window_size": spec.sliding_window} if sliding else {}
    if spec.attention_scale is not None:
        extra["scale"] = spec.attention_scale
    qkv = _attention_inputs(g, spec, h, w, p)
    half = spec.kv_dtype == "float16"  # attention and its KV cache in fp16: cast in and out
    if half:
        qkv = [g.op("Cast", [x], to=TensorProto.FLOAT16)[0] if x else x for x in qkv]
    if g.pad_attention:  # the rows the runtime picks: the step's, or with its last one again
        qkv = [g.op("Gather", [x, "attention_rows"], axis=1)[0] if x else x for x in qkv]
    attn = g.op(
        "GroupQueryAttention",
        [*qkv, f"past_key_{local}", f"past_value_{local}", "seqlens_k",
         "total_sequence_length", f"cos_cache{rope}", f"sin_cache{rope}"],
        n_out=3, domain=MS_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
        do_rotary=1, rotary_interleaved=0, **extra)
    if g.pad_attention:  # the step's own rows
        attn = [g.op("Slice", [attn[0], g.const("pad.zero", np.array([0])), "step_length",
                               g.const("pad.seq_axis", np.array([1]))])[0], attn[1], attn[2]]
    if half:
        attn = [g.op("Cast", [attn[0]], to=TensorProto.FLOAT)[0], attn[1], attn[2]]
    g.nodes.append(helper.make_node("Identity", [attn[1]], [f"present_key_{local}"]))
    g.nodes.append(helper.make_node("Identity", [attn[2]], [f"present_value_{local}"]))
    outputs += [f"present_key_{local}", f"present_value_{local}"]
    a = _post_norm(g, spec, w, p + "post_attn_norm", _linear(g, attn[0], w, p + "o"))
    h, residual = _rms(g, spec, residual, a, g.const(p + "ffn_norm", w[p + "ffn_norm"]))
    gate, up = _gate_up(g, h, w, p)
    if spec.activation == "gelu_tanh":
        act = g.op("Gelu", [gate], approximate="tanh")[0]
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]
    return residual, _post_norm(g, spec, w, p + "post_ffn_norm", _linear(g, g.op("Mul", [act, up])[0], w, p + "down"))


def _post_norm(g: _Graph, spec: ModelSpec, w: dict[str, np.ndarray], name: str, x: str) -> str:
    """RMSNorm of a block's attention or MLP output before the residual add (spec.post_norms, Gemma)."""
    if not spec.post_norms:
        return x
    return g.op("SimplifiedLayerNormalization", [x, g.const(name, w[name])], axis=-1,
                epsilon=spec.rms_norm_eps, stash_type=1)[0]


def build_stage(spec: ModelSpec, weights: dict[str, np.ndarray], first_layer: int, end_layer: int,
                embeds: bool, has_head: bool, packed: Mapping[str, MatMulNBitsWeight] | None = None,
                accuracy_level: int = 0, pad_attention: bool = False) -> onnx.ModelProto:
    """Build the graph for layers [first_layer, end_layer), optionally with embedding / head.

    Args:
        spec: model hyper-parameters.
        weights: canonical float32 weights ([out, in] matrices).
        first_layer, end_layer: the layers this stage runs (end exclusive).
        embeds: take `input_ids` and embed them (else take `hidden_in`).
        has_head: end with final norm + LM head and return logits (else `hidden_out`).
        packed: canonical weight name -> MatMulNBits layout for the quantized ones (the same
            object under "embed" and "lm_head" shares one copy).
        accuracy_level: MatMulNBits compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).
        pad_attention: take an input `attention_rows` int64 [R]: the rows of the step that
            GroupQueryAttention gets (R = S: all of them; R = S + 1: the last one again, when the
            runtime also feeds seqlens_k and total_sequence_length one higher; its key/value land
            one position past the step, where the next step overwrites them, and its output row
            is dropped). onnxruntime's CPU attention computes a one-token step with other
            kernels than a step of several, whose rows agree bit for bit: with the copy every
            step takes the several-token path, so where every linear layer is a MatMulNBits at
            accuracy level 4 (rows independent of their number) a step's logits do not depend
            on how many tokens it carries. The KV buffers then need one slot more.
    Returns:
        The ONNX model (initializers inline; the writer moves them to external data).
    """
    pad_attention = pad_attention and end_layer > first_layer  # a head-only stage has no attention
    g = _Graph(packed=packed or {}, accuracy_level=accuracy_level, pad_attention=pad_attention)
    f32, kv_shape = TensorProto.FLOAT, ["batch", spec.num_kv_heads, "max_len", spec.head_dim]
    kv_type = TensorProto.FLOAT16 if spec.kv_dtype == "float16" else f32
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]) if embeds
        else helper.make_tensor_value_info("hidden_in", f32, ["batch", "seq", spec.hidden_size]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    if end_layer > first_layer:  # a head-only stage has no attention
        rope_dtype = np.dtype(spec.kv_dtype)  # GroupQueryAttention takes its tables in the KV type
        cos, sin = rotary_cache(spec)
        g.const("cos_cache", cos.astype(rope_dtype))
        g.const("sin_cache", sin.astype(rope_dtype))
        if spec.rope_local_theta is not None and set(spec.sliding_layers) & set(range(first_layer, end_layer)):
            cos, sin = rotary_cache(dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_scaling=None))
            g.const("cos_cache_local", cos.astype(rope_dtype))
            g.const("sin_cache_local", sin.astype(rope_dtype))
    if pad_attention:
        inputs.append(helper.make_tensor_value_info("attention_rows", TensorProto.INT64, ["attention_rows"]))
        g.nodes.append(helper.make_node("Shape", [inputs[0].name], ["step_length"], start=1, end=2))
    if embeds:
        residual = _embed_scaled(g, spec, weights)
    else:
        residual = "hidden_in"
    pending, present = None, []
    for local, i in enumerate(range(first_layer, end_layer)):
        inputs += [helper.make_tensor_value_info(f"past_{kind}_{local}", kv_type, kv_shape)
                   for kind in ("key", "value")]
        residual, pending = _layer(g, spec, weights, i, local, residual, pending, present)
    if has_head:
        inputs.append(helper.make_tensor_value_info("logits_positions", TensorProto.INT64,
                                                    ["batch", "num_logits", 1]))
        residual, pending = _cut(g, weights, spec.num_layers, residual, pending)
        normed, _ = _rms(g, spec, residual, pending, g.const("final_norm", weights["final_norm"]))
        picked = g.op("GatherND", [normed, "logits_positions"], batch_dims=1)[0]
        flat = g.op("Reshape", [picked, g.const("flat_shape", np.array([-1, spec.hidden_size]))])[0]
        scores = _head(g, spec, weights, flat)
        lead = g.op("Shape", [picked], end=2)[0]
        shape = g.op("Concat", [lead, g.const("vocab_dim", np.array([spec.vocab_size]))], axis=0)[0]
        g.nodes.append(helper.make_node("Reshape", [scores, shape], ["logits"]))
        out = helper.make_tensor_value_info("logits", f32, ["batch", "num_logits", spec.vocab_size])
    else:
        final = residual if pending is None else g.op("Add", [residual, pending])[0]
        g.nodes.append(helper.make_node("Identity", [final], ["hidden_out"]))
        out = helper.make_tensor_value_info("hidden_out", f32, ["batch", "seq", spec.hidden_size])
    outputs = [out] + [helper.make_tensor_value_info(n, kv_type, kv_shape) for n in present]
    graph = helper.make_graph(g.nodes, f"edgerun_layers_{first_layer}_{end_layer}", inputs, outputs,
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model
