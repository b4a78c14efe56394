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
    parts = use.weights_resident + use.kv_cache + use.runtime + use.activations + use.process + use.drafts
    assert parts == use.rss and use.runtime >= 0 and use.weights_resident <= use.weights
    assert abs(use.rss - process_rss()) <= 0.1 * use.rss
    assert "KV cache" in use.summary() and use.summary().endswith("MB resident")


def test_memory_report_of_weights_not_all_resident_has_no_negative_runtime(monkeypatch):
    """Memory-mapped weights that loading did not page in entirely (a large fp32 package) show as
    partly resident, not as a negative runtime share."""
    from edgerun.runtime import memory

    monkeypatch.setattr(memory, "process_rss", lambda: 900 * 10**6)
    meter = memory.MemoryMeter()
    meter.before, meter.after_load, meter.weights = 100 * 10**6, 780 * 10**6, 1140 * 10**6
    use = meter.use(kv_bytes=20 * 10**6)
    assert (use.weights, use.weights_resident, use.runtime) == (1140 * 10**6, 680 * 10**6, 0)
    assert use.weights_resident + use.kv_cache + use.runtime + use.activations + use.process + use.drafts == use.rss
    assert "weights 1140 MB (680 MB resident, the rest mapped from the file)" in use.summary()
    meter.weights = 500 * 10**6  # all resident: the rest of what loading added is the runtime's
    use = meter.use(kv_bytes=20 * 10**6)
    assert (use.weights_resident, use.runtime) == (500 * 10**6, 180 * 10**6)
    assert use.summary().startswith("weights 500 MB + KV cache 20 MB + runtime 180 MB")


@pytest.fixture(scope="module")
def f16_pair(tmp_path_factory):
    """The same tiny model exported with an f32 and an f16 KV cache."""
    from edgerun.export.pipeline import ExportOptions

    folder = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-kv", seed=3, initializer_range=0.2)
    root = tmp_path_factory.mktemp("kv")
    export(folder, root / "f32")
    export(folder, root / "f16", ExportOptions(kv_cache="f16"))
    return edgerun.Engine(root / "f32", max_context=128), edgerun.Engine(root / "f16", max_context=128)


def test_f16_kv_cache_halves_the_memory_and_keeps_the_logits(f16_pair):
    f32, f16 = f16_pair
    assert f16.manifest.model.kv_dtype == "float16" and f32.manifest.model.kv_dtype == "float32"
    a, b = f32.backend.new_cache(2, 128), f16.backend.new_cache(2, 128)
    assert b.arrays[0][0].dtype == np.float16 and b.nbytes * 2 == a.nbytes
    tokens = list(range(5, 70))
    reference, ours = f32.logits(tokens), f16.logits(tokens)
    assert np.abs(ours - reference).max() <= 0.05 * reference.std()
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


def test_f16_kv_cache_decodes_batches_speculates_and_serves(f16_pair):
    """Every path that touches the cache takes an f16 one: plain, batched, speculative, the scheduler."""
    _, f16 = f16_pair
    prompts = ["the quick brown fox jumps", "edge run exports"]
    alone = [[r.token for r in f16.generate(p, max_new_tokens=16, ignore_eos=True)] for p in prompts]
    batched = list(f16.generate(prompts, max_new_tokens=16, ignore_eos=True))
    assert [[r.token for r in batched if r.index == i] for i in range(2)] == alone
    spec = [r.token for r in f16.generate(prompts[0], max_new_tokens=16, ignore_eos=True, speculative="lookup")]
    assert spec == alone[0]
    with f16.scheduler(max_batch=2) as scheduler:
        served = [scheduler.submit(p, max_new_tokens=16, ignore_eos=True) for p in prompts]
        assert [h.result().tokens for h in served] == alone


def test_kv_cache_type_mismatches_are_one_line_errors(f16_pair, tmp_path):
    from edgerun.export.pipeline import ExportOptions

    f32, _ = f16_pair
    with pytest.raises(ValueError, match="KV cache is f32.*export with --kv-cache f16"):
        edgerun.Engine(f32.package_dir, kv_cache="f16")
    with pytest.raises(ValueError, match="llama.cpp picks its KV type at run time"):
        ExportOptions(formats=("gguf",), kv_cache="f16")
    with pytest.raises(ValueError, match="--kv-cache must be f32 or f16"):
        ExportOptions(kv_cache="q8")
