"""The device-resident KV cache (runtime/device_kv_cache.py) run here on CPU OrtValues.

On CUDA a `--device cuda` package keeps its KV cache in GPU memory: OrtValues allocated on the
device, bound once by address with past and present sharing the buffer, rows bound by address,
host copies only where a feature asks for the contents. The code is written against a device
name, so the cpu profile with `kv_cache: "device"` runs exactly that path on the CPU provider:
greedy output must equal the host cache's, plainly and with lookup speculation at batch 1 and 3,
with no KV copies in any step; prompt-cache save/restore must count its copies.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import build_tiny_llama, count_kv_copies

import edgerun
from edgerun.devices.profiles import get_profile, load_profiles
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.device_kv_cache import DeviceKVCache, DeviceSpan
from edgerun.runtime.kv_cache import KVCache
from edgerun.runtime.scheduler import Scheduler

PROMPTS = ["the quick brown fox the quick brown fox", "edge run exports", "over the lazy dog over the lazy"]


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    """A tiny random Llama exported with an fp16 KV cache (the attention type of the cuda variant)."""
    hf = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=5, initializer_range=0.2)
    out = tmp_path_factory.mktemp("pkg") / "tiny-f16"
    export(hf, out, ExportOptions(kv_cache="f16"))
    return out


def _resident(monkeypatch, package, **kwargs) -> edgerun.Engine:
    """An engine on the cpu profile with its KV cache on the 'device' (CPU OrtValues)."""
    monkeypatch.setitem(load_profiles(), "cpu", dataclasses.replace(get_profile("cpu"), kv_cache="device"))
    return edgerun.Engine(package, max_context=96, threads=1, **kwargs)


def _tokens(engine, prompts, **options) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for r in engine.generate(prompts, max_new_tokens=24, **options):
        out[r.index].append(r.token)
    return out


def test_the_profile_puts_an_f16_cache_on_the_device(tiny_f16, monkeypatch):
    host = edgerun.Engine(tiny_f16, max_context=96, threads=1)
    assert host.backend.kv_device is None and isinstance(host.backend.new_cache(1, 8), KVCache)
    engine = _resident(monkeypatch, tiny_f16)
    cache = engine.backend.new_cache(2, 16)
    assert engine.backend.kv_device == "cpu" and isinstance(cache, DeviceKVCache)
    assert all(isinstance(s, DeviceSpan) and s.shape == (2, 2, 17, 16) and s.dtype == np.float16
               for s in cache.keys + cache.values)
    assert cache.nbytes == 2 * 4 * 2 * 2 * 17 * 16 * 2
    row = cache.row(1).keys[0]
    assert row.shape == (1, 2, 17, 16) and row.ptr == cache.keys[0].ptr + 2 * 17 * 16 * 2  # by address
    with pytest.raises(ValueError, match="exceeds the cache"):
        cache.reserve(18)


@pytest.mark.parametrize("speculative", [None, "lookup"])
def test_greedy_output_equals_the_host_cache_with_no_kv_copies(tiny_f16, monkeypatch, speculative):
    host = edgerun.Engine(tiny_f16, max_context=96, threads=1)
    expected = _tokens(host, PROMPTS)
    engine = _resident(monkeypatch, tiny_f16)
    steps = count_kv_copies(engine.backend)
    options = {"speculative": speculative, "draft_tokens": 3} if speculative else {}
    assert _tokens(engine, PROMPTS[:1], **options) == expected[:1]  # batch 1
    assert _tokens(engine, PROMPTS, **options) == expected  # batch 3, unequal lengths
    cache = engine._kv
    assert isinstance(cache, DeviceKVCache) and cache.host_copies == 0
    assert len(steps) > 20 and set(steps) == {0} and engine.backend.kv_copies == 0
    if speculative:  # drafts were accepted and rejected ones rolled back (offsets only: nothing copied)
        assert any(r.from_draft for r in engine.generate(PROMPTS, max_new_tokens=24, **options))
        assert set(steps) == {0} and cache.host_copies == 0


def test_logits_equal_the_host_cache(tiny_f16, monkeypatch):
    tokens = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]
    host = edgerun.Engine(tiny_f16, max_context=96, threads=1).logits(tokens)
    np.testing.assert_array_equal(_resident(monkeypatch, tiny_f16).logits(tokens), host)


def test_row_copies_stay_on_the_device_and_host_copies_are_counted(tiny_f16, monkeypatch):
    engine = _resident(monkeypatch, tiny_f16)
    backend = engine.backend
    cache = backend.new_cache(3, 32)
    tokens = np.array([[5, 17, 42, 99, 3, 250]], dtype=np.int64)
    backend.forward(np.repeat(tokens, 3, axis=0), cache, np.array([6, 6, 6]), np.array([[5]] * 3))
    saved = cache.save_row(0, 6)
    assert cache.host_copies == 2 * 4 and [s.shape for s in saved[:1]] == [(2, 6, 16)]
    cache.copy_row(0, 2, 4)  # on the device: not a host copy
    assert cache.host_copies == 8 and cache.lengths.tolist() == [6, 6, 4]
    assert all(np.array_equal(a, b[:, :4]) for a, b in zip(cache.save_row(2, 4), saved))
    cache.load_row(saved, 1, 5)
    assert cache.host_copies == 8 + 8 + 8 and cache.lengths[1] == 5
    assert all(np.array_equal(a, b[:, :5]) for a, b in zip(cache.save_row(1, 5), saved))


def test_scheduler_and_prompt_cache_on_the_device_cache(tiny_f16, monkeypatch):
    reference = edgerun.Engine(tiny_f16, max_context=96, threads=1)
    engine = _resident(monkeypatch, tiny_f16)
    first = engine.encode(PROMPTS[2])
    with Scheduler(engine, max_batch=2, prefill_chunk=4, prompt_cache_bytes=1 << 20) as scheduler:
        assert isinstance(scheduler.cache, DeviceKVCache)
        turn1 = scheduler.submit(first, max_new_tokens=8).result()
        second = first + turn1.tokens + engine.encode(" and the fox", add_special_tokens=False)
        turn2 = scheduler.submit(second, max_new_tokens=8).result()  # a prefix from a row
        assert turn2.usage.cached_tokens >= len(first)
        assert turn2.tokens == [r.token for r in reference.generate(second, max_new_tokens=8)]
        for prompt in PROMPTS:  # push it out of the rows into host memory
            scheduler.submit(prompt, max_new_tokens=4).result()
        again = scheduler.submit(second + [5, 6], max_new_tokens=8).result()
        assert again.usage.cached_tokens >= len(second)
        assert again.tokens == [r.token for r in reference.generate(second + [5, 6], max_new_tokens=8)]
        assert scheduler.cache.host_copies > 0  # saved to and restored from host memory, counted
