"""The ONNX KV cache grows on demand (keeping its contents), rolls back by moving offsets, and its
growth never changes what a generation computes."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.pipeline import export
from edgerun.runtime.kv_cache import GROWTH


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-long", seed=5, initializer_range=0.2,
                              max_position_embeddings=1024)
    package = tmp_path_factory.mktemp("pkg") / "tiny-long"
    export(folder, package)
    return edgerun.Engine(package, max_context=700)


def test_cache_starts_small_and_grows_with_the_sequence(engine):
    cache = engine.backend.new_cache(2, 700)
    assert cache.capacity == GROWTH and cache.nbytes == 2 * GROWTH * cache.bytes_per_position()
    version = cache.version
    cache.reserve(GROWTH + 1)
    assert cache.capacity == 2 * GROWTH and cache.version == version + 1
    cache.reserve(701)  # max_len + 1: the scratch slot
    assert cache.capacity == 701
    with pytest.raises(ValueError, match="exceeds the cache .700.; raise max_context"):
        cache.reserve(702)


def test_growth_keeps_the_cached_positions(engine):
    cache = engine.backend.new_cache(2, 700)
    rng = np.random.default_rng(0)
    for side in cache.arrays:
        for a in side:
            a[:, :, :100] = rng.standard_normal(a[:, :, :100].shape)
    cache.lengths[:] = [100, 40]
    before = [a[:, :, :100].copy() for side in cache.arrays for a in side]
    cache.reserve(600)
    after = [a[:, :, :100] for side in cache.arrays for a in side]
    assert all(np.array_equal(x, y) for x, y in zip(before, after))
    assert cache.lengths.tolist() == [100, 40]
    row = cache.row(1)
    assert row.keys[0].shape() == [1, cache.arrays[0][0].shape[1], cache.capacity, cache.arrays[0][0].shape[3]]


def test_generation_across_growth_equals_one_full_pass(engine):
    """Greedy tokens decoded step by step through two growth steps equal the argmax of one
    full pass over the same sequence (which allocates its cache at once)."""
    prompt = [5, 17, 42, 99, 3]
    tokens = [r.token for r in engine.generate(prompt, max_new_tokens=2 * GROWTH + 20, ignore_eos=True)]
    assert engine._kv.capacity > 2 * GROWTH
    logits = engine.logits(prompt + tokens[:-1])
    assert np.argmax(logits[len(prompt) - 1:], axis=-1).tolist() == tokens


def test_rollback_after_growth_then_redecode_is_identical(engine):
    prompt = [7, 61, 12, 200, 33]
    first = [r.token for r in engine.generate(prompt, max_new_tokens=GROWTH + 10, ignore_eos=True,
                                               speculative="lookup", draft_tokens=4)]
    plain = [r.token for r in engine.generate(prompt, max_new_tokens=GROWTH + 10, ignore_eos=True)]
    assert first == plain


def test_memory_report_adds_up_to_the_process_rss(engine):
    from edgerun.runtime.memory import process_rss

    list(engine.generate([5, 17, 42], max_new_tokens=300, ignore_eos=True))
    use = engine.memory()
    assert use.kv_cache == engine._kv.nbytes == engine._kv.capacity * engine._kv.bytes_per_position()
    assert use.weights == sum(f.stat().st_size for f in engine.package_dir.glob("stage*.onnx*"))
    parts = use.weights + use.kv_cache + use.runtime + use.activations + use.process
    assert parts == use.rss and abs(use.rss - process_rss()) <= 0.1 * use.rss
    assert "KV cache" in use.summary() and use.summary().endswith("MB resident")
