"""The `edge-run` command line: bad input gives one clear line and a non-zero exit, never a
traceback, a corrupted cache or a half-written package; good input does what --help says.

Most cases call `edgerun.cli.main` in-process (fast); a few run `python -m edgerun` in a real
subprocess to prove that nothing else reaches the terminal. Tiny random models keep it quick;
only the truncated-GGUF case uses (the first megabyte of) the real model file.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
import edgerun.cli
from edgerun.cli import build_parser, main
from edgerun.export.pipeline import export
from edgerun.runtime.engine import DEFAULT_MAX_CONTEXT
from edgerun.runtime.manifest import Manifest, read_manifest

SUMMARY = re.compile(r"^\[prompt (\d+) tok \| first token \d+ ms \| (\d+) tok in [\d.]+ s \| "
                     r"decode [\d.]+ tok/s \| finish: (stop|length)\]$")


# -- fixtures and helpers ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="module")
def tiny_pkg(tiny_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "tiny-pkg"
    export(tiny_hf, out)
    return out


pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


def _call(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse: usage errors and --help
        return e.code if isinstance(e.code, int) else 1


def fail(capsys, *argv) -> str:
    """Run the CLI expecting a clean failure; returns the single error line."""
    code = _call(argv)
    out, err = capsys.readouterr()
    assert code != 0, f"expected failure, got exit 0; stdout={out!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("edge-run: error: "), lines[0]
    assert out == "", f"nothing should reach stdout on failure, got {out!r}"
    return lines[0]


def ok(capsys, *argv) -> tuple[str, str]:
    code = _call(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    return out, err


def leftovers(folder: Path) -> list[str]:
    """Temporary folders an interrupted or failed write could leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")) or
                  p.name.startswith(".pull."))


def cache_entries(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*")) if home.exists() else []


def no_packages(home: Path) -> bool:
    """True when the cache holds no auto-exported package (not even a hidden partial one)."""
    return not (home / "packages").exists() or not any((home / "packages").iterdir())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_mamba_gguf(path: Path) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- missing or unreadable inputs ----------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "export", "info"])
def test_missing_path(capsys, tmp_path, home, command):
    missing = tmp_path / "no-such-model.gguf"
    argv = {"run": ["run", missing, "hello"], "export": ["export", missing, "-o", tmp_path / "out"],
            "info": ["info", missing]}[command]
    line = fail(capsys, *argv)
    assert str(missing) in line
    assert "smollm2-135m" in line or "known model" in line  # says what would have been accepted
    assert not (tmp_path / "out").exists()
    assert cache_entries(home) == []


@pytest.mark.parametrize("command", ["export", "info", "run"])
def test_text_file_named_gguf(capsys, tmp_path, home, command):
    bogus = tmp_path / "x.gguf"
    bogus.write_text("hello, I am not a model\n")
    argv = {"export": ["export", bogus, "-o", tmp_path / "out"], "info": ["info", bogus],
            "run": ["run", bogus, "hi"]}[command]
    line = fail(capsys, *argv)
    assert str(bogus) in line and "not a GGUF file" in line
    assert not (tmp_path / "out").exists()
    assert cache_entries(home) == []  # no half-made auto-export in the cache


def test_truncated_gguf(capsys, tmp_path, home, smollm2_gguf):
    assert home not in smollm2_gguf.parents  # the session fixture pulled into the real cache
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    out = tmp_path / "pkg"
    line = fail(capsys, "export", truncated, "-o", out)
    assert str(truncated) in line and "truncated or corrupt" in line and "download it again" in line
    assert not out.exists()
    assert leftovers(tmp_path) == []
    # auto-export through `info` must not leave anything in the cache either
    line = fail(capsys, "info", truncated)
    assert "truncated or corrupt" in line
    assert leftovers(tmp_path) == [] and no_packages(home)


def test_unsupported_architecture(capsys, tmp_path):
    path = write_mamba_gguf(tmp_path / "mamba.gguf")
    line = fail(capsys, "export", path, "-o", tmp_path / "out")
    assert "unsupported architecture 'mamba'" in line
    assert "llama" in line  # lists what is supported
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_hf_folder_without_tokenizer(capsys, tmp_path, tiny_hf):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    (folder / "tokenizer.json").unlink()
    line = fail(capsys, "export", folder, "-o", tmp_path / "out")
    assert str(folder) in line and "missing tokenizer.json" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated safetensors", "garbage safetensors", "bad tokenizer.json",
                                    "config.json not an object"])
def test_corrupt_hf_folder(capsys, tmp_path, tiny_hf, damage):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_hf, folder)
    weights = folder / "model.safetensors"
    if damage == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = f"{weights} is truncated or corrupt"
    elif damage == "garbage safetensors":
        weights.write_bytes(b"garbage")
        expected = f"{weights} is truncated or corrupt"
    elif damage == "bad tokenizer.json":
        (folder / "tokenizer.json").write_text('{"model": ')
        expected = f"{folder / 'tokenizer.json'} is not a valid tokenizer file"
    else:
        (folder / "config.json").write_text("[1, 2]")
        expected = f"{folder / 'config.json'} must hold a JSON object"
    line = fail(capsys, "export", folder, "-o", tmp_path / "out")
    assert expected in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- bad run settings ----------------------------------------------------------------------------
def test_prompt_longer_than_context(capsys, tiny_pkg):
    line = fail(capsys, "run", tiny_pkg, "the quick brown fox " * 20, "--max-context", "16", "--raw")
    assert "context holds 16" in line and "shorten" in line


@pytest.mark.parametrize("flag, value, expected", [
    ("--temperature", "-1", "temperature must be >= 0 (0 = greedy), got -1.0"),
    ("--top-p", "0", "top_p must be in (0, 1] (1 = off), got 0.0"),
    ("--top-p", "1.5", "top_p must be in (0, 1] (1 = off), got 1.5"),
    ("--top-k", "-3", "top_k must be an integer >= 0 (0 = off), got -3"),
    ("--repetition-penalty", "0", "repetition_penalty must be > 0 (1 = off), got 0.0"),
    ("-n", "0", "--max-new-tokens must be >= 1, got 0"),
    ("--threads", "0", "--threads must be >= 1, got 0"),
    ("--max-context", "0", "--max-context must be >= 2, got 0"),
    ("--top-k", "abc", "argument --top-k: invalid int value: 'abc'"),
    ("--temperature", "warm", "argument --temperature: invalid float value: 'warm'"),
])
def test_invalid_sampling_value(capsys, tiny_pkg, flag, value, expected):
    line = fail(capsys, "run", tiny_pkg, "hello", flag, value)
    assert expected in line


def test_chat_rejects_bad_sampling_before_reading_input(capsys, monkeypatch, tiny_pkg):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # an immediate Ctrl-D would hide the error
    line = fail(capsys, "chat", tiny_pkg, "--top-p", "0")
    assert "top_p must be in (0, 1]" in line


def test_unknown_device(capsys, tiny_pkg):
    line = fail(capsys, "run", tiny_pkg, "hello", "--device", "tpu")
    assert "unknown device 'tpu'" in line and "cpu" in line


def test_usage_errors_are_one_line(capsys):
    line = fail(capsys, "run")
    assert "required: model, prompt" in line and "edge-run run --help" in line
    line = fail(capsys, "frobnicate")
    assert "invalid choice: 'frobnicate'" in line


@pytest.mark.parametrize("flag, value", [("--ortgenai", "int5"), ("--llamacpp", "Q9"), ("--edgerun-llamacpp", "f32")])
def test_bench_refuses_an_unknown_peer_precision_before_measuring(capsys, tmp_path, flag, value):
    line = fail(capsys, "bench", flag, value, "--out", tmp_path / "out")
    assert f"argument {flag}: invalid choice: '{value}'" in line
    assert not (tmp_path / "out").exists()


def test_unexpected_errors_are_one_line_unless_verbose(capsys, monkeypatch, tiny_pkg):
    def broken(args):
        raise RuntimeError("something odd\n  happened")

    monkeypatch.setitem(edgerun.cli.COMMANDS, "info", broken)
    line = fail(capsys, "info", tiny_pkg)
    assert line == "edge-run: error: RuntimeError: something odd happened (rerun with -v for the traceback)"
    assert _call(["-v", "info", tiny_pkg]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == line


# -- export: existing output, stage boundaries, atomicity ----------------------------------------
def test_export_refuses_existing_folder(capsys, monkeypatch, tmp_path, tiny_hf, tiny_pkg):
    import edgerun.export.checkpoint as checkpoint

    def no_read(path):  # a big checkpoint must not be read only to find -o taken
        raise AssertionError("the checkpoint was read before -o was checked")

    monkeypatch.setattr(checkpoint, "load_checkpoint", no_read)
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("do not touch")
    before = snapshot(folder)
    line = fail(capsys, "export", tiny_hf, "-o", folder)
    assert str(folder) in line and "already exists" in line and "--force" in line
    assert snapshot(folder) == before
    # --force replaces packages only, never an arbitrary folder
    line = fail(capsys, "export", tiny_hf, "-o", folder, "--force")
    assert "not an edge-run package" in line
    assert snapshot(folder) == before and leftovers(tmp_path) == []
    # an existing package is not touched without --force
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_pkg, pkg)
    before = snapshot(pkg)
    fail(capsys, "export", tiny_hf, "-o", pkg)
    assert snapshot(pkg) == before


@pytest.mark.parametrize("boundaries, expected", [
    ("5,3", "stage boundaries [5, 3] must be increasing layer indices inside 1..3"),
    ("2,2", "stage boundaries [2, 2] must be increasing"),
    ("x", "--stage-boundaries must be comma-separated integers, got 'x'"),
    ("4", "stage boundaries [4] must be increasing layer indices inside 1..3"),
    ("0", "stage boundaries [0] must be increasing layer indices inside 1..3"),
])
def test_bad_stage_boundaries(capsys, tmp_path, tiny_hf, boundaries, expected):
    line = fail(capsys, "export", tiny_hf, "-o", tmp_path / "out", "--stage-boundaries", boundaries)
    assert expected in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_export_leaves_no_partial_package(capsys, monkeypatch, tmp_path, tiny_hf, tiny_pkg, error):
    import edgerun.export.package as package

    real_build = package.build_stage
    calls = []

    def build_then_fail(*args, **kwargs):  # the first stage is written, the second fails
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real_build(*args, **kwargs)

    monkeypatch.setattr(package, "build_stage", build_then_fail)
    out = tmp_path / "new"
    code = _call(["export", tiny_hf, "-o", out, "--stage-boundaries", "2"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if isinstance(error, KeyboardInterrupt):
        assert code == 130 and err.splitlines()[-1] == "edge-run: interrupted"
    else:
        assert code == 1 and err.splitlines()[-1] == \
            "edge-run: error: RuntimeError: disk on fire (rerun with -v for the traceback)"
    assert not out.exists() and leftovers(tmp_path) == []

    # a failed --force export keeps the old package intact
    old = tmp_path / "old"
    shutil.copytree(tiny_pkg, old)
    before = snapshot(old)
    calls.clear()
    assert _call(["export", tiny_hf, "-o", old, "--stage-boundaries", "2", "--force"]) != 0
    capsys.readouterr()
    assert snapshot(old) == before and leftovers(tmp_path) == []


# -- good input ----------------------------------------------------------------------------------
def test_info_on_package(capsys, tiny_pkg):
    out, _ = ok(capsys, "info", tiny_pkg)
    rows = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith(("size", "chat", "tool")))
    assert rows["architecture"] == "llama: 4 layers, hidden 64, 4/2 heads x 16, ffn 96"
    assert rows["stages"] == "stage0.onnx [0,4)"
    assert rows["package"] == str(tiny_pkg)
    assert "chat template  yes" in out
    assert "exact steps    not needed: float weights" in out


def test_info_on_checkpoint_exports_once_into_the_cache(capsys, home, tiny_hf):
    out, _ = ok(capsys, "info", tiny_hf)
    package = Path(out.splitlines()[0].split(None, 1)[1])
    assert package.parent == home / "packages"  # EDGE_RUN_HOME is respected
    assert read_manifest(package).model.num_layers == 4
    stamp = (package / "manifest.json").stat().st_mtime_ns
    out2, _ = ok(capsys, "info", tiny_hf)
    assert out2 == out and (package / "manifest.json").stat().st_mtime_ns == stamp  # reused
    assert leftovers(home / "packages") == []


def test_run_prints_text_and_summary(capsys, tiny_pkg):
    out, err = ok(capsys, "run", tiny_pkg, "the quick brown", "-n", "8")
    engine = edgerun.Engine(tiny_pkg)
    prompt = engine.encode(engine.apply_chat_template([{"role": "user", "content": "the quick brown"}]),
                           add_special_tokens=False)
    expected = list(engine.generate(prompt, max_new_tokens=8))
    text = "".join(r.text for r in expected)
    assert text and out == text + "\n"  # the CLI streams exactly what the API generates
    summary = SUMMARY.match(err.splitlines()[-2])
    assert summary, err
    assert summary.groups() == (str(len(prompt)), str(len(expected)), expected[-1].finish_reason)
    assert re.fullmatch(r"\[memory: weights \d+ MB( \(\d+ MB resident, the rest mapped from the file\))? \+ "
                        r"KV cache \d+ MB \+ .* = \d+ MB resident\]", err.splitlines()[-1])


def test_run_reads_prompt_from_stdin(capsys, monkeypatch, tiny_pkg):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the lazy dog"))
    out_stdin, err = ok(capsys, "run", tiny_pkg, "-", "--raw", "-n", "5")
    out_arg, _ = ok(capsys, "run", tiny_pkg, "the lazy dog", "--raw", "-n", "5")
    assert out_stdin == out_arg
    assert SUMMARY.match(err.splitlines()[-2]).group(2) == "5"


def test_export_then_info_json_round_trip(capsys, tmp_path, tiny_hf):
    out_dir = tmp_path / "pkg"
    out, _ = ok(capsys, "export", tiny_hf, "-o", out_dir, "--stage-boundaries", "1,3")
    assert out.strip() == f"wrote {out_dir}: llama, 4 layers, 3 stage graph(s)"
    assert leftovers(tmp_path) == []
    out, _ = ok(capsys, "info", out_dir, "--json")
    data = json.loads(out)
    assert Manifest.from_dict(data) == read_manifest(out_dir)  # --json is the whole manifest
    assert [(s["first_layer"], s["end_layer"]) for s in data["stages"]] == [(0, 1), (1, 3), (3, 4)]
    assert data["source"]["format"] == "safetensors" and data["source"]["path"] == str(tiny_hf.resolve())
    # --force replaces a package with a new one
    ok(capsys, "export", tiny_hf, "-o", out_dir, "--force")
    assert len(read_manifest(out_dir).stages) == 1 and leftovers(tmp_path) == []


@pytest.mark.parametrize("command, options", [
    ("pull", ["Fetch a known model into the cache", "name", "omit it to list", "--list"]),
    ("export", ["Export a checkpoint to an ONNX and/or GGUF package", ".gguf file", "--output",
                "--stage-boundaries", "--format", "--dtype", "--force"]),
    ("run", ["Generate from one prompt", "prompt", "'-' reads stdin", "--raw", "--backend", "--device", "--threads",
             "--max-context", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty",
             "--seed", "--stop", "--system"]),
    ("chat", ["empty line or Ctrl-D ends", "--device", "--max-context", "--temperature", "--top-p", "--system"]),
    ("info", ["Show what a package (or checkpoint) contains", "package folder", "--json"]),
])
def test_subcommand_help(capsys, command, options):
    assert _call([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert out.startswith(f"usage: edge-run {command}")
    for option in options:
        assert option in out, f"{command} --help lacks {option}"


def test_help_defaults_match_the_code(capsys):
    assert _call(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pull", "export", "run", "chat", "info"):
        assert command in out
    run = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
               if a.dest == "max_new_tokens")
    assert f"(default: {run.default})" in run.help
    max_context = next(a for a in build_parser()._subparsers._group_actions[0].choices["run"]._actions
                       if a.dest == "max_context")
    assert f"min(model context, {DEFAULT_MAX_CONTEXT})" in max_context.help
    assert _call(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"edge-run {edgerun.__version__}"


# -- through a real subprocess: nothing but the one line reaches the terminal --------------------
def _subprocess(home: Path, *argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGE_RUN_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "edgerun", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=120)


def assert_one_line_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-run: error: ") and expected in lines[0], result.stderr


@pytest.mark.parametrize("case", ["missing path", "usage error", "unsupported arch"])
def test_subprocess_errors_are_one_line(tmp_path, home, case):
    if case == "missing path":
        argv, expected = ["run", tmp_path / "nope", "hi"], f"{tmp_path / 'nope'} is neither a file"
    elif case == "usage error":
        argv, expected = ["run", "model", "hi", "--top-p", "lots"], "invalid float value: 'lots'"
    else:
        argv = ["info", write_mamba_gguf(tmp_path / "m.gguf")]
        expected = "unsupported architecture 'mamba'"
    assert_one_line_failure(_subprocess(home, *argv), expected)
    assert no_packages(home) and leftovers(tmp_path) == []


def test_subprocess_truncated_gguf(tmp_path, home, smollm2_gguf):
    assert home not in smollm2_gguf.parents
    truncated = tmp_path / "t.gguf"
    with open(smollm2_gguf, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    result = _subprocess(home, "export", truncated, "-o", tmp_path / "out")
    assert_one_line_failure(result, f"{truncated} is truncated or corrupt")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
