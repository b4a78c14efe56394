"""Evaluation prompt sets: every category in both parts, deterministic, the parts disjoint."""
from __future__ import annotations

import pytest

from edgerun.bench.prompt_sets import CATEGORIES, prompt_set, prompt_sets
from edgerun.bench.speculative_runs import _texts, mean_speedups


def test_every_category_has_distinct_tune_and_heldout_prompts():
    tune, heldout = prompt_sets("tune", 3), prompt_sets("heldout", 3)
    assert list(tune) == list(heldout) == list(CATEGORIES)
    for category in CATEGORIES:
        assert len(tune[category]) == len(heldout[category]) == 3
        assert not set(tune[category]) & set(heldout[category])
    assert prompt_sets("heldout", 3) == heldout  # deterministic
    assert all(len(p.split()) >= 300 for p in heldout["summarization"])  # long prompts
    assert all(p.count("Passage ") == 3 and "Question:" in p for p in heldout["rag_qa"])


def test_bad_category_or_split_is_named():
    with pytest.raises(ValueError, match="unknown prompt category 'poetry'"):
        prompt_set("poetry", "tune")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        prompt_set("math", "test")


def test_bench_names_sets_by_split_and_averages_each_part():
    texts = _texts(["math", "all"], ["tune", "heldout"], 1)
    assert len(texts) == 2 * len(CATEGORIES) and "math[heldout]" in texts
    def row(prompts, speedup, identical=True):
        return {"prompts": prompts, "drafter": "auto", "speedup": speedup, "decode_speedup": speedup,
                "identical": identical}

    results = [row("math[heldout]", 1.2), row("chat[heldout]", 1.0), row("chat[tune]", 2.0, False)]
    means = {m["part"]: m for m in mean_speedups(results)}
    assert means["heldout"]["speedup"] == pytest.approx(1.1) and means["heldout"]["min_speedup"] == 1.0
    assert means["tune"]["sets"] == 1 and not means["tune"]["identical"]
