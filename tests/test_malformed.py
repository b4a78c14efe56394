"""Hostile and malformed input, case by case: files a manifest names that lead outside the package
(relative, absolute, symlink), each field-level error message, the cases the fuzzing once found
(tests/test_fuzz.py), and writers killed half-way that must never leave something taken for complete.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from fuzz_worker import gguf_layout, mutate_json, set_part
from jinja2 import TemplateError

import edgerun.runtime.text as text_module
from edgerun.cli import main
from edgerun.export.checkpoint import load_checkpoint
from edgerun.hub import resolve_package
from edgerun.quant.recipe import load_recipe
from edgerun.runtime.early_exit import read_exit_file
from edgerun.runtime.engine import Engine
from edgerun.runtime.home import cached_package_dir
from edgerun.runtime.manifest import MANIFEST_NAME, PackageError, package_file, read_manifest
from edgerun.runtime.text import render_chat_template

pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


@pytest.fixture
def package(tiny_fp32, tmp_path) -> Path:
    """A private copy of the tiny package (ONNX graph + GGUF), inside tmp_path/box."""
    return Path(shutil.copytree(tiny_fp32, tmp_path / "box" / "pkg"))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A file outside the package that nothing may open."""
    path = tmp_path / "secret.txt"
    path.write_text("not for packages")
    return path


def edit_manifest(package: Path, **fields) -> None:
    data = json.loads((package / MANIFEST_NAME).read_text())
    for key, value in fields.items():
        node, *path = key.split(".")
        target = data
        for part in [node, *path][:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = [node, *path][-1]
        target[int(last) if isinstance(target, list) else last] = value
    (package / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.fixture
def no_opening(monkeypatch):
    """Fail the test if a loader of package files is reached (the refusal must come first)."""
    def opened(*args, **kwargs):
        raise AssertionError(f"a package file was opened: {args[:1]}")

    import onnxruntime

    from edgerun.runtime import llamacpp_backend

    monkeypatch.setattr(onnxruntime, "InferenceSession", opened)
    monkeypatch.setattr(text_module, "Tokenizer", type("Tokenizer", (), {"from_file": staticmethod(opened)}))
    monkeypatch.setattr(llamacpp_backend, "_load_model", opened)
    monkeypatch.setattr(np, "load", opened)


# -- path containment -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,file", [("tokenizer", "tokenizer.json"), ("stages.0.file", "stage0.onnx"),
                                        ("gguf", "model.gguf")])
@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_manifest_paths_leading_outside_are_refused(package, outside, field, file, how, no_opening):
    if how == "relative":
        name, expected = "../../secret.txt", f"'../../secret.txt' resolves to {outside}, outside the package"
    elif how == "absolute":
        name = str(outside)
        expected = "is an absolute path outside the package" if field == "gguf" else "is an absolute path"
    else:
        (package / file).unlink()
        (package / file).symlink_to(outside)
        name, expected = file, f"leads through a symlink to {outside}, outside the package folder"
    edit_manifest(package, **{field: name})
    named = _re(field.replace(".0.", "[0]."))
    for load in (read_manifest, Engine):
        with pytest.raises(PackageError, match=f"{named} .*{_re(expected)}"):
            load(package)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_symlinked_folder_on_the_way_out_is_refused(package, tmp_path, no_opening):
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(package / "tokenizer.json", tmp_path / "elsewhere" / "tokenizer.json")
    (package / "sub").symlink_to(tmp_path / "elsewhere")
    edit_manifest(package, tokenizer="sub/tokenizer.json")
    with pytest.raises(PackageError, match="'sub/tokenizer.json' leads through a symlink to .*elsewhere"):
        Engine(package)


def test_paths_inside_the_package_are_fine(package):
    (package / "sub").mkdir()
    shutil.move(package / "tokenizer.json", package / "sub" / "tokenizer.json")
    (package / "tok.json").symlink_to("sub/tokenizer.json")  # a symlink that stays inside
    edit_manifest(package, tokenizer="sub/../tok.json")
    assert Engine(package, max_context=32).complete("the", max_new_tokens=2) is not None


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_onnx_external_data_leading_outside_is_refused(package, tmp_path, how, monkeypatch):
    import onnxruntime

    def opened(*args, **kwargs):
        raise AssertionError("onnxruntime was reached")

    data = package / "stage0.onnx.data"
    moved = tmp_path / "weights.data"
    shutil.move(data, moved)
    if how == "symlink":
        data.symlink_to(moved)
    else:
        location = "../../weights.data" if how == "relative" else str(moved)
        model = onnx.load(package / "stage0.onnx", load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, package / "stage0.onnx")
    monkeypatch.setattr(onnxruntime, "InferenceSession", opened)
    with pytest.raises(PackageError, match="stage0.onnx's external data of '.*' .*(outside the package|absolute)"):
        Engine(package)


@pytest.mark.parametrize("name", ["../exit1.npz", "/tmp/exit1.npz"])
def test_exit_files_leading_outside_are_refused(package, name, no_opening):
    with pytest.raises(PackageError, match=r"exits\[\]\.file"):
        read_exit_file(package, name, 64)


def test_package_file_refuses_odd_names(package):
    for name in ("", "a\0b", 5):
        with pytest.raises(PackageError, match="is not a file name"):
            package_file(package, name, "tokenizer")


def test_cli_names_the_offending_path_in_one_line(package, outside, capsys):
    edit_manifest(package, **{"stages.0.file": str(outside)})
    assert main(["run", str(package), "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"stages[0].file '{outside}' is an absolute path" in err[0], err


# -- the hub's light GGUF references ---------------------------------------------------------------------------
def test_cache_reference_is_the_only_absolute_gguf(tiny_fp32, package, tmp_path, home):
    gguf = tmp_path / "model.gguf"
    shutil.copy(tiny_fp32 / "model.gguf", gguf)
    reference = resolve_package(gguf)
    assert reference == cached_package_dir(gguf, "gguf")
    assert read_manifest(reference).gguf_path(reference) == gguf.resolve()
    # the same manifest anywhere else is refused
    copy = shutil.copytree(reference, tmp_path / "copied-gguf")
    with pytest.raises(PackageError, match="is an absolute path outside the package folder; only the light"):
        read_manifest(copy)
    # a package of the cache pointing at another file is refused too
    other = tmp_path / "other.gguf"
    shutil.copy(gguf, other)
    data = json.loads((reference / MANIFEST_NAME).read_text())
    (reference / MANIFEST_NAME).write_text(json.dumps({**data, "gguf": str(other)}))
    with pytest.raises(PackageError, match=f"is not edge-run's reference to {other}"):
        read_manifest(reference)
    # and so is the reference once its file changed (a new reference is made for the new file)
    (reference / MANIFEST_NAME).write_text(json.dumps(data))
    os.utime(gguf, (1, 1))
    with pytest.raises(PackageError, match="the file changed since"):
        read_manifest(reference)
    assert resolve_package(gguf) != reference
    os.unlink(gguf)
    with pytest.raises(PackageError, match="which does not exist"):
        read_manifest(reference)


def test_cache_reference_made_through_a_symlink(tiny_fp32, tmp_path):
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_fp32 / "model.gguf", tmp_path / "models" / "real-name.gguf")
    (tmp_path / "link.gguf").symlink_to(tmp_path / "models" / "real-name.gguf")
    reference = resolve_package(tmp_path / "link.gguf")
    assert reference.name.startswith("real-name-")
    assert read_manifest(reference).gguf_path(reference) == (tmp_path / "models" / "real-name.gguf").resolve()


# -- field-level errors: the file, the field, what was expected -----------------------------------------------
@pytest.mark.parametrize("field,value,expected", [
    ("model.vocab_size", 2**40, "model.vocab_size must be an integer in 1..4194304, got 1099511627776"),
    ("model.num_layers", 10**6, "model.num_layers must be an integer in 1..1024, got 1000000"),
    ("model.hidden_size", -5, "model.hidden_size must be an integer in 1..65536, got -5"),
    ("model.context_length", 2**40, "model.context_length must be an integer in 2..16777216"),
    ("model.head_dim", 1.5, "model.head_dim must be an integer in 1..1024, got 1.5"),
    ("model.rope_theta", "x", r"model.rope_theta must be a finite number in 0.001..1e\+12, got 'x'"),
    ("model.rms_norm_eps", -1, "model.rms_norm_eps must be a finite number in 0..1, got -1"),
    ("model.tie_embeddings", 1, "model.tie_embeddings must be true or false, got 1"),
    ("model.architecture", "", "model.architecture must be a name"),
    ("model.num_kv_heads", 8, r"model.num_kv_heads must be at most num_heads \(4\), got 8"),
    ("model", None, "model must be an object, got None"),
    ("eos_token_ids", "abc", "eos_token_ids must be a list of integers, got 'abc'"),
    ("eos_token_ids", [99999], r"eos_token_ids\[0\] must be a token id in 0..\d+, got 99999"),
    ("bos_token_id", -1, r"bos_token_id must be an integer or null in 0..\d+, got -1"),
    ("weights", {"bogus": "float32"}, r"weights must be keyed by weight groups \(embedding, .*\), got 'bogus'"),
    ("weights", {"mlp": 4}, "weights must be an object of strings, got"),
    ("stages.0.file", 3, r"stages\[0\]\.file must be a string, got 3"),
    ("stages.0.first_layer", -1, r"stages\[0\]\.first_layer must be an integer in 0..1024, got -1"),
    ("stages.0.embeds", "yes", r"stages\[0\]\.embeds must be true or false, got 'yes'"),
    ("stages", {}, "stages must be a list of objects, got {}"),
    ("tokenizer", 5, "tokenizer must be a string, got 5"),
    ("add_bos_token", "no", "add_bos_token must be true or false, got 'no'"),
    ("chat_template", 5, "chat_template must be a string or null, got 5"),
    ("chat_template", "x" * (2**20 + 1), r"chat_template must be at most 1048576 characters"),
    ("kept_layers", [1, 2], r"kept_layers must be one block index per layer \(4\), got \[1, 2\]"),
    ("exits", [{"layer": 1}], r"exits\[0\] must be an object with layer, file, top1_agreement"),
    ("gguf", 7, "gguf must be a string or null, got 7"),
    ("schema_version", 2, "manifest schema_version 2 is not supported by this edge-run"),
    ("unknown_field", 1, r"unknown keys \['unknown_field'\]"),
])
def test_field_errors_name_the_file_the_field_and_the_expectation(package, field, value, expected):
    edit_manifest(package, **{field: value})
    with pytest.raises(PackageError, match=f"^{_re(str(package / MANIFEST_NAME))}: .*{expected}.*re-export"):
        Engine(package)


@pytest.mark.parametrize("field,value,expected", [
    ("model.num_kv_heads", 1, "past_key_0 has 2 at axis 1, the manifest's model.num_kv_heads is 1"),
    ("model.head_dim", 8, "past_key_0 has 16 at axis 3, the manifest's model.head_dim is 8"),
    ("model.vocab_size", 400, "logits has 320 at axis 2, the manifest's model.vocab_size is 400"),
])
def test_graph_that_does_not_fit_the_manifest_is_refused_before_onnxruntime(package, field, value, expected,
                                                                            monkeypatch):
    """Valid fields that do not match the graph used to fail at the first step, in onnxruntime."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, **k: pytest.fail("onnxruntime was reached"))
    edit_manifest(package, **{field: value})
    with pytest.raises(PackageError, match=f"stage0.onnx does not fit its manifest: {expected}; re-export"):
        Engine(package, backend="onnx")


def test_exit_entries_are_checked(package):
    entry = {"layer": 2, "file": "exit2.npz", "top1_agreement": 0.9, "calibration_tokens": 10,
             "curve": {"threshold": [0.5], "agreement": [1.0], "exit_rate": [0.1], "probe_floor": [0.0]}}
    edit_manifest(package, exits=[entry])
    with pytest.raises(PackageError, match=r"exits\[0\]\.layer must be a stage boundary \(none\), got 2"):
        read_manifest(package)
    edit_manifest(package, exits=[{**entry, "curve": {**entry["curve"], "agreement": "high"}}])
    with pytest.raises(PackageError, match=r"exits\[0\]\.curve\.agreement must be a list of finite numbers"):
        read_manifest(package)


@pytest.mark.parametrize("content,expected", [
    ("{", "is not valid JSON"),
    ("[" * 100000 + "]" * 100000, "is not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (b"\xff\xfe\x00", "is not valid JSON"),
])
def test_manifest_that_is_not_a_json_object(package, content, expected):
    path = package / MANIFEST_NAME
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PackageError, match=f"{_re(str(path))}.*{expected}"):
        read_manifest(package)


def test_manifest_too_large_is_refused_before_reading(package, monkeypatch):
    with open(package / MANIFEST_NAME, "r+b") as f:
        f.truncate(17 << 20)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a huge manifest"))
    with pytest.raises(PackageError, match=r"manifest.json holds 17825792 bytes, more than any manifest"):
        read_manifest(package)


def test_kv_cache_larger_than_memory_is_refused_before_loading(package, monkeypatch, no_opening):
    import psutil

    edit_manifest(package, **{"model.context_length": 2**24})
    available = psutil.virtual_memory()._replace(available=1 << 30)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    with pytest.raises(ValueError, match=r"a KV cache of 1 x 8000000 positions \(4 layers x 2 KV heads x 16 x 4 "
                                         r"bytes, K and V\) needs 8.2 GB but this machine has 1.1 GB of memory "
                                         r"available; lower max_context"):
        Engine(package, max_context=8_000_000)


def test_kv_cache_of_a_batch_is_checked_before_it_is_allocated(package, monkeypatch):
    import psutil

    engine = Engine(package, max_context=64)
    need = engine.manifest.model.kv_bytes(8, 65)
    available = psutil.virtual_memory()._replace(available=need - 1)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    assert engine.complete("the", max_new_tokens=1) is not None  # batch 1 fits
    with pytest.raises(ValueError, match="a KV cache of 8 x 64 positions .* lower max_context .* or the batch size"):
        list(engine.generate(["the"] * 8, max_new_tokens=1))


# -- tokenizer and chat template ------------------------------------------------------------------------------
def test_broken_tokenizer_json_names_the_file(package):
    (package / "tokenizer.json").write_text('{"version": "1.0" "x"}')
    with pytest.raises(PackageError, match=f"{_re(str(package / 'tokenizer.json'))} is not a valid tokenizer file "
                                           r"\(expected `,` or `}` at line 1 column 19\); re-export"):
        Engine(package)


def test_tokenizer_ids_past_the_vocabulary(package):
    data = json.loads((package / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 5000, "content": "<big>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (package / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match=r"tokenizer.json holds token id \d+, past the model's \d+ tokens"):
        Engine(package)


def test_tokenizer_that_panics_is_refused_at_load(package):
    """Fuzzing found it (tokenizer seed 51): a subword prefix longer than the tokens made the Rust
    tokenizer panic (a BaseException) on the first encode, in the middle of a generation."""
    data = json.loads((package / "tokenizer.json").read_text())
    data["model"]["continuing_subword_prefix"] = "x" * 5000
    (package / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(PackageError, match="tokenizer.json is not a valid tokenizer file .*re-export"):
        Engine(package)


def test_eos_token_ids_of_the_wrong_type_is_one_clear_error(package, capsys):
    """The issue's example: it used to end in `TypeError: 'str' object cannot be interpreted as an integer`."""
    edit_manifest(package, eos_token_ids="abc")
    assert main(["run", str(package), "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"edge-run: error: {package / MANIFEST_NAME}: eos_token_ids must be a list of integers, "
                   f"got 'abc'; re-export the package"]


@pytest.mark.parametrize("template,expected", [
    ("{{ ('a' * 100000) * 100000 }}", "repeats a sequence of 100000 items 100000 times"),
    ("{{ [1] * 10**9 }}", "repeats a sequence of 1 items 1000000000 times"),
    ("{{ 7 ** 99999999 }}", "raises 7 to the power 99999999"),
    ("{{ 1 / 0 }}", "ZeroDivisionError: division by zero"),
    ("{{ messages[0]['content'] + 1 }}", "TypeError: can only concatenate str"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe|undefined"),
])
def test_hostile_chat_templates_end_in_a_template_error(template, expected):
    with pytest.raises(TemplateError, match=expected):
        render_chat_template(template, [{"role": "user", "content": "hi"}], "<s>", "</s>")


def test_normal_templates_still_multiply():
    assert render_chat_template("{{ '-' * 3 }}{{ 2 ** 10 }}", [], "", "") == "---1024"


# -- GGUF: cases the fuzzing found -------------------------------------------------------------------------------
def _tiny_gguf_with(tiny_fp32, tmp_path, edit) -> Path:
    source = tiny_fp32 / "model.gguf"
    path = tmp_path / "case.gguf"
    path.write_bytes(edit(source.read_bytes(), gguf_layout(source)))
    return path


def _value_of(layout, name):
    return next(f for f in layout if f[0][3] == name)[-1]


@pytest.mark.parametrize("weights", [False, True])
def test_gguf_regressions(tiny_fp32, tmp_path, weights):
    import gguf

    def zero_heads(data, layout):  # hidden // heads raised ZeroDivisionError
        offset, size, _, _ = _value_of(layout, "llama.attention.head_count")
        return set_part(data, offset, size, 0)

    def offset_overflow(data, layout):  # numpy printed "overflow encountered in scalar add" on stderr
        offset, size, _, _ = _value_of(layout, "token_embd.weight")
        return set_part(data, offset, size, 2**64 - 1)

    def merge_of_missing_token(data, layout):  # tokenizers raised a bare Exception
        reader = gguf.GGUFReader(tiny_fp32 / "model.gguf")
        field, merges = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.merges"].contents()
        part = field.parts[field.data[field.contents().index(merges[0].replace(" ", ""))]]
        start = part.ctypes.data - reader.data.ctypes.data
        return data[:start] + b"~" * part.nbytes + data[start + part.nbytes:]

    for edit, expected in [(zero_heads, "its metadata does not describe a model (ZeroDivisionError"),
                           (offset_overflow, "is truncated or corrupt (FloatingPointError: overflow"),
                           (merge_of_missing_token, "cannot rebuild its tokenizer: Error while initializing BPE")]:
        path = _tiny_gguf_with(tiny_fp32, tmp_path, edit)
        with pytest.raises(PackageError, match=f"^{_re(str(path))}.*{_re(expected)}"):
            load_checkpoint(path, weights=weights)


def test_gguf_with_nan_weights_is_not_exported(tiny_fp32, tmp_path):
    def nan_embedding(data, layout):
        import gguf

        reader = gguf.GGUFReader(tiny_fp32 / "model.gguf")
        tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
        start = int(tensor.data_offset)
        return data[:start] + np.full(4, np.nan, np.float32).tobytes() + data[start + 16:]

    path = _tiny_gguf_with(tiny_fp32, tmp_path, nan_embedding)
    load_checkpoint(path, weights=False)  # metadata alone is fine: llama.cpp would run it
    with pytest.raises(PackageError, match="tensor token_embd.weight holds NaN or infinite values"):
        load_checkpoint(path)


def test_gguf_metadata_a_manifest_refuses_makes_no_package(tiny_fp32, tmp_path, home):
    def huge_context(data, layout):
        offset, size, _, _ = _value_of(layout, "llama.context_length")
        return set_part(data, offset, size, 2**31)

    path = _tiny_gguf_with(tiny_fp32, tmp_path, huge_context)
    with pytest.raises(PackageError, match=f"{_re(str(path))}.*context_length must be an integer in 2..16777216"):
        resolve_package(path)
    assert not (home / "packages").exists() or not any((home / "packages").iterdir())


# -- recipes: cases the fuzzing found ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,text,expected", [
    (".json", "[1, 2]", "a recipe must be an object, got list"),  # was AttributeError: 'list' ... 'setdefault'
    (".toml", '[default]\nformat = "int4_asym"\n[[rules]]\npattern = true\nformat = "int8_block"\n',
     r"rule 0 \(True\): pattern must be a string, got True"),  # was AttributeError: 'bool' ... 'replace'
    (".json", '{"default": {"format": "int4_asym"}, "calibration": {"tokens": [1]}}',
     r"calibration: tokens must be an integer, got \[1\]"),  # was TypeError: '<' not supported
    (".json", '{"default": {"format": [1, 2]}}', r"default: format must be a string, got \[1, 2\]"),
    (".json", '{"default": {"format": "int4_asym", "block_size": "32"}}',
     "default: block_size must be an integer or null, got '32'"),
    (".toml", 'name = "x"\nname = "y"\n', r"is not valid TOML: Cannot overwrite a value \(at line 2, column 11\)"),
    (".json", '{"default": ', r"is not valid JSON: Expecting value: line 1 column 13"),
])
def test_recipe_errors_name_the_file_and_the_key(tmp_path, suffix, text, expected):
    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"recipe {_re(str(path))}.*{expected}"):
        load_recipe(path)


@pytest.mark.parametrize("data, how", [
    ("/etc/passwd", "is an absolute path"),
    ("../../../../etc/passwd", "outside the recipe folder"),
    ("link/passwd", "leads through a symlink"),
])
def test_recipe_calibration_data_stays_in_the_recipe_folder(tmp_path, data, how):
    """A recipe from a pull request reads no file outside its own folder (quant recipes and build recipes)."""
    from edgerun.build_recipe import load_build_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "link").symlink_to("/etc")
    recipe = folder / "r.json"
    recipe.write_text(json.dumps({"default": {"format": "int4_asym"}, "calibration": {"data": data}}))
    with pytest.raises(ValueError, match=f"calibration.data.*{how}"):
        load_recipe(recipe)
    build = folder / "b.toml"
    build.write_text(f'name = "b"\n[source]\nmodel = "smollm2-135m"\n[calibration]\ndata = "{data}"\n'
                     f'[variants.int8]\nquant = "int8"\n')
    with pytest.raises(ValueError, match=how):
        load_build_recipe(build)
    (folder / "calib.txt").write_text("some text")  # inside: accepted, resolved against the recipe's folder
    recipe.write_text(json.dumps({"default": {"format": "int4_asym"}, "calibration": {"data": "calib.txt"}}))
    assert load_recipe(recipe).calibration.data == str((folder / "calib.txt").resolve())


# -- writers killed half-way ---------------------------------------------------------------------------------------
def _die_during(tmp_path: Path, code: str) -> None:
    """Run `code` in a fresh interpreter in which `die()` ends the process at once, as a kill would."""
    script = "import os\ndef die():\n    os._exit(137)\n" + code
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 137, result.stderr[-2000:]


def test_gguf_reference_killed_while_writing_is_not_taken_for_complete(tiny_fp32, tmp_path, home):
    gguf = tmp_path / "m.gguf"
    shutil.copy(tiny_fp32 / "model.gguf", gguf)
    _die_during(tmp_path, f"""
from edgerun.runtime.manifest import Manifest
def half_written(self, directory):
    (directory / "manifest.json").write_text('{{"model": {{"architecture": ')
    die()
Manifest.write = half_written
from edgerun.hub import resolve_package
resolve_package({str(gguf)!r})
""")
    target = cached_package_dir(gguf, "gguf")
    assert not target.exists()
    assert all(p.name.startswith(".") for p in target.parent.iterdir())  # only the hidden temporary folder
    package = resolve_package(gguf)  # made again, whole
    assert package == target and Engine(package, max_context=32).complete("the", max_new_tokens=1) is not None


def test_gguf_killed_while_writing_is_not_left_in_place(tiny_fp32, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _die_during(tmp_path, f"""
import gguf
gguf.GGUFWriter.write_tensors_to_file = lambda self, *a, **k: die()
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.gguf_writer import write_gguf
write_gguf(load_checkpoint({str(tiny_fp32 / "model.gguf")!r}), {str(out / "model.gguf")!r})
""")
    assert not (out / "model.gguf").exists() and all(p.name.startswith(".") for p in out.iterdir())


def test_export_killed_while_writing_leaves_no_package(tiny_fp32, tmp_path):
    _die_during(tmp_path, f"""
import onnx
onnx.save_model = lambda *a, **k: die()
from edgerun.export.pipeline import export
export({str(tiny_fp32 / "model.gguf")!r}, {str(tmp_path / "pkg")!r})
""")
    assert not (tmp_path / "pkg").exists()
    with pytest.raises(PackageError, match="is not an edge-run package"):
        read_manifest(tmp_path / "pkg")


def test_bench_report_killed_before_it_is_complete_is_not_in_place(tmp_path):
    _die_during(tmp_path, f"""
from pathlib import Path
Path.replace = lambda self, target: die()
from edgerun.bench.report import write_json
write_json(Path({str(tmp_path / "bench.json")!r}), {{"engines": []}})
""")
    assert not (tmp_path / "bench.json").exists() and (tmp_path / "bench.json.partial").exists()


def test_mutated_manifest_seed_is_reproducible(tiny_fp32):
    """The fuzzing's JSON mutations are functions of their seed (a failure names the seed that replays it)."""
    data = json.loads((tiny_fp32 / MANIFEST_NAME).read_text())
    assert mutate_json(data, 7) == mutate_json(data, 7) and mutate_json(data, 7) != mutate_json(data, 8)
