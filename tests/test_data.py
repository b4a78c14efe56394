"""The data shipped with edge-run (edgerun.data): found without any setting, overridden by
$EDGE_RUN_DATA, and clear errors for a bad split or an incomplete override folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgerun import data


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv("EDGE_RUN_DATA", raising=False)


def test_shipped_text_and_prompts_are_found_without_a_setting():
    valid, test = data.wikitext("valid"), data.wikitext("test")
    assert test.startswith(" \n = Robert <unk> = \n") and len(test) == 1_255_018
    assert len(valid) == 1_120_192 and valid != test
    prompts = data.mt_bench()
    assert len(prompts) == 80 and {p["question_id"] for p in prompts} == set(range(81, 161))
    assert sorted({p["category"] for p in prompts}) == ["coding", "extraction", "humanities", "math", "reasoning",
                                                         "roleplay", "stem", "writing"]
    assert all(isinstance(p["turns"], list) and p["turns"][0] for p in prompts)


def test_shipped_files_carry_their_license_notes():
    from importlib import resources

    root = resources.files("edgerun.data")
    assert "CC BY-SA 3.0" in root.joinpath("wikitext-2/README").read_text()
    assert "Apache-2.0" in root.joinpath("mt-bench/README").read_text()


def test_found_from_any_working_directory(tmp_path):
    """Through importlib.resources, not the checkout or the current directory."""
    code = "from edgerun import data; print(len(data.wikitext('test')), len(data.mt_bench()))"
    env = {k: v for k, v in os.environ.items() if k != "EDGE_RUN_DATA"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1255018", "80"]


def test_override_folder_replaces_the_shipped_data(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "prompts").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text("valid text")
    (tmp_path / "wikitext-2" / "test.txt").write_text("test text")
    (tmp_path / "prompts" / "mt_bench.jsonl").write_text(
        json.dumps({"question_id": 1, "category": "c", "turns": ["hi"]}) + "\n\n")
    monkeypatch.setenv("EDGE_RUN_DATA", str(tmp_path))
    assert (data.wikitext("valid"), data.wikitext("test")) == ("valid text", "test text")
    assert data.mt_bench() == [{"question_id": 1, "category": "c", "turns": ["hi"]}]
    monkeypatch.setenv("EDGE_RUN_DATA", "")  # empty: as if unset
    assert len(data.mt_bench()) == 80


def test_an_override_folder_missing_a_file_names_it_and_the_fix(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("test text")
    monkeypatch.setenv("EDGE_RUN_DATA", str(tmp_path))
    assert data.wikitext("test") == "test text"
    with pytest.raises(FileNotFoundError, match=r"has no wikitext-2/valid\.txt.*unset EDGE_RUN_DATA") as info:
        data.wikitext("valid")
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"has no prompts/mt_bench\.jsonl"):
        data.mt_bench()


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown WikiText-2 split 'train'; choose one of valid, test"):
        data.wikitext("train")


def test_calibration_uses_the_recipe_file_before_the_shipped_text(tmp_path):
    from edgerun.export.calibrate import calibration_text
    from edgerun.quant.recipe import Calibration

    own = tmp_path / "cal.txt"
    own.write_text("my own calibration text")
    assert calibration_text(Calibration(data=str(own))) == "my own calibration text"
    assert calibration_text(Calibration()) == data.wikitext("valid")
    with pytest.raises(ValueError, match="does not exist"):
        calibration_text(Calibration(data=str(tmp_path / "missing.txt")))
