"""Calibrated quantization: run calibration text through an fp32 numpy forward of the decoder,
layer by layer, and quantize each linear layer from the inputs it actually sees.

Sequential ("true sequential") order, as GPTQ does: the inputs of every linear layer come from
the model whose earlier layers (and earlier projections of the same layer) are already
quantized, so each layer compensates the error upstream of it.

The forward runs the Llama block (RMSNorm, rotate-half RoPE, GQA attention, SwiGLU MLP) with the
differences the families state as ModelSpec flags: q/k/v biases, per-head q/k norms, scaled
embeddings, post-attention and post-MLP norms, GeGLU, an attention scale, and sliding-window layers
with their own rope base (Qwen2/3, Gemma 3, Phi-3); it is registered by architecture name.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import data
from ..quant.base import QuantFormat, QuantizedTensor
from ..quant.gptq import HessianFactor, gptq_quantize
from ..quant.recipe import Calibration
from ..runtime.manifest import ModelSpec
from .checkpoint import head_weight_name
from .onnx_graph import rotary_cache

log = logging.getLogger(__name__)
LAYER_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def calibration_text(cal: Calibration) -> str:
    """The calibration text: the recipe's own file `cal.data`, else WikiText-2 valid (edgerun.data)."""
    if cal.data:
        path = Path(cal.data)
        if not path.is_file():
            raise ValueError(f"calibration data {path} does not exist; set calibration.data to a text file")
        return path.read_text()
    return data.wikitext("valid")


def calibration_tokens(tokenizer, cal: Calibration) -> np.ndarray:
    """`cal.sequences` non-overlapping windows of `cal.tokens` tokens, drawn with `cal.seed`."""
    ids = np.asarray(tokenizer.encode(calibration_text(cal), add_special_tokens=False).ids)
    windows = len(ids) // cal.tokens
    if windows < cal.sequences:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than {cal.sequences} x {cal.tokens}; "
                         f"lower calibration.sequences or .tokens")
    starts = np.sort(np.random.default_rng(cal.seed).choice(windows, cal.sequences, replace=False)) * cal.tokens
    return np.stack([ids[s:s + cal.tokens] for s in starts])


def rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * gamma).astype(np.float32)


def hessian(x: np.ndarray) -> np.ndarray:
    """X^T X / n over all tokens of activations [..., features], in float64."""
    flat = x.reshape(-1, x.shape[-1])
    return (flat.T @ flat).astype(np.float64) / len(flat)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of x [n, heads, T, D] with tables [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _bmm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched matmul [..., m, k] @ [..., k, n]; torch's when installed, since numpy's stacked
    matmul does not use BLAS (README: design notes on export and quantization)."""
    try:
        import torch
    except ImportError:
        return np.matmul(a, b)
    return (torch.from_numpy(np.ascontiguousarray(a)) @ torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _attention(spec: ModelSpec, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos, sin, window: int = 0
               ) -> np.ndarray:
    """Causal GQA attention of projected q [n,T,Hq*D], k/v [n,T,Hkv*D] -> [n, T, Hq*D]; with a
    `window`, each position sees only the last `window` positions (itself included)."""
    n, t, _ = q.shape
    d, group = spec.head_dim, spec.num_heads // spec.num_kv_heads
    q = _rope(q.reshape(n, t, spec.num_heads, d).transpose(0, 2, 1, 3), cos, sin)
    k = _rope(k.reshape(n, t, spec.num_kv_heads, d).transpose(0, 2, 1, 3), cos, sin)
    v = v.reshape(n, t, spec.num_kv_heads, d).transpose(0, 2, 1, 3)
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    scale = spec.attention_scale if spec.attention_scale is not None else 1 / np.sqrt(d)
    scores = _bmm(q, k.transpose(0, 1, 3, 2)) * np.float32(scale)
    visible = np.tril(np.ones((t, t), dtype=bool))
    if window:
        visible &= ~np.tril(np.ones((t, t), dtype=bool), -window)
    scores = np.where(visible, scores, np.float32(-np.inf))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = (scores / scores.sum(axis=-1, keepdims=True)).astype(np.float32)
    return _bmm(probs, v).transpose(0, 2, 1, 3).reshape(n, t, -1)


# quantize(canonical name, float weight [out, in], lazy Hessian of its input) -> tensor or None (float)
Quantizer = Callable[[str, np.ndarray, Callable[[], np.ndarray]], "QuantizedTensor | None"]


def _llama_sequential(spec: ModelSpec, weights: dict[str, np.ndarray], tokens: np.ndarray,
                      quantize: Quantizer, embed_table: np.ndarray, head: bool, progress: bool,
                      start: int = 0, x: np.ndarray | None = None,
                      record: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Run `tokens` [n, T] through the Llama layers, calling `quantize` for every linear layer in
    execution order with its (already partly quantized) inputs; returns the final hidden states.

    With `start` > 0, `x` is the hidden state [n, T, hidden] entering layer `start` (as `record`
    saw it) and the layers before it are skipped; `record(i, x)` receives the input of every layer."""
    tables = {False: tuple(c[:tokens.shape[1]] for c in rotary_cache(spec))}
    local = dataclasses.replace(spec, rope_theta=spec.rope_local_theta, rope_scaling=None) \
        if spec.rope_local_theta is not None else spec
    tables[True] = tuple(c[:tokens.shape[1]] for c in rotary_cache(local))

    def project(x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """Quantize the projections of input x [n, T, K] (sharing one Hessian) and apply them."""
        cached: list[np.ndarray] = []
        flat = x.reshape(-1, x.shape[-1])

        def get_hessian() -> np.ndarray:
            if not cached:
                cached.append(hessian(flat))
            return cached[0]

        outs = []
        for name in names:
            qt = quantize(name, weights[name], get_hessian)
            w = weights[name] if qt is None else qt.dequantize()
            out = flat @ w.T
            if name + "_bias" in weights:  # q/k/v biases (spec.attention_bias)
                out = out + weights[name + "_bias"]
            outs.append(out.reshape(*x.shape[:-1], -1))
        return outs

    def head_norm(x: np.ndarray, name: str) -> np.ndarray:
        """Per-head RMSNorm of projected q or k [n, T, heads * D] (spec.qk_norm), before rotary."""
        per_head = x.reshape(*x.shape[:-1], -1, spec.head_dim)
        return rms_norm(per_head, weights[name], spec.rms_norm_eps).reshape(x.shape)

    def cut(x: np.ndarray, i: int) -> np.ndarray:
        """A healed cut's correction before layer i (or the final norm), as the graphs apply it."""
        if f"cut.{i}.weight" not in weights:
            return x
        return (x @ weights[f"cut.{i}.weight"].T + weights[f"cut.{i}.bias"]).astype(np.float32)

    def post_norm(x: np.ndarray, name: str) -> np.ndarray:
        return rms_norm(x, weights[name], spec.rms_norm_eps) if spec.post_norms else x

    if x is None:
        if start:
            raise ValueError("starting after layer 0 needs that layer's input x")
        x = embed_table[tokens]
        if spec.embed_scale != 1.0:
            x = (x * np.float32(spec.embed_scale)).astype(np.float32)
    for i in tqdm(range(start, spec.num_layers), desc="calibrate", unit="layer", disable=not progress):
        p = f"layers.{i}."
        if record is not None:
            record(i, x)
        x = cut(x, i)
        h = rms_norm(x, weights[p + "attn_norm"], spec.rms_norm_eps)
        q, k, v = project(h, [p + "q", p + "k", p + "v"])
        if spec.qk_norm:
            q, k = head_norm(q, p + "q_norm"), head_norm(k, p + "k_norm")
        sliding = i in spec.sliding_layers
        context = _attention(spec, q, k, v, *tables[sliding], window=spec.sliding_window if sliding else 0)
        (attn,) = project(context, [p + "o"])
        x = x + post_norm(attn, p + "post_attn_norm")
        h = rms_norm(x, weights[p + "ffn_norm"], spec.rms_norm_eps)
        gate, up = project(h, [p + "gate", p + "up"])
        if spec.activation == "gelu_tanh":
            inner = np.float32(np.sqrt(2 / np.pi)) * (gate + np.float32(0.044715) * gate ** 3)
            act = (np.float32(0.5) * gate * (1 + np.tanh(inner)) * up).astype(np.float32)
        else:
            with np.errstate(over="ignore"):  # exp(-gate) = inf gives silu = -0, as it should
                act = (gate / (1 + np.exp(-gate)) * up).astype(np.float32)
        (down,) = project(act, [p + "down"])
        x = x + post_norm(down, p + "post_ffn_norm")
    x = cut(x, spec.num_layers)
    if head:
        name = head_weight_name(weights)
        normed = rms_norm(x, weights["final_norm"], spec.rms_norm_eps)
        quantize("lm_head", weights[name], lambda: hessian(normed.reshape(-1, normed.shape[-1])))
    return x


# architectures whose blocks _llama_sequential runs (their differences are ModelSpec flags)
SEQUENTIAL = {name: _llama_sequential for name in ("llama", "qwen2", "qwen3", "gemma3", "phi3")}


def quantize_calibrated(spec: ModelSpec, weights: dict[str, np.ndarray], tokens: np.ndarray,
                        formats: dict[str, QuantFormat | None], methods: dict[str, str],
                        cal: Calibration, progress: bool = False) -> dict[str, QuantizedTensor]:
    """Quantize every tensor in `formats`, GPTQ where `methods` says so, RTN elsewhere.

    Args:
        spec, weights: the float model.
        tokens: calibration token windows [n, T].
        formats: canonical name -> format (None keeps it float); includes "embed"/"lm_head".
        methods: canonical name -> "rtn" | "gptq".
        cal: calibration settings (damp, act_order).
    Returns:
        canonical name -> QuantizedTensor for every quantized tensor ("lm_head" of a tied model
        is its own tensor here; the caller decides about sharing).
    """
    try:
        run = SEQUENTIAL[spec.architecture]
    except KeyError:
        raise NotImplementedError(f"calibrated quantization has no forward for architecture {spec.architecture!r} "
                                  f"yet (have: {', '.join(SEQUENTIAL)}); use method rtn") from None
    done: dict[str, QuantizedTensor] = {}
    factored: list[tuple[np.ndarray, HessianFactor]] = []  # the current input's, shared by q/k/v

    def quantize(name: str, weight: np.ndarray, get_hessian) -> QuantizedTensor | None:
        fmt = formats.get(name)
        if fmt is None:
            return None
        if methods.get(name) == "gptq":
            h = get_hessian()
            if not factored or factored[0][0] is not h:
                factored[:] = [(h, HessianFactor.from_hessian(h, cal.damp, cal.act_order))]
            done[name] = gptq_quantize(weight, factored[0][1], fmt, name=name)
        else:
            done[name] = fmt.quantize(weight, name)
        return done[name]

    if formats.get("embed") is not None:
        done["embed"] = formats["embed"].quantize(weights["embed"], "embed")
    table = done["embed"].dequantize() if "embed" in done else weights["embed"]
    head_gptq = formats.get("lm_head") is not None and methods.get("lm_head") == "gptq"
    run(spec, weights, tokens, quantize, table, head_gptq, progress)
    if formats.get("lm_head") is not None and "lm_head" not in done:
        source = weights[head_weight_name(weights)]
        done["lm_head"] = formats["lm_head"].quantize(source, "lm_head")
    return done


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64: the KL of one 8-bit tensor can be below float32's resolution of log-probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def tensor_sensitivity(spec: ModelSpec, weights: dict[str, np.ndarray], tokens: np.ndarray,
                       candidates: dict[str, QuantFormat], positions: int = 256,
                       progress: bool = False) -> dict[str, float]:
    """How much rounding each candidate tensor alone hurts the model, on calibration tokens.

    For every tensor in `candidates` (canonical layer names such as "layers.3.down"), the float
    model is run with only that tensor rounded to nearest in its format, and the result is the mean
    KL divergence KL(float || perturbed) of the next-token distributions. Layer inputs of the float
    model are cached, so a tensor of layer i re-runs layers i.. only; the LM head is evaluated at
    `positions` evenly spaced positions (at most), which keeps large vocabularies cheap.

    Args:
        spec, weights: the float model (weights by canonical name, as `quantize_calibrated` takes).
        tokens: calibration token windows [n, T] (calibration_tokens' first rows).
        candidates: canonical layer tensor name -> the format it would be rounded to.
        positions: how many of the n x T positions the KL is averaged over.
    Returns:
        canonical name -> KL in nats per token (>= 0; 0 when rounding changes nothing).
    """
    try:
        run = SEQUENTIAL[spec.architecture]
    except KeyError:
        raise NotImplementedError(f"the sensitivity scan has no forward for architecture {spec.architecture!r} "
                                  f"(have: {', '.join(SEQUENTIAL)})") from None
    bad = sorted(n for n in candidates if not n.startswith("layers.") or n not in weights)
    if bad:
        raise ValueError(f"sensitivity scan: {bad[:3]} are not linear layers of this model")
    flat = np.linspace(0, tokens.size - 1, min(positions, tokens.size)).round().astype(int)
    head, norm = weights[head_weight_name(weights)], weights["final_norm"]

    def log_probs(hidden: np.ndarray) -> np.ndarray:
        h = hidden.reshape(-1, hidden.shape[-1])[flat]
        return _log_softmax(rms_norm(h, norm, spec.rms_norm_eps) @ head.T)

    def keep_float(name, weight, get_hessian):
        return None

    inputs: dict[int, np.ndarray] = {}
    reference = log_probs(run(spec, weights, tokens, keep_float, weights["embed"], False, False,
                              record=inputs.__setitem__))
    p_ref = np.exp(reference)
    scores = {}
    for name in tqdm(sorted(candidates, key=lambda n: int(n.split(".")[1])), desc="sensitivity", unit="tensor",
                     disable=not progress):
        rounded = candidates[name].quantize(weights[name], name)

        def only(n, weight, get_hessian, name=name, rounded=rounded):
            return rounded if n == name else None

        layer = int(name.split(".")[1])
        out = run(spec, weights, tokens, only, weights["embed"], False, False, start=layer, x=inputs[layer])
        kl = np.sum(p_ref * (reference - log_probs(out)), axis=-1)
        scores[name] = max(float(kl.mean()), 0.0)
    return scores


def select_promotions(scores: dict[str, float], extra_bytes: dict[str, float], budget: float) -> list[str]:
    """The tensors to promote: by decreasing score per extra byte, each taken while the running total
    of extra bytes stays within `budget` (a tensor that does not fit is skipped and smaller ones after
    it may still be taken). Ties keep the order of `scores`. Tensors scoring 0 are never taken.

    Returns:
        the chosen names, best first.
    """
    order = sorted(scores, key=lambda n: -scores[n] / max(extra_bytes[n], 1e-9))
    chosen, spent = [], 0.0
    for name in order:
        if scores[name] > 0 and spent + extra_bytes[name] <= budget:
            chosen.append(name)
            spent += extra_bytes[name]
    return chosen
