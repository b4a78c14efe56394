"""Quantization: bit-exact packing against the consumers (onnxruntime, gguf-py), round trips,
GPTQ, recipes and bad input, and quantized tiny-model packages."""
from __future__ import annotations

import json

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from conftest import build_tiny_llama
from onnx import TensorProto, helper, numpy_helper

import edgerun
from edgerun.export.calibrate import _llama_sequential, rms_norm, select_promotions, tensor_sensitivity
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.package import write_package
from edgerun.export.pipeline import ExportOptions, export
from edgerun.export.quantize import plan, quantize_checkpoint
from edgerun.quant import Recipe, get_format, gptq_quantize, load_recipe
from edgerun.quant.pack_gguf import gguf_types_for, pack_gguf
from edgerun.quant.pack_ort import pack_matmulnbits
from edgerun.runtime.manifest import read_manifest

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights with outliers, a zero block and a constant block (edge cases of scales)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 20
    w[0, :32] = 0.0
    w[1, :32] = 0.125
    return w


def _layer_inputs(n: int, k: int, seed: int = 1) -> np.ndarray:
    """Correlated activations, as real layer inputs are (GPTQ gains nothing on white noise)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) * 0.2).astype(np.float32)


def _gptq(fmt, w: np.ndarray) -> object:
    x = _layer_inputs(4 * w.shape[1], w.shape[1])
    return gptq_quantize(w, (x.T @ x).astype(np.float64) / len(x), fmt, act_order=True)


# -- GGUF blocks: our bytes, dequantized by gguf-py, equal our own dequantization --------------------
GGUF_CASES = [("int8_block", 32, "Q8_0"), ("int4_sym", 32, "Q4_0"), ("int4_min", 32, "Q4_1"),
              ("ternary", 256, "TQ1_0"), ("ternary", 256, "TQ2_0")]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name,block,ggml_type", GGUF_CASES, ids=[c[2] for c in GGUF_CASES])
def test_gguf_packing_is_bit_exact(name, block, ggml_type, method):
    fmt = get_format(name, block)
    w = _weights(24, 512)
    qt = fmt.quantize(w) if method == "rtn" else _gptq(fmt, w)
    assert ggml_type in gguf_types_for(qt)
    qtype, data = pack_gguf(qt, ggml_type)
    assert data.shape == (24, gguf.quants.quant_shape_to_byte_shape((24, 512), qtype)[1])
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qtype), qt.dequantize())


@pytest.mark.parametrize("name,ggml_type", [("int8_block", "Q8_0"), ("int4_sym", "Q4_0"), ("int4_min", "Q4_1")])
def test_round_to_nearest_bytes_equal_ggml_reference(name, ggml_type):
    """Our numerics are ggml's: RTN bytes equal gguf.quants.quantize's."""
    w = _weights(16, 256, seed=3)
    qtype, data = pack_gguf(get_format(name, 32).quantize(w), ggml_type)
    np.testing.assert_array_equal(data, gguf.quants.quantize(w, qtype))


@pytest.mark.parametrize("ggml_type", ["TQ1_0", "TQ2_0"])
def test_ternary_bytes_equal_ggml_reference_on_grid(ggml_type):
    rng = np.random.default_rng(4)
    scale = np.float32(np.float16(0.0371))
    w = (rng.integers(-1, 2, (8, 512)) * scale).astype(np.float32)
    w[:, ::256] = scale  # ggml's TQ quantizer scales by absmax: give every block a +-1
    qtype, data = pack_gguf(get_format("ternary", 256).quantize(w), ggml_type)
    np.testing.assert_array_equal(data, gguf.quants.quantize(w, qtype))


# -- ORT MatMulNBits / GatherBlockQuantized: onnxruntime's dequantization equals ours ----------------
def _session(nodes, inputs, inits):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_dequantize(packed, accuracy_level: int = 0) -> np.ndarray:
    """W [N, K] as onnxruntime sees it: a one-node MatMulNBits graph applied to the identity."""
    inits = [numpy_helper.from_array(packed.qweight, "B"), numpy_helper.from_array(packed.scales, "S")]
    names = ["A", "B", "S"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, "Z"))
        names.append("Z")
    node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", **packed.attributes(accuracy_level))
    session = _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, packed.K])], inits)
    return session.run(None, {"A": np.eye(packed.K, dtype=np.float32)})[0].T


ORT_CASES = [("int8_block", 32, 512), ("int8_channel", 0, 200), ("int4_sym", 32, 512), ("int4_sym", 128, 200),
             ("int4_asym", 64, 512), ("int4_asym", 16, 72), ("ternary", 64, 512), ("ternary", 0, 200),
             ("int4_asym", 0, 96)]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name,block,k", ORT_CASES, ids=[f"{n}-b{b}-k{k}" for n, b, k in ORT_CASES])
def test_matmulnbits_packing_is_bit_exact(name, block, k, method):
    fmt = get_format(name, block)
    w = _weights(40, k)
    qt = fmt.quantize(w) if method == "rtn" else _gptq(fmt, w)
    packed = pack_matmulnbits(qt)
    assert packed.bits == {8: 8, 4: 4, 2: 2}[fmt.bits] and (packed.zero_points is not None) == (name == "int4_asym")
    np.testing.assert_array_equal(ort_dequantize(packed), qt.dequantize())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_matmulnbits_float_minimum_matches_within_rounding(method):
    """int4_min (Q4_1 numerics) runs as float zero points: (q - (-m/d)) * d vs d * q + m."""
    fmt = get_format("int4_min", 32)
    w = _weights(40, 512)  # row 1 starts with a constant block (scale 0)
    qt = fmt.quantize(w) if method == "rtn" else _gptq(fmt, w)
    packed = pack_matmulnbits(qt)
    assert packed.zero_points.dtype == np.float32 and packed.zero_points.shape == packed.scales.shape
    ours = qt.dequantize()
    np.testing.assert_allclose(ort_dequantize(packed), ours, rtol=1e-6, atol=1e-6 * np.abs(ours).max())
    np.testing.assert_array_equal(ort_dequantize(packed)[1, :32], ours[1, :32])


@pytest.mark.parametrize("name", ["int8_block", "int4_asym", "ternary"])
def test_gather_block_quantized_reads_the_matmulnbits_bytes(name):
    """A tied embedding reads the LM head's packed bytes: rows equal our dequantization."""
    qt = get_format(name, 32).quantize(_weights(50, 128))
    packed = pack_matmulnbits(qt)
    inputs = ["B", "I", "S"] + (["Z"] if packed.zero_points is not None else [])
    inits = [numpy_helper.from_array(packed.qweight, "B"),
             numpy_helper.from_array(packed.scales[..., None], "S")]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.gather_zero_points(), "Z"))
    node = helper.make_node("GatherBlockQuantized", inputs, ["Y"], domain="com.microsoft", gather_axis=0,
                            quantize_axis=2, block_size=packed.block_size, bits=packed.bits)
    rows = np.array([3, 0, 49, 3], dtype=np.int64)
    session = _session([node], [helper.make_tensor_value_info("I", TensorProto.INT64, [None])], inits)
    got = session.run(None, {"I": rows})[0].reshape(len(rows), -1)
    np.testing.assert_array_equal(got, qt.dequantize()[rows])


def test_int4_matmulnbits_int8_compute_stays_close():
    """accuracy_level 4 (int8 activations, the CPU default) is not exact, but close."""
    qt = get_format("int4_asym", 32).quantize(_weights(64, 256))
    w = qt.dequantize()
    got = ort_dequantize(pack_matmulnbits(qt), accuracy_level=4)
    assert np.abs(got - w).max() <= 0.01 * np.abs(w).max()


# -- round trips ---------------------------------------------------------------------------------------
def _grid(name: str, rng) -> np.ndarray:
    """A [16, 128] tensor exactly on `name`'s grid (block 32), each block spanning its full range."""
    s = rng.uniform(0.01, 0.1, (16, 4, 1)).astype(np.float16).astype(np.float32)
    if name in ("int8_block", "int8_channel"):
        q = rng.integers(-127, 128, (16, 4, 32))
        q[..., 0] = 127
        if name == "int8_channel":
            s = np.repeat(s[:, :1], 4, axis=1)
        return (q * s).reshape(16, -1).astype(np.float32)
    if name == "int4_sym":
        q = rng.integers(-7, 8, (16, 4, 32))
        q[..., 5] = -8
        return (q * s).reshape(16, -1).astype(np.float32)
    if name == "int4_asym":
        q, zero = rng.integers(0, 16, (16, 4, 32)), rng.integers(1, 15, (16, 4, 1))
        q[..., 0], q[..., 1] = 0, 15
        return ((q - zero) * s).reshape(16, -1).astype(np.float32)
    if name == "int4_min":
        q = rng.integers(0, 16, (16, 4, 32))
        q[..., 0], q[..., 1] = 0, 15
        m = (-s * rng.integers(1, 15, s.shape)).astype(np.float16).astype(np.float32)
        return (s * q + m).reshape(16, -1).astype(np.float32)
    assert name == "ternary"
    q = rng.integers(-1, 2, (16, 4, 32))
    q[..., 0] = 1
    return (q * s).reshape(16, -1).astype(np.float32)


@pytest.mark.parametrize("name", ["int8_block", "int8_channel", "int4_sym", "int4_asym", "int4_min", "ternary"])
def test_tensor_on_the_grid_requantizes_to_itself(name):
    fmt = get_format(name, 0 if name == "int8_channel" else 32)
    w = _grid(name, np.random.default_rng(5))
    first = fmt.quantize(w)
    np.testing.assert_array_equal(first.dequantize(), w)
    again = fmt.quantize(first.dequantize())
    np.testing.assert_array_equal(again.codes, first.codes)
    np.testing.assert_array_equal(again.scales, first.scales)


def test_bits_per_weight_counts_codes_scales_and_zero_points():
    w = _weights(8, 128)
    assert get_format("int4_asym", 32).quantize(w).bits_per_weight() == 4 + 16 / 32 + 4 / 32
    assert get_format("int8_channel").quantize(w).bits_per_weight() == 8 + 32 / 128
    assert get_format("ternary", 64).quantize(w).bits_per_weight() == 2 + 16 / 64


def test_ternary_scale_is_least_squares_and_recovers_ternary_blocks():
    rng = np.random.default_rng(6)
    scale = np.float32(0.123456789)  # not a float16 value: needs float32 scales to come back exactly
    w = (rng.integers(-1, 2, (8, 64)) * scale).astype(np.float32)
    w[:, 0] = -scale
    qt = get_format("ternary", 32, "float32").quantize(w)
    np.testing.assert_array_equal(qt.dequantize(), w)
    assert set(np.unique(qt.codes)) <= {-1, 0, 1}


def test_ternary_checkpoint_round_trips_losslessly(tmp_path):
    """A model whose linear weights are ternary (x a per-tensor scale) exports without loss."""
    ckpt = load_checkpoint(build_tiny_llama(tmp_path / "hf", seed=7))
    rng = np.random.default_rng(7)
    for name, w in list(ckpt.weights.items()):
        if name.startswith("layers.") and w.ndim == 2:
            ckpt.weights[name] = (rng.integers(-1, 2, w.shape) * np.float32(rng.uniform(0.01, 0.1))).astype(np.float32)
    recipe = load_recipe({"name": "bitnet",
                          "default": {"format": "ternary", "block_size": 32, "scale_dtype": "float32"},
                          "rules": [{"pattern": "embed", "format": "float32"},
                                    {"pattern": "lm_head", "format": "float32"}]})
    quantized = quantize_checkpoint(ckpt, recipe)
    assert len(quantized) == 7 * ckpt.spec.num_layers
    for name, qt in quantized.items():
        np.testing.assert_array_equal(qt.dequantize(), ckpt.weights[name], err_msg=name)
    write_package(ckpt, tmp_path / "float")
    export(ckpt, tmp_path / "ternary", ExportOptions(quant=recipe, accuracy_level=1))
    ours = edgerun.Engine(tmp_path / "ternary").logits(TOKENS)
    np.testing.assert_allclose(ours, edgerun.Engine(tmp_path / "float").logits(TOKENS), atol=1e-5, rtol=0)


# -- GPTQ ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("name", ["int4_asym", "int4_sym", "ternary"])
def test_gptq_beats_round_to_nearest_on_layer_output(name, act_order):
    fmt = get_format(name, 32)
    w = _weights(48, 128)
    x = _layer_inputs(512, 128)
    h = (x.T @ x).astype(np.float64) / len(x)
    rtn = fmt.quantize(w)
    ours = gptq_quantize(w, h, fmt, act_order=act_order)
    assert ours.method == "gptq" and ours.codes.shape == rtn.codes.shape
    err = lambda qt: np.linalg.norm(x @ (qt.dequantize() - w).T)  # noqa: E731
    # ternary: the rounding error is large next to the weights, so GPTQ's second-order step buys less
    assert err(ours) < (0.95 if name == "ternary" else 0.8) * err(rtn)


def test_gptq_rejects_mismatched_hessian():
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(_weights(8, 64), np.eye(32), get_format("int4_asym", 32))


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_formats_and_tensors_are_clear_errors():
    with pytest.raises(ValueError, match="unknown quantization format 'int3'.*int4_asym"):
        get_format("int3")
    with pytest.raises(ValueError, match="does not support block size 48"):
        get_format("int4_sym", 48)
    with pytest.raises(ValueError, match="does not support block size 32.*per channel"):
        get_format("int8_channel", 32)
    with pytest.raises(ValueError, match="scale dtype 'bfloat16'"):
        get_format("int4_sym", 32, "bfloat16")
    with pytest.raises(ValueError,
                       match=r"block size 128 .* exceeds the row length 64; use a block size of 16, 32, 64"):
        get_format("int4_sym", 128).quantize(np.ones((4, 64), np.float32), "layers.0.q")
    with pytest.raises(ValueError, match="only 2-D"):
        get_format("int4_sym").quantize(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        get_format("int4_sym").quantize(np.full((2, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="overflows float16"):
        get_format("int8_block").quantize(np.full((2, 32), 1e8, np.float32))


def test_packers_reject_what_their_layout_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 32 elements"):
        pack_gguf(get_format("int8_block", 32).quantize(_weights(4, 48)), "Q8_0")
    with pytest.raises(ValueError, match="Q4_0 holds int4_sym"):
        pack_gguf(get_format("int4_sym", 64).quantize(_weights(4, 128)), "Q4_0")
    with pytest.raises(ValueError, match="unsupported GGML type 'Q5_K'"):
        pack_gguf(get_format("int4_sym", 32).quantize(_weights(4, 128)), "Q5_K")
    with pytest.raises(ValueError, match="integer zero points only"):
        pack_matmulnbits(get_format("int4_min", 32).quantize(_weights(4, 128))).gather_zero_points()


NAMES = ["embed", "lm_head"] + [f"layers.{i}.{p}" for i in range(2) for p in ("q", "k", "v", "o", "gate", "up", "down")]


def test_recipes_validate_and_resolve_first_match():
    recipe = Recipe.from_dict({"name": "mixed", "method": "gptq", "default": {"format": "int4_asym"},
                               "rules": [{"pattern": "layers.1.*", "format": "int8_block", "method": "rtn"},
                                         {"pattern": "layers.*.down", "format": "float32"}]})
    chosen = recipe.resolve(NAMES)
    assert chosen["layers.1.down"].format == "int8_block" and chosen["layers.0.down"].format == "float32"
    assert chosen["embed"].format == "int4_asym" and recipe.method_of(chosen["layers.0.q"]) == "gptq"
    assert recipe.method_of(chosen["layers.1.q"]) == "rtn"
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


@pytest.mark.parametrize("data,message", [
    ({"default": {"format": "int3"}}, "unknown quantization format 'int3'"),
    ({"default": {"format": "int4_asym"}, "rules": [{"pattern": "layers.*.qkv", "format": "int8_block"}]},
     r"pattern 'layers.\*.qkv' matches no tensor; quantizable tensors are embed, lm_head, layers.\{0..1\}"),
    ({"default": {"format": "int4_asym"}, "rules": [{"pattern": "embed", "format": "int9"}]}, "rule 0.*'int9'"),
    ({"default": {"format": "int4_asym"}, "rules": [{"format": "int8_block"}]}, "needs a 'pattern'"),
    ({"default": {"format": "int4_asym", "bits": 4}}, r"unknown keys \['bits'\]"),
    ({"default": {"format": "int4_asym"}, "calibrate": {}}, r"unknown keys \['calibrate'\]"),
    ({"default": {"format": "int4_asym"}, "method": "awq"}, "method 'awq' is unknown"),
    ({"rules": []}, "needs a \"default\" rule"),
    ({"default": {"format": "float32", "block_size": 32}}, "float32 takes no block_size"),
    ({"default": {"format": "int4_asym"}, "calibration": {"sequences": 0}}, "sequences >= 1"),
])
def test_bad_recipes_are_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        Recipe.from_dict(data).resolve(NAMES)


def test_recipe_files_and_presets(tmp_path):
    (tmp_path / "r.toml").write_text('method = "rtn"\n[default]\nformat = "int4_sym"\nblock_size = 64\n')
    assert load_recipe(tmp_path / "r.toml").default.block_size == 64
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="neither a preset .*int4-gptq"):
        load_recipe("int5")
    for preset in ("int8", "int4", "int4-gptq", "ternary"):
        load_recipe(preset).resolve(NAMES)
    int4 = load_recipe("int4").resolve(NAMES)  # v and the last layer ({last}) stay at 8 bits
    assert [int4[n].format for n in ("layers.0.q", "layers.0.v", "layers.1.q", "embed")] == \
        ["int4_asym", "int8_block", "int8_block", "int8_block"]


# -- packages -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant")
    hf = build_tiny_llama(folder / "hf", seed=11)
    export(hf, folder / "float")
    return hf, folder, edgerun.Engine(folder / "float").logits(TOKENS)


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    p, q = log_softmax(ref_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def test_int8_package_runs_close_to_float(tiny):
    hf, folder, ref = tiny
    manifest = export(hf, folder / "int8", ExportOptions(quant="int8"))
    engine = edgerun.Engine(folder / "int8")
    logits = engine.logits(TOKENS)
    assert _kl(ref, logits) < 1e-3 and np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
    assert manifest.weights["attention"] == "int8_block(b16)" and manifest.weights["lm_head"] == "tied"
    assert manifest.weights["embedding"] == "int8_block(b32)"
    info = read_manifest(folder / "int8").quantization
    assert info["accuracy_level"] == 4 and info["layout"] == "MatMulNBits" and info["shared_embedding_head"]
    assert info["tensors"]["layers.3.down"] == "int8_block(b16)[rtn]" and info["recipe"]["name"] == "int8"
    text = "".join(r.text for r in engine.generate(TOKENS[:4], max_new_tokens=4))
    assert isinstance(text, str)


def test_mixed_recipe_separate_qkv_untied_and_staged(tmp_path):
    """q/k/v in different formats run as three projections; float zero points (int4_min);
    untied float head; two stages."""
    hf = build_tiny_llama(tmp_path / "hf", seed=12, tie=False)
    export(hf, tmp_path / "float")
    recipe = {"name": "mixed", "default": {"format": "int8_block"},
              "rules": [{"pattern": "layers.*.k", "format": "int4_asym", "block_size": 16},
                        {"pattern": "layers.*.gate", "format": "int4_min"},
                        {"pattern": "lm_head", "format": "float32"},
                        {"pattern": "embed", "format": "int8_channel"}]}
    manifest = export(hf, tmp_path / "mixed", ExportOptions(quant=recipe, stage_boundaries=(2,)))
    assert manifest.weights["attention"] == "int4_asym(b16)+int8_block(b32)"
    assert manifest.weights["lm_head"] == "float32"
    assert manifest.weights["mlp"] == "int4_min(b32)+int8_block(b32)"
    assert manifest.weights["embedding"] == "int8_channel(channel)"
    ref = edgerun.Engine(tmp_path / "float").logits(TOKENS)
    assert _kl(ref, edgerun.Engine(tmp_path / "mixed").logits(TOKENS)) < 5e-3


def test_gptq_package_from_calibration_text(tiny):
    hf, folder, ref = tiny
    recipe = dict(load_recipe("int4-gptq").to_dict(), calibration={"sequences": 4, "tokens": 64})
    manifest = export(hf, folder / "gptq", ExportOptions(quant=recipe))
    assert manifest.quantization["tensors"]["layers.0.q"] == "int4_asym(b32)[gptq]"
    assert manifest.quantization["tensors"]["embed"] == "int8_block(b32)[rtn]"
    assert _kl(ref, edgerun.Engine(folder / "gptq").logits(TOKENS)) < 0.05


def test_promotion_picks_by_damage_per_byte_within_the_budget():
    scores = {"a": 4.0, "b": 3.0, "c": 1.0, "d": 0.0, "e": 0.5}
    extra = {"a": 4.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 2.0}
    # per byte: b 3, c 1, a 1 (ties keep the scores' order: a before c), e 0.25, d 0
    assert select_promotions(scores, extra, budget=6.0) == ["b", "a", "c"]
    assert select_promotions(scores, extra, budget=3.0) == ["b", "c"]  # a does not fit; c still does
    assert select_promotions(scores, extra, budget=100.0) == ["b", "a", "c", "e"]  # never a tensor scoring 0
    assert select_promotions(scores, extra, budget=0.0) == []


def test_sensitivity_scan_is_the_kl_of_rounding_one_tensor(tiny):
    hf, _, _ = tiny
    ckpt = load_checkpoint(hf)
    tokens = np.array([TOKENS[:8], TOKENS[3:11]])
    int4, int8 = get_format("int4_asym", 32), get_format("int8_block", 32)
    names = ["layers.0.q", "layers.1.down", "layers.3.o"]
    coarse = tensor_sensitivity(ckpt.spec, ckpt.weights, tokens, dict.fromkeys(names, int4))
    fine = tensor_sensitivity(ckpt.spec, ckpt.weights, tokens, dict.fromkeys(names, int8))
    assert set(coarse) == set(names) and all(coarse[n] > 5 * fine[n] > 0 for n in names)
    # the scan's value for one tensor equals a full forward with only that tensor rounded
    rounded = dict(ckpt.weights, **{"layers.1.down": int4.quantize(ckpt.weights["layers.1.down"]).dequantize()})

    def log_probs(weights):
        x = _llama_sequential(ckpt.spec, weights, tokens, lambda *a: None, weights["embed"], False, False)
        z = (rms_norm(x, weights["final_norm"], ckpt.spec.rms_norm_eps) @ weights["embed"].T).astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return (z - np.log(np.exp(z).sum(-1, keepdims=True))).reshape(-1, z.shape[-1])

    p, q = log_probs(ckpt.weights), log_probs(rounded)
    assert coarse["layers.1.down"] == pytest.approx(float((np.exp(p) * (p - q)).sum(-1).mean()), rel=1e-3)


def test_gptq_preset_promotes_the_most_sensitive_tensors_within_its_budget(tiny):
    hf, _, _ = tiny
    ckpt = load_checkpoint(hf)
    base = dict(load_recipe("int4-gptq").to_dict(), calibration={"sequences": 4, "tokens": 64})
    assert base["promote"] == {"format": "int8_block", "block_size": 32, "budget": 0.10, "windows": 4}
    assert load_recipe("int4").promote is None  # RTN int4 keeps its fixed rules
    formats, _, _ = plan(ckpt, Recipe.from_dict(base))
    size = {n: f.storage_bytes(tuple(ckpt.weights["embed" if n == "lm_head" else n].shape))
            for n, f in formats.items() if f is not None}
    total = sum(v for n, v in size.items() if n != "lm_head")  # tied: one shared copy
    sizes = []
    for budget in (0.0, 0.10, 0.3):
        recipe = Recipe.from_dict(dict(base, promote=dict(base["promote"], budget=budget)))
        assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
        done = quantize_checkpoint(ckpt, recipe)
        promoted = [n for n, qt in done.items() if qt.fmt.bits == 8 and formats[n].bits == 4]
        extra = sum(done[n].fmt.storage_bytes(done[n].shape) - size[n] for n in promoted)
        assert extra <= budget * total and all(done[n].method == "gptq" for n in promoted)
        assert bool(promoted) == (budget > 0)
        sizes.append(extra)
    assert sizes[0] == 0 < sizes[1] < sizes[2]
    with pytest.raises(ValueError, match="budget must be a fraction"):
        Recipe.from_dict(dict(base, promote={"budget": 1.5}))
    with pytest.raises(ValueError, match=r"promote: unknown keys \['bits'\]"):
        Recipe.from_dict(dict(base, promote={"bits": 8}))


def test_bad_recipe_fails_before_anything_is_written(tiny, tmp_path):
    hf, _, _ = tiny
    with pytest.raises(ValueError, match=r"embed \(320, 64\): block size 128 .* exceeds the row length 64"):
        export(hf, tmp_path / "out", ExportOptions(quant={"default": {"format": "int4_sym", "block_size": 128}}))
    with pytest.raises(ValueError, match=r"layers.0.q \(64, 64\): block size 128"):
        export(hf, tmp_path / "out", ExportOptions(quant={"default": {"format": "int4_sym", "block_size": 128},
                                                          "rules": [{"pattern": "embed", "format": "float32"},
                                                                    {"pattern": "lm_head", "format": "float32"}]}))
    with pytest.raises(ValueError, match="embedding cannot be int4_min.*integer zero points"):
        export(hf, tmp_path / "out", ExportOptions(quant={"default": {"format": "int4_min"}}))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("healed", [False, True], ids=["plain", "healed-cuts"])
def test_calibration_forward_matches_the_package(tiny, tmp_path, healed):
    hf, _, ref = tiny
    ckpt = load_checkpoint(hf)
    if healed:  # GPTQ after --heal must see the activations the graphs compute, cut corrections included
        rng = np.random.default_rng(4)
        h = ckpt.spec.hidden_size
        for at in (2, ckpt.spec.num_layers):
            ckpt.weights[f"cut.{at}.weight"] = (np.eye(h) + 0.05 * rng.standard_normal((h, h))).astype(np.float32)
            ckpt.weights[f"cut.{at}.bias"] = (0.05 * rng.standard_normal(h)).astype(np.float32)
        write_package(ckpt, tmp_path / "healed")
        ref = edgerun.Engine(tmp_path / "healed").logits(TOKENS)
    hidden = _llama_sequential(ckpt.spec, ckpt.weights, np.array([TOKENS]), lambda *a: None,
                               ckpt.weights["embed"], False, False)
    logits = rms_norm(hidden[0], ckpt.weights["final_norm"], ckpt.spec.rms_norm_eps) @ ckpt.weights["embed"].T
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)


def test_eval_reports_perplexity_kl_and_bits(tiny, tmp_path):
    from edgerun.bench.eval import main

    hf, folder, _ = tiny
    if not (folder / "int8").exists():
        export(hf, folder / "int8", ExportOptions(quant="int8"))
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "eval.json"
    assert main([str(folder / "int8"), str(folder / "float"), "--reference", str(folder / "float"),
                 "--windows", "2", "--window-tokens", "24", "--text", str(tmp_path / "text.txt"),
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["protocol"]["scored_positions"] == 2 * 23
    ref, int8, same = report["reference"], *report["results"]
    assert ref["bits_per_weight"] == pytest.approx(32) and same["kl"] == pytest.approx(0, abs=1e-6)
    assert same["top1"] == 1.0 and same["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert int8["linear_bits_per_weight"] == pytest.approx(10) and int8["size_mb"] < ref["size_mb"] / 2
    assert int8["kl"] < 0.01 and np.isfinite(int8["perplexity"])


@pytest.mark.slow
def test_int8_smollm2_perplexity_within_half_a_percent(smollm2_gguf, smollm2_package, tmp_path):
    from edgerun.bench.eval import evaluate

    export(smollm2_gguf, tmp_path / "int8", ExportOptions(quant="int8"))
    report = evaluate([str(tmp_path / "int8")], reference=str(smollm2_package), windows=4)
    ref, (int8,) = report["reference"], report["results"]
    assert int8["perplexity"] < ref["perplexity"] * 1.005 and int8["top1"] > 0.9
    assert int8["size_mb"] < ref["size_mb"] / 3
