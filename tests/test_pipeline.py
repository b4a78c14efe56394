"""The export pipeline: `ExportOptions` checks every setting before a checkpoint is read;
`export` runs prune -> exits -> quantize -> package for ONNX and GGUF on tiny random models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export import pipeline
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.pipeline import ExportOptions, check_output, export
from edgerun.quant.recipe import Recipe
from edgerun.runtime.manifest import PackageError, read_manifest

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33, 8]

pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=21)


# -- options: every rule checked when the options are made ---------------------------------------
@pytest.mark.parametrize("settings, message", [
    ({"formats": "tflite"}, "--format must be onnx, gguf or onnx,gguf, got 'tflite'"),
    ({"formats": ()}, "--format must be onnx, gguf or onnx,gguf, got ''"),
    ({"gguf_dtype": "f16"}, "--dtype f16 applies to GGUF only (ONNX graphs are f32); use --format gguf --dtype f16"),
    ({"formats": ("gguf",), "gguf_dtype": "q8"}, "--dtype must be one of"),
    ({"formats": ("gguf",), "stage_boundaries": (2,)}, "split ONNX graphs; add onnx to --format"),
    ({"formats": ("gguf",), "exit_layers": (2,)}, "split ONNX graphs; add onnx to --format"),
    ({"formats": ("gguf",), "prune_layers": 1, "heal": True}, "export healed models with --format onnx"),
    ({"prune_layers": -1}, "--prune-layers must be >= 0, got -1"),
    ({"prune_layers": 1, "keep_layers": (0, 1)}, "not both"),
    ({"heal": True}, "--heal needs --prune-layers or --keep-layers"),
    ({"formats": "onnx,gguf", "quant": "int8"}, "--quant writes one format per package"),
    ({"accuracy_level": 3}, "use it with --quant and --format onnx"),
    ({"formats": ("gguf",), "quant": "int8", "device": "cuda"}, "a GGUF is the same for every llama.cpp device"),
    ({"device": "metal"}, "metal is a llama.cpp GPU backend: export --format gguf"),
    ({"quant": "int8", "accuracy_level": 7}, "--accuracy-level must be 0-4"),
    ({"quant": "int9"}, "is neither a preset"),
    ({"formats": ("gguf",), "quant": "q9_z"}, "llama.cpp types work too"),
    ({"quant": {"default": {"format": "int3"}}}, "int3"),
    ({"stage_boundaries": "x"}, "stage_boundaries must be a list of integers"),
    ({"prune_layers": "2"}, "prune_layers must be an integer, got '2'"),
])
def test_bad_options_fail_when_made(settings, message):
    with pytest.raises(ValueError) as info:
        ExportOptions(**settings)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_recipe_file_fails_when_made(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"default": {"format": "int4_asym"')
    with pytest.raises(ValueError, match=f"recipe {recipe} is not valid JSON"):
        ExportOptions(quant=recipe)


def test_from_dict_rejects_unknown_keys_and_normalizes():
    with pytest.raises(ValueError, match=r"export options: unknown keys \['format'\]; allowed: \[.*'formats'"):
        ExportOptions.from_dict({"format": "onnx"})
    with pytest.raises(ValueError, match="export options: expected an object"):
        ExportOptions.from_dict(["onnx"])
    options = ExportOptions.from_dict({"formats": ["onnx"], "stage_boundaries": [3], "exit_layers": [1],
                                       "quant": "int8", "accuracy_level": 1})
    assert options.formats == ("onnx",) and options.stage_boundaries == (3,) and options.exit_layers == (1,)
    assert options.boundaries == (1, 3) and isinstance(options.recipe, Recipe) and options.recipe.name == "int8"
    assert ExportOptions(formats="onnx, gguf").formats == ("onnx", "gguf")
    assert ExportOptions().recipe is None and ExportOptions(stage_boundaries=[3, 1]).boundaries == (3, 1)
    assert ExportOptions(formats=("gguf",), quant="q4_k_m").recipe == "q4_k_m"  # llama.cpp's quantizer


def test_output_is_checked_before_the_checkpoint_is_read(tmp_path, monkeypatch, tiny_hf):
    def no_read(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output folder was checked")

    monkeypatch.setattr(pipeline, "load_checkpoint", no_read)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep")
    with pytest.raises(PackageError, match="already exists; choose another -o folder or pass --force"):
        export(tiny_hf, taken)
    with pytest.raises(PackageError, match="is not an edge-run package"):
        export(tiny_hf, taken, ExportOptions(force=True))
    assert (taken / "notes.txt").read_text() == "keep"
    check_output(tmp_path / "new")  # a missing folder is fine
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", force=True)  # so is an empty one with force


# -- whole exports of a tiny model ---------------------------------------------------------------
def test_onnx_int8_export_with_stages(tmp_path, tiny_hf):
    float_manifest = export(tiny_hf, tmp_path / "float")
    assert float_manifest.stages[0].file == "stage0.onnx" and float_manifest.quantization == {}
    manifest = export(load_checkpoint(tiny_hf), tmp_path / "int8",
                      ExportOptions(quant="int8", stage_boundaries=(2,)))
    assert read_manifest(tmp_path / "int8").weights == manifest.weights
    assert [(s.first_layer, s.end_layer) for s in manifest.stages] == [(0, 2), (2, 4)]
    assert manifest.quantization["layout"] == "MatMulNBits" and manifest.quantization["accuracy_level"] == 4
    assert manifest.weights["attention"] == "int8_block(b16)"
    ours = edgerun.Engine(tmp_path / "int8").logits(TOKENS)
    reference = edgerun.Engine(tmp_path / "float").logits(TOKENS)
    assert np.abs(ours - reference).max() < 0.05 * np.abs(reference).max()


def test_gguf_int4_export_after_keeping_layers_runs_on_llamacpp(tmp_path, tiny_hf):
    pytest.importorskip("llama_cpp")
    options = ExportOptions(formats=("gguf",), quant="int4", keep_layers=(0, 1, 3))
    manifest = export(tiny_hf, tmp_path / "q", options)
    assert manifest.gguf == "model.gguf" and manifest.stages == ()
    assert manifest.kept_layers == (0, 1, 3) and manifest.model.num_layers == 3
    assert manifest.quantization["layout"] == "GGUF" and manifest.quantization["recipe"]["name"] == "int4"
    logits = edgerun.Engine(tmp_path / "q", max_context=64).logits(TOKENS)
    assert logits.shape == (len(TOKENS), manifest.model.vocab_size) and np.isfinite(logits).all()


def test_exit_layers_get_fitted_exits_and_a_head_stage(tmp_path, tiny_hf):
    manifest = export(tiny_hf, tmp_path / "exits", ExportOptions(exit_layers=(2,)))
    assert [(s.first_layer, s.end_layer) for s in manifest.stages] == [(0, 2), (2, 4), (4, 4)]
    (entry,) = manifest.exits
    assert entry["layer"] == 2 and 0 <= entry["top1_agreement"] <= 1 and entry["calibration_tokens"] > 0
    assert (tmp_path / "exits" / entry["file"]).is_file()
