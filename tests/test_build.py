"""`edge-run build`: recipe errors name file, line and key before any work; missed gates exit non-zero
and say which gate by how much; every variant kind rebuilds to identical bytes; the cache reuses
unchanged variants and rebuilds changed ones; a build killed mid-variant leaves nothing that looks
complete and the next run finishes it. Tiny random models keep it quick."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny_llama

from edgerun.build import GATE_FAILURE, entry_key, run_build
from edgerun.build_recipe import RecipeError, load_build_recipe
from edgerun.cli import main
from edgerun.runtime.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)

# the shortest evaluation that still runs every stage
EVALUATION = """
[evaluation]
windows = 1
window_tokens = 32
decode_tokens = 4
prompt_tokens = 4
rounds = 1
reference = "fp32"
baseline = "fp32"
"""
CALIBRATION = """
[calibration]
sequences = 2
tokens = 32
"""


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=31)


def write(folder: Path, source: Path, body: str, name: str = "recipe.toml") -> Path:
    path = folder / name
    path.write_text(f'[source]\npath = "{source}"\n{CALIBRATION}{EVALUATION}\n{body}')
    return path


def builds(report: dict) -> dict[str, bool]:
    """variant -> whether it was built in this run (not taken from the cache)."""
    return {row["name"]: not row["cached"] for row in report["variants"]}


# -- the recipe is checked before any work ---------------------------------------------------------
HEAD = '[source]\npath = "m.gguf"\n'  # lines 1-2


@pytest.mark.parametrize("body, where, message", [
    (HEAD + '[variants.a]\nquantt = "int8"\n', "4: variants.a.quantt", "unknown key; variants.a takes format, quant"),
    (HEAD + '[variants.a]\nprune_layers = "2"\n', "4: variants.a.prune_layers",
     "expected an integer, got string '2'"),
    ('name = "x"\n\n[variants.a]\nquant = "int8"\n', "1: source", "missing; a recipe needs a [source] table"),
    (HEAD + '[variants.a]\nformat = "onnx"\nquant = "int9"\n', "5: variants.a.quant", "unknown preset 'int9'"),
    (HEAD + '[variants.a]\nformat = "gguf"\nquant = "q9_z"\n', "5: variants.a.quant", "a llama.cpp type"),
    (HEAD + '[variants.a]\ngates = { min_top1 = "high" }\n', "4: variants.a.gates.min_top1", "expected a number"),
    (HEAD + '[variants.a]\nquant = "int8"\n\n[variants.a.gates]\nmax_speed = 2\n', "7: variants.a.gates.max_speed",
     "unknown key"),
    (HEAD + '[variants.a]\n[variants.b]\ngates.min_top1 = 1.5\n', "5: variants.b.gates.min_top1", "must be in 0..1"),
    (HEAD + '[variants.a]\nformat = "tflite"\n', "4: variants.a.format", "expected one of onnx, gguf, both"),
    (HEAD + '[variants.a]\nformat = "both"\nquant = "int8"\n', "4: variants.a.format", "float weights only"),
    (HEAD + '[variants.a]\nheal = true\n', "4: variants.a.heal", "heal needs prune_layers or keep_layers"),
    (HEAD + '[variants."a/b"]\n', "3: variants.a/b", "a variant name is a folder name"),
    (HEAD + '[evaluation]\nreference = "q"\n\n[variants.q]\nquant = "int8"\n', "4: evaluation.reference",
     "not a float, full-depth variant"),
    (HEAD + '[variants.a]\ngates = { min_decode_ratio = 1.5 }\n', "4: variants.a.gates.min_decode_ratio",
     "set [evaluation] baseline"),
    (HEAD + '[evaluation]\nwindow_tokens = 64\n[variants.a]\ncontext_length = 32\n', "6: variants.a.context_length",
     "cannot hold an evaluation window of 64 tokens"),
    (HEAD + 'sha256 = "abc"\n[variants.a]\n', "3: source.sha256", "expected 64 lower-case hex digits"),
    (HEAD + '[variants.a]\nquant = \n', "4", "invalid TOML"),
    (HEAD + '[calibration]\nsequences = 0\n[variants.a]\n', "4: calibration.sequences", "sequences >= 1"),
    ('[source]\nmodel = "gpt-5"\n[variants.a]\n', "2: source.model", "unknown model 'gpt-5'"),
    ('vairants = 1\n' + HEAD, "1: vairants", "unknown key; the recipe takes name, source"),
])
def test_recipe_errors_name_file_line_and_key(tmp_path, body, where, message):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    with pytest.raises(RecipeError) as info:
        load_build_recipe(recipe)
    text = str(info.value)
    assert text.startswith(f"{recipe}:{where}"), text
    assert message in text and "\n" not in text


def test_a_bad_recipe_ends_in_one_line_before_any_work(tmp_path, capsys, home):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    recipe = tmp_path / "r.toml"
    recipe.write_text(HEAD + '[variants.a]\nquant = "int9"\n')
    assert main(["build", str(recipe), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"edge-run: error: {recipe}:4: variants.a.quant: unknown preset 'int9'") and "\n" not in err
    assert not (tmp_path / "out").exists() and not (home / "builds").exists()


# -- gates -----------------------------------------------------------------------------------------
def test_a_missed_gate_exits_non_zero_and_the_report_says_which_and_by_how_much(tmp_path, tiny_hf, capsys):
    recipe = write(tmp_path, tiny_hf, '[variants.fp32]\n[variants.int8]\nquant = "int8"\n'
                                      'gates = { max_size_mb = 0.001, min_top1 = 0.5, min_decode_ratio = 0.01 }\n')
    out = tmp_path / "out"
    assert main(["build", str(recipe), "-o", str(out)]) == GATE_FAILURE
    assert "edge-run: gate missed: int8: max_size_mb <= 0.001" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and len(report["missed"]) == 1
    int8 = next(r for r in report["variants"] if r["name"] == "int8")
    gates = {g["gate"]: g for g in int8["gates"]}
    assert not gates["max_size_mb"]["passed"]
    assert gates["max_size_mb"]["missed_by"] == pytest.approx(int8["size_mb"] - 0.001)
    assert gates["min_top1"]["passed"] and gates["min_decode_ratio"]["passed"]
    assert int8["decode_ratio"] > 0 and 0 < int8["top1"] <= 1 and int8["kl"] >= 0
    assert "**missed** max_size_mb <= 0.001" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 0
    assert read_manifest(out / "int8").weights["attention"].startswith("int8")
    # the same build without the failing gate passes
    recipe.write_text(recipe.read_text().replace("max_size_mb = 0.001, ", ""))
    assert main(["build", str(recipe), "-o", str(out), "--no-plot"]) == 0


def test_without_a_reference_variant_an_fp32_export_of_the_source_is_the_reference(tmp_path, tiny_hf, home):
    recipe = write(tmp_path, tiny_hf, '[variants.int8]\nquant = "int8"\ngates = { min_top1 = 0.5 }\n')
    recipe.write_text(recipe.read_text().replace('reference = "fp32"\nbaseline = "fp32"\n', ""))
    report = run_build(load_build_recipe(recipe), tmp_path / "out", plot=False)
    assert report["passed"] and report["reference"]["name"] == "fp32 ONNX export of the source"
    assert [r["name"] for r in report["variants"]] == ["int8"] and "decode_ratio" not in report["variants"][0]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [".edge-run-build", "int8", "report.json",
                                                                     "report.md"]
    (reference,) = (home / "builds").glob("reference-*")
    assert read_manifest(reference).weights["attention"] == "float32"


# -- reproducible packages -------------------------------------------------------------------------
KINDS = """
[variants.fp32]
[variants.both]
format = "both"
[variants.f16]
format = "gguf"
gguf_dtype = "f16"
[variants.int8]
quant = "int8"
device = "cpu"
[variants.gptq]
quant = "int4-gptq"
[variants.rules]
quant = { method = "rtn", default = { format = "int4_asym", block_size = 32 }, rules = [{ pattern = "embed", format = "int8_block", block_size = 32 }] }
context_length = 128
[variants.pruned]
prune_layers = 1
heal = true
quant = "int4"
[variants.exits]
exit_layers = [2]
[variants.gguf4]
format = "gguf"
quant = "int4"
"""  # noqa: E501


def test_every_variant_kind_rebuilds_to_identical_bytes_with_its_provenance(tmp_path, tiny_hf, home):
    recipe = write(tmp_path, tiny_hf, KINDS)
    first = run_build(load_build_recipe(recipe), tmp_path / "out1", plot=False)
    assert all(builds(first).values())
    # a fresh process (another hash seed) rebuilding everything from scratch
    env = os.environ | {"PYTHONHASHSEED": "7"}
    second = subprocess.run([sys.executable, "-m", "edgerun", "build", str(recipe), "-o", str(tmp_path / "out2"),
                             "--force", "--no-plot"], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert all(builds(report).values())
    for variant in load_build_recipe(recipe).variants:
        one, two = tmp_path / "out1" / variant.name, tmp_path / "out2" / variant.name
        files = sorted(f.name for f in one.iterdir())
        assert files == sorted(f.name for f in two.iterdir())
        for name in files:
            assert (one / name).read_bytes() == (two / name).read_bytes(), f"{variant.name}/{name} differs"
        build = read_manifest(one).extra["build"]
        assert build["source"]["sha256"] == read_manifest(one).source["sha256"]
        assert read_manifest(one).source["path"] == str(tiny_hf)  # as the recipe spells it
        assert build["tool_version"] and build["variant"] == variant.name and build["recipe"] == variant.section
        assert build["key"] == entry_key(home / "builds" / build["key"])
    gptq = read_manifest(tmp_path / "out1" / "gptq").extra["build"]["calibration"]["gptq"]
    assert gptq["sequences"] == 2 and len(gptq["sha256"]) == 64
    assert read_manifest(tmp_path / "out1" / "pruned").extra["build"]["calibration"]["layers"]["sha256"]
    assert read_manifest(tmp_path / "out1" / "int8").extra["build"]["calibration"] is None
    assert read_manifest(tmp_path / "out1" / "rules").model.context_length == 128


# -- the cache -------------------------------------------------------------------------------------
def test_the_cache_reuses_unchanged_variants_and_rebuilds_changed_ones(tmp_path, tiny_hf):
    source = tmp_path / "model"
    shutil.copytree(tiny_hf, source)
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    body = ('[variants.fp32]\n[variants.int8]\nquant = "int8"\n[variants.gptq]\nquant = "int4-gptq"\n')
    recipe = write(tmp_path, Path("model"), body)
    recipe.write_text(recipe.read_text().replace("[calibration]\n", '[calibration]\ndata = "calib.txt"\n'))
    out = tmp_path / "out"

    def build(**kwargs) -> dict[str, bool]:
        return builds(run_build(load_build_recipe(recipe), out, plot=False, **kwargs))

    assert build() == {"fp32": True, "int8": True, "gptq": True}
    gptq = read_manifest(out / "gptq")  # the calibration file as the recipe names it: no machine paths
    assert gptq.quantization["recipe"]["calibration"]["data"] == "calib.txt"
    assert gptq.extra["build"]["calibration"]["gptq"]["data"] == "calib.txt"
    assert build() == {"fp32": False, "int8": False, "gptq": False}
    recipe.write_text(recipe.read_text().replace('quant = "int8"\n', 'quant = "int8"\ngates = { min_top1 = 0.1 }\n'))
    assert build() == {"fp32": False, "int8": False, "gptq": False}  # gates are not what a package is made of
    recipe.write_text(recipe.read_text().replace('quant = "int8"\n', 'quant = "int8"\naccuracy_level = 1\n'))
    assert build() == {"fp32": False, "int8": True, "gptq": False}
    assert read_manifest(out / "int8").quantization["accuracy_level"] == 1
    (tmp_path / "calib.txt").write_text("a different calibration text, just as long as the first one. " * 40)
    assert build() == {"fp32": False, "int8": False, "gptq": True}
    build_tiny_llama(source, seed=32)  # another model at the same path
    assert build() == {"fp32": True, "int8": True, "gptq": True}
    assert build(force=True) == {"fp32": True, "int8": True, "gptq": True}
    assert build(only=("int8",)) == {"fp32": False, "int8": False}  # the reference and baseline come along


def test_the_source_sha256_is_checked_before_anything_is_built(tmp_path, tiny_hf, home):
    recipe = write(tmp_path, tiny_hf, "[variants.fp32]\n")
    recipe.write_text(recipe.read_text().replace("[calibration]", f'sha256 = "{"0" * 64}"\n[calibration]'))
    with pytest.raises(RecipeError, match=r"recipe.toml:4: source.sha256: .* has sha256 [0-9a-f]{64}, not the"):
        run_build(load_build_recipe(recipe), tmp_path / "out", plot=False)
    assert not any((home / "builds").glob("fp32-*"))


# -- interruption ----------------------------------------------------------------------------------
def test_a_build_killed_mid_variant_leaves_nothing_complete_looking_and_the_next_run_finishes_it(
        tmp_path, tiny_hf, home):
    # b fits three exits (seconds): long enough to be killed while it is being built
    recipe = write(tmp_path, tiny_hf, "[variants.fp32]\n[variants.b]\nexit_layers = [1, 2, 3]\n")
    out, cache = tmp_path / "out", home / "builds"
    proc = subprocess.Popen([sys.executable, "-m", "edgerun", "build", str(recipe), "-o", str(out), "--no-plot"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if any(cache.glob("fp32-*/manifest.json")) and any(cache.glob(".b-*.partial")):
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build ended before it was killed in variant b"
    assert any(cache.glob(".b-*.partial")) and not any(cache.glob("b-*"))
    assert not (out / "b").exists() and not (out / "report.json").exists()
    for folder in cache.iterdir():  # every entry under its final name is complete
        if folder.is_dir() and not folder.name.startswith("."):
            assert folder.name == "evals" or entry_key(folder) == folder.name
    report = run_build(load_build_recipe(recipe), out, plot=False)
    assert builds(report) == {"fp32": False, "b": True}
    assert entry_key(out / "b") == report["variants"][1]["key"] and len(read_manifest(out / "b").exits) == 3
    assert not any(cache.glob(".b-*.partial"))
