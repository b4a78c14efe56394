"""Data sets that ship with edge-run: WikiText-2 validation and test text, and the MT-Bench prompts.

The files sit gzip-compressed inside this package (wikitext-2/, mt-bench/, each with its
attribution and license notes) and are found through `importlib.resources`, so they work from a
wheel installed anywhere. `EDGE_RUN_DATA` overrides them with a folder of plain files laid out
the same way: wikitext-2/valid.txt, wikitext-2/test.txt, prompts/mt_bench.jsonl.

WikiText-2 (Merity et al., 2016; CC BY-SA 3.0): `valid` for calibration and tuning, `test` only
for reporting. MT-Bench (Zheng et al., 2023; Apache-2.0): 80 chat prompts in 8 categories.
"""
from __future__ import annotations

import gzip
import json
import os
from importlib import resources
from pathlib import Path

ENV = "EDGE_RUN_DATA"
SPLITS = ("valid", "test")
_WIKITEXT = "wikitext-2/{split}.txt"
_MT_BENCH = "prompts/mt_bench.jsonl"
# file in an $EDGE_RUN_DATA folder -> its gzip copy here ("mt-bench", not an importable name, so
# setuptools does not take the folder for a package)
_SHIPPED = {_WIKITEXT.format(split=s): f"wikitext-2/{s}.txt.gz" for s in SPLITS} | {
    _MT_BENCH: "mt-bench/mt_bench.jsonl.gz"}


def override() -> Path | None:
    """The folder `$EDGE_RUN_DATA` names, or None when it is unset or empty."""
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def _read(name: str) -> str:
    """The text of data file `name` (e.g. "wikitext-2/test.txt"): from $EDGE_RUN_DATA when set,
    else the gzip copy shipped in this package.

    Raises:
        FileNotFoundError: the override folder lacks the file, or the installed copy is incomplete.
    """
    folder = override()
    if folder is not None:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{ENV}={folder} has no {name}; put the file there (the folder needs "
                                    f"wikitext-2/valid.txt, wikitext-2/test.txt and {_MT_BENCH}) or unset "
                                    f"{ENV} to use the data shipped with edge-run")
        return path.read_text(encoding="utf-8")
    shipped = resources.files(__name__).joinpath(_SHIPPED[name])
    if not shipped.is_file():
        raise FileNotFoundError(f"edge-run's shipped data file {_SHIPPED[name]} is missing from {__name__}; "
                                f"reinstall edge-run, or set {ENV} to a folder holding {name}")
    return gzip.decompress(shipped.read_bytes()).decode("utf-8")


def wikitext(split: str = "test") -> str:
    """WikiText-2 (v1 as distributed: tokenized, rare words as <unk>) of one split.

    Args:
        split: "valid" (calibration, tuning) or "test" (reporting only).
    Returns:
        The whole split as one string, exactly as distributed.
    Raises:
        ValueError: an unknown split. FileNotFoundError: see `_read`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; choose one of {', '.join(SPLITS)}")
    return _read(_WIKITEXT.format(split=split))


def mt_bench() -> list[dict]:
    """The 80 MT-Bench questions in file order, each a dict with question_id, category, turns
    (the user turns) and, for some, reference."""
    return [json.loads(line) for line in _read(_MT_BENCH).splitlines() if line.strip()]
