"""Quantized GGUF export: our GGML blocks as llama.cpp itself dequantizes them, presets with
fallbacks, ternary round trips, llama.cpp's own quantizer (K-quants), bad input, and the real model.

llama.cpp's dequantizers are called straight from the ggml library that llama-cpp-python ships
(`dequantize_row_<type>`), so "llama.cpp reads our bytes as we meant them" is checked bit for bit.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.cli import main
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.package import write_package
from edgerun.export.pipeline import ExportOptions, export
from edgerun.export.quantize import llama_quant_types, quantize_checkpoint
from edgerun.quant import get_format
from edgerun.quant.pack_gguf import gguf_type_for, pack_gguf
from edgerun.quant.recipe import load_recipe
from edgerun.runtime.manifest import read_manifest

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33, 8, 140, 77]
# every GGUF block type we pack: (format, block, GGML type)
TYPES = [("int8_block", 32, "Q8_0"), ("int4_sym", 32, "Q4_0"), ("int4_min", 32, "Q4_1"),
         ("ternary", 256, "TQ1_0"), ("ternary", 256, "TQ2_0")]


pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib.is_file():
        pytest.skip(f"llama-cpp-python ships no {lib.name} here (built another way); cannot call ggml directly")
    return ctypes.CDLL(str(lib))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("name, block, ggml_type", TYPES, ids=[t[2] for t in TYPES])
def test_llamacpp_dequantizes_our_blocks_exactly(name, block, ggml_type, method):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 1.0, (16, 1))).astype(np.float32)
    fmt = get_format(name, block)
    if method == "gptq":
        from edgerun.quant.gptq import gptq_quantize

        x = rng.standard_normal((256, 512)).astype(np.float32) @ rng.standard_normal((512, 512)).astype(np.float32)
        qt = gptq_quantize(w, (x.T @ x).astype(np.float64) / len(x), fmt)
    else:
        qt = fmt.quantize(w)
    _, data = pack_gguf(qt, ggml_type)
    dequantize = getattr(_ggml_base(), f"dequantize_row_{ggml_type.lower()}")
    dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(data)
    out = np.full(w.shape, np.nan, dtype=np.float32)
    dequantize(data.ctypes.data, out.ctypes.data, w.size)
    np.testing.assert_array_equal(out, qt.dequantize())


# -- tiny models ----------------------------------------------------------------------------------
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two logit arrays (a random tiny model's top-1 is too flat to compare)."""
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("preset", ["int8", "int4", "ternary"])
def test_preset_gguf_holds_exactly_our_quantized_weights_and_runs(tiny256, tmp_path, preset):
    ckpt = load_checkpoint(tiny256)
    manifest = export(ckpt, tmp_path / "q", ExportOptions(formats=("gguf",), quant=preset))
    recipe = load_recipe(preset, target="gguf")
    expected = quantize_checkpoint(ckpt, recipe, target="gguf")
    back = load_checkpoint(tmp_path / "q" / "model.gguf")  # gguf-py dequantizes; Q/K permutation undone
    for name, qt in expected.items():
        key = "embed" if name == "lm_head" and "lm_head" not in back.weights else name
        np.testing.assert_array_equal(back.weights[key], qt.dequantize(), err_msg=name)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q" / "model.gguf").tensors}
    main_type = {"int8": "Q8_0", "int4": "Q4_1", "ternary": "TQ2_0"}[preset]
    assert main_type in types.values()
    assert manifest.quantization["layout"] == "GGUF" and manifest.quantization["recipe"]["name"] == preset
    assert set(manifest.quantization["gguf_types"].values()) <= set(types.values())
    assert main_type in manifest.weights["mlp"]
    # llama.cpp runs the file; its logits follow fp32 ONNX on the same (dequantized) weights
    write_package(back, tmp_path / "float")
    ours = edgerun.Engine(tmp_path / "q", backend="llamacpp", max_context=64).logits(TOKENS)
    reference = edgerun.Engine(tmp_path / "float", max_context=64).logits(TOKENS)
    print(f"\n{preset}: correlation of llama.cpp's logits with fp32 on the same weights {_corr(ours, reference):.5f}")
    assert _corr(ours, reference) > 0.995  # the rest is llama.cpp's int8 activation rounding


def test_ternary_preset_falls_back_where_rows_are_not_256(tiny_narrow, tmp_path):
    """Rows of 64 cannot be TQ2_0: the preset's fallback (Q4_0) takes them, as llama.cpp does."""
    manifest = export(tiny_narrow, tmp_path / "t", ExportOptions(formats=("gguf",), quant="ternary"))
    types = manifest.quantization["gguf_types"]
    assert types["layers.0.down"] == "Q4_0" and types["layers.0.q"] == "Q4_0"  # in = 96 / 64 < 256
    assert types["embed"] == "Q8_0"
    assert edgerun.Engine(tmp_path / "t", max_context=64).logits(TOKENS).shape == (len(TOKENS), 320)


@pytest.fixture(scope="module")
def tiny_narrow(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=5)


@pytest.mark.parametrize("ggml_type", ["TQ1_0", "TQ2_0"])
def test_ternary_checkpoint_round_trips_losslessly_through_gguf(tiny256, tmp_path, ggml_type):
    """Weights that are already ternary (x an fp16 scale per block of 256) come back bit for bit."""
    ckpt = load_checkpoint(tiny256)
    rng = np.random.default_rng(2)
    for name, w in list(ckpt.weights.items()):
        if name.startswith("layers.") and w.ndim == 2:
            scales = rng.uniform(0.01, 0.1, (w.shape[0], w.shape[1] // 256, 1)).astype(np.float16).astype(np.float32)
            codes = rng.integers(-1, 2, (w.shape[0], w.shape[1] // 256, 256))
            codes[..., 0] = 1  # a non-zero code per block (an all-zero block stores scale 0)
            ckpt.weights[name] = (codes * scales).reshape(w.shape).astype(np.float32)
    recipe = {"name": "bitnet", "default": {"format": "ternary", "block_size": 256, "gguf_type": ggml_type},
              "rules": [{"pattern": "embed", "format": "float32"}, {"pattern": "lm_head", "format": "float32"}]}
    export(ckpt, tmp_path / "t", ExportOptions(formats=("gguf",), quant=recipe))
    reader = gguf.GGUFReader(tmp_path / "t" / "model.gguf")
    assert {t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and t.data.ndim == 2} == {ggml_type}
    back = load_checkpoint(tmp_path / "t" / "model.gguf")
    for name, w in ckpt.weights.items():
        np.testing.assert_array_equal(back.weights[name], w, err_msg=name)


def test_llamacpp_k_quant_export(tiny256, tmp_path, capsys):
    assert main(["export", str(tiny256), "--format", "gguf", "--quant", "q4_k_m", "-o", str(tmp_path / "k")]) == 0
    assert "model.gguf (q4_k_m)" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "k")
    assert manifest.quantization["llama_ftype"] == "Q4_K_M"
    assert "Q4_K" in manifest.weights["mlp"] and manifest.weights["norms"] == "float32"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["manifest.json", "model.gguf", "tokenizer.json"]
    write_package(load_checkpoint(tiny256), tmp_path / "float", formats=("gguf",))
    ours = edgerun.Engine(tmp_path / "k", max_context=64).logits(TOKENS)
    reference = edgerun.Engine(tmp_path / "float", max_context=64).logits(TOKENS)
    assert _corr(ours, reference) > 0.97  # 4-5 bit weights of a random model: close, not equal


@pytest.mark.parametrize("argv, message", [
    (["--format", "gguf", "--quant", "q9_z"], "llama.cpp types work too"),
    (["--format", "gguf", "--quant", "RECIPE"], "no GGUF type holds int4_asym"),
    (["--format", "onnx,gguf", "--quant", "int8"], "one format per package"),
    (["--accuracy-level", "3"], "use it with --quant and --format onnx"),
    (["--format", "gguf", "--quant", "int8", "--device", "cuda"], "a GGUF is the same for every llama.cpp device"),
])
def test_bad_gguf_quant_flags_are_clear_errors(tiny_narrow, tmp_path, capsys, argv, message):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"default": {"format": "int4_asym", "block_size": 32}}')
    argv = [str(recipe) if a == "RECIPE" else a for a in argv]
    assert main(["export", str(tiny_narrow), "-o", str(tmp_path / "x"), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_gguf_rows_that_are_not_whole_blocks_are_a_clear_error(tiny_narrow, tmp_path):
    recipe = {"name": "tq", "default": {"format": "ternary", "block_size": 256}}
    with pytest.raises(ValueError, match=r"embed \(320, 64\): block size 256 of ternary\(b256\) exceeds the row"):
        export(tiny_narrow, tmp_path / "x", ExportOptions(formats=("gguf",), quant=recipe))
    with pytest.raises(ValueError, match=r"layers.0.q \(576, 576\): GGUF TQ2_0 needs rows that are a multiple of 256"):
        gguf_type_for(get_format("ternary", 256), (576, 576), "layers.0.q")  # SmolLM2's shapes
    with pytest.raises(ValueError, match=r"no GGUF type holds int8_block\(b16\)"):
        gguf_type_for(get_format("int8_block", 16), (8, 64))
    with pytest.raises(ValueError, match="gguf_type 'TQ1_0' does not hold"):
        load_recipe({"name": "x", "default": {"format": "int8_block", "gguf_type": "TQ1_0"}})
    assert not (tmp_path / "x").exists()


def test_accuracy_level_flag_reaches_the_graph(tiny_narrow, tmp_path):
    import onnx

    assert main(["export", str(tiny_narrow), "--quant", "int8", "--accuracy-level", "1",
                 "-o", str(tmp_path / "a")]) == 0
    manifest = read_manifest(tmp_path / "a")
    assert manifest.quantization["accuracy_level"] == 1
    graph = onnx.load(str(tmp_path / "a" / "stage0.onnx"), load_external_data=False).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {1}
    assert main(["export", str(tiny_narrow), "--quant", "int8", "--device", "cuda", "-o", str(tmp_path / "c")]) == 0
    assert read_manifest(tmp_path / "c").quantization["accuracy_level"] == 0


def test_llama_quant_types_lists_k_quants():
    types = llama_quant_types()
    assert {"q4_k_m", "q5_k_m", "q6_k", "q8_0"} <= set(types) and "f16" not in types


# -- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_q8_0_gguf_agrees_with_float(smollm2_gguf, smollm2_engine, tmp_path):
    export(smollm2_gguf, tmp_path / "q8", ExportOptions(formats=("gguf",), quant="int8"))
    engine = edgerun.Engine(tmp_path / "q8", max_context=1024)
    assert engine.backend.name == "llamacpp"
    from edgerun import data

    text = data.wikitext("test")[:20000]
    tokens = smollm2_engine.encode(text)[:512]
    agreement = float((engine.logits(tokens).argmax(-1) == smollm2_engine.logits(tokens).argmax(-1)).mean())
    print(f"\nQ8_0 GGUF (ours) on llama.cpp: top-1 agreement with the fp32 reference over {len(tokens)} "
          f"WikiText-2 test tokens: {agreement:.4f}")
    assert agreement >= 0.9


def test_pruned_and_quantized_gguf_runs_on_llamacpp(tiny_narrow, tmp_path):
    """Depth pruning combines with GGUF quantization: renumbered blocks, quantized, run by llama.cpp."""
    assert main(["export", str(tiny_narrow), "--keep-layers", "0,1,3", "--format", "gguf", "--quant", "int4",
                 "-o", str(tmp_path / "p")]) == 0
    manifest = read_manifest(tmp_path / "p")
    assert manifest.kept_layers == (0, 1, 3) and manifest.model.num_layers == 3
    assert set(manifest.quantization["gguf_types"]) >= {"layers.2.down"} and "layers.3.q" not in \
        manifest.quantization["gguf_types"]
    reader = gguf.GGUFReader(tmp_path / "p" / "model.gguf")
    assert reader.fields["llama.block_count"].contents() == 3
    back = load_checkpoint(tmp_path / "p" / "model.gguf")
    write_package(back, tmp_path / "float")
    ours = edgerun.Engine(tmp_path / "p", max_context=64).logits(TOKENS)
    assert _corr(ours, edgerun.Engine(tmp_path / "float", max_context=64).logits(TOKENS)) > 0.995


def test_healed_model_refuses_gguf_instead_of_dropping_the_correction(tiny_narrow, tmp_path, capsys):
    from edgerun.export.gguf_writer import write_gguf
    from edgerun.export.prune import prune_for_export
    from edgerun.runtime.manifest import PackageError

    assert main(["export", str(tiny_narrow), "--prune-layers", "1", "--heal", "--format", "gguf",
                 "-o", str(tmp_path / "x")]) == 1
    assert "export healed models with --format onnx" in capsys.readouterr().err
    healed = prune_for_export(load_checkpoint(tiny_narrow), keep_layers=[0, 1, 3], heal=True)
    with pytest.raises(PackageError, match=r"weights \['cut\.\d+\.(bias|weight)'.*have no place in a llama GGUF"):
        write_gguf(healed, tmp_path / "h.gguf")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*.gguf*"))


def test_malformed_recipe_file_for_gguf_names_the_file_only(tiny_narrow, tmp_path, capsys):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"default": {"format": "int4_asym"')
    assert main(["export", str(tiny_narrow), "--format", "gguf", "--quant", str(recipe),
                 "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert f"recipe {recipe} is not valid JSON" in err and "llama.cpp types" not in err
    assert not (tmp_path / "x").exists()
