"""The continuous-batching scheduler (runtime/scheduler.py) on a tiny fp32 model, both backends.

Concurrent requests (more than the rows, prompts prefilled in small chunks while others decode)
must each equal what engine.generate gives them alone, greedy and seeded sampling alike; stop
strings, logprobs, cancellation from another thread or task, and the prompt cache.
"""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import edgerun
from edgerun.runtime.scheduler import Scheduler

PROMPTS = ["the quick brown fox", "edge run exports small language models to onnx", "over the lazy dog " * 8,
           "onnx", "jumps over the quick brown dog and the lazy fox", "small models " * 3, "the", "dog dog"]


@pytest.fixture(scope="module", params=["onnx", "llamacpp"])
def engines(request, tiny_fp32):
    """(engine the scheduler owns, a second engine for reference runs) on one backend."""
    make = lambda: edgerun.Engine(tiny_fp32, max_context=128, threads=1, backend=request.param)  # noqa: E731
    return make(), make()


def _scheduler(engine, **kwargs) -> Scheduler:
    return Scheduler(engine, **{"max_batch": 3, "prefill_chunk": 4, **kwargs})


def _alone(engine, prompt, **kwargs) -> list[int]:
    return [r.token for r in engine.generate(prompt, **kwargs)]


def _alone_text(engine, prompt, **kwargs) -> str:
    return "".join(r.text for r in engine.generate(prompt, **kwargs))


def _wait_idle(scheduler: Scheduler, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (scheduler.running or scheduler.queue_depth) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.running == 0 and scheduler.queue_depth == 0


def test_concurrent_greedy_requests_equal_their_single_runs(engines):
    engine, reference = engines
    lengths = [5, 17, 9, 30, 12, 3, 21, 8]
    expected = [_alone(reference, p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]
    with _scheduler(engine, prompt_cache_bytes=0) as scheduler:
        handles = [scheduler.submit(p, max_new_tokens=n) for p, n in zip(PROMPTS, lengths)]  # 8 requests, 3 rows
        results = [h.result() for h in handles]
        _wait_idle(scheduler)
        stats = scheduler.stats
    for prompt, want, got in zip(PROMPTS, expected, results):
        assert got.tokens == want, prompt
        assert got.usage.prompt_tokens == len(engine.encode(prompt))
        assert got.usage.completion_tokens == len(want)
        assert got.finish_reason == ("stop" if want[-1] in engine.eos_token_ids else "length")
        assert got.text == _alone_text(reference, prompt, max_new_tokens=len(want))
        t = got.timings
        assert 0 <= t.queued <= t.first_token <= t.total
    assert stats.generated_tokens == sum(map(len, expected))
    assert stats.step_rows > stats.steps  # rows did share decode steps
    assert stats.finished == {"length": 8} or sum(stats.finished.values()) == 8


def test_sampling_seed_stop_and_logprobs(engines):
    engine, reference = engines
    prompt = PROMPTS[1]
    sampled = dict(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=7, max_new_tokens=20)
    want_sampled = _alone(reference, prompt, **sampled)
    greedy_text = reference.complete(prompt, max_new_tokens=24, ignore_eos=True)
    stop = greedy_text[len(greedy_text) // 2:len(greedy_text) // 2 + 3]
    with _scheduler(engine) as scheduler:
        h_sampled = scheduler.submit(prompt, **sampled)
        h_stop = scheduler.submit(prompt, max_new_tokens=24, stop=[stop], ignore_eos=True)
        h_logprobs = scheduler.submit(prompt, max_new_tokens=6, logprobs=3)
        r_sampled, r_stop, r_logprobs = h_sampled.result(), h_stop.result(), h_logprobs.result()
    assert r_sampled.tokens == want_sampled
    assert r_stop.finish_reason == "stop" and r_stop.text == greedy_text[:greedy_text.find(stop)]
    for r in r_logprobs.responses:
        assert r.logprob <= 0 and len(r.top_logprobs) == 3
        assert r.top_logprobs[0][0] == r.token  # greedy: the token is the most likely one
        assert r.logprob == pytest.approx(r.top_logprobs[0][1])
        assert [lp for _, lp in r.top_logprobs] == sorted((lp for _, lp in r.top_logprobs), reverse=True)
    assert np.exp([r.logprob for r in r_logprobs.responses]).max() <= 1.0


def test_cancel_from_another_thread_frees_the_row_for_the_queue(engines):
    engine, reference = engines
    with _scheduler(engine, max_batch=1) as scheduler:
        long = scheduler.submit(PROMPTS[0], max_new_tokens=100, ignore_eos=True)
        waiting = scheduler.submit(PROMPTS[3], max_new_tokens=5)
        assert scheduler.queue_depth >= 1 or scheduler.running == 1
        received = []
        for r in long:
            received.append(r)
            if len(received) == 3:
                threading.Thread(target=long.cancel).start()
        assert long.finish_reason == "cancelled" and long.cancelled
        assert 3 <= len(received) < 100
        assert waiting.result().tokens == _alone(reference, PROMPTS[3], max_new_tokens=5)
        _wait_idle(scheduler)
        assert scheduler.stats.finished.get("cancelled") == 1
        waiting_cancelled = [scheduler.submit(PROMPTS[2], max_new_tokens=50) for _ in range(3)]
        for h in waiting_cancelled:
            h.cancel()
        assert all(h.result().finish_reason == "cancelled" for h in waiting_cancelled)
        _wait_idle(scheduler)


def test_agenerate_and_task_cancellation(engines, tiny_fp32):
    engine, reference = engines
    want = _alone(reference, PROMPTS[4], max_new_tokens=10)

    async def main():
        got = [r.token async for r in engine.agenerate(PROMPTS[4], max_new_tokens=10)]
        assert got == want

        started = asyncio.Event()

        async def consume():
            async for _ in engine.agenerate(PROMPTS[0], max_new_tokens=100, ignore_eos=True):
                started.set()
                await asyncio.sleep(0.05)  # a slow client: the request is still running when cancelled

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.scheduler().running == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    scheduler = engine.scheduler()
    _wait_idle(scheduler)
    assert scheduler.stats.finished.get("cancelled", 0) >= 1
    scheduler.close()
    assert engine.scheduler() is not scheduler  # a closed scheduler is replaced on the next use
    engine.scheduler().close()


def test_prompt_cache_reuses_a_prefix_and_output_is_unchanged(engines):
    engine, reference = engines
    first = engine.encode(PROMPTS[2])
    with _scheduler(engine, prompt_cache_bytes=1 << 20) as scheduler:
        turn1 = scheduler.submit(first, max_new_tokens=8).result()
        second = first + turn1.tokens + engine.encode(" and the fox", add_special_tokens=False)
        turn2 = scheduler.submit(second, max_new_tokens=8).result()
        assert turn2.usage.cached_tokens >= len(first)
        assert turn2.tokens == _alone(reference, second, max_new_tokens=8)
        # many other sequences push it out of the rows into host memory, within the budget
        others = [scheduler.submit(p, max_new_tokens=4) for p in PROMPTS[3:]]
        [h.result() for h in others]
        turn2b = scheduler.submit(second + [5, 6], max_new_tokens=8).result()
        assert turn2b.usage.cached_tokens >= len(second)
        assert turn2b.tokens == _alone(reference, second + [5, 6], max_new_tokens=8)
        assert scheduler.prompt_cache.stats.stored_bytes <= 1 << 20
        # a prefix of a running sequence is copied from its row
        fresh = engine.encode("lazy fox " * 10)
        running = scheduler.submit(fresh, max_new_tokens=60, ignore_eos=True)
        next(running)
        extended = fresh + [7, 8, 9]
        copied = scheduler.submit(extended, max_new_tokens=6).result()
        assert copied.usage.cached_tokens >= len(fresh)
        assert copied.tokens == _alone(reference, extended, max_new_tokens=6)
        running.cancel()
    with _scheduler(engine, prompt_cache_bytes=0) as scheduler:
        scheduler.submit(first, max_new_tokens=8).result()
        assert scheduler.submit(second, max_new_tokens=8).result().usage.cached_tokens == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=""), "empty"),
    (dict(prompt=[1] * 128), "context holds 128"),
    (dict(prompt="hi", max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="hi", logprobs=21), "logprobs"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(prompt="hi", seed=-3), "seed must be a non-negative"),
    (dict(prompt=[1, 2, 10 ** 6]), "token ids"),
])
def test_bad_requests_fail_at_submit(engines, kwargs, message):
    engine, _ = engines
    with _scheduler(engine) as scheduler, pytest.raises(ValueError, match=message):
        scheduler.submit(**kwargs)


@pytest.fixture(scope="module")
def repetitive(tmp_path_factory):
    """A tiny model at Hugging Face's default initialisation: it repeats itself, so lookup drafts pass."""
    from conftest import build_tiny_llama

    from edgerun.export.pipeline import ExportOptions, export

    folder = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-repeat", seed=5)
    out = tmp_path_factory.mktemp("pkg") / "tiny-repeat"
    export(folder, out, ExportOptions(formats=("onnx", "gguf")))
    return out


@pytest.mark.parametrize("backend", ["onnx", "llamacpp"])
def test_lookup_speculation_in_the_batch_equals_plain(repetitive, backend):
    engine, reference = (edgerun.Engine(repetitive, max_context=128, threads=1, backend=backend) for _ in range(2))
    prompts = [p * 2 for p in PROMPTS[:5]]
    expected = [_alone(reference, p, max_new_tokens=24, ignore_eos=True) for p in prompts]
    with _scheduler(engine, speculative="lookup", speculate_rows=2, max_batch=3) as scheduler:
        handles = [scheduler.submit(p, max_new_tokens=24, ignore_eos=True, logprobs=1) for p in prompts]
        results = [h.result() for h in handles]
        stats = scheduler.stats
    assert [r.tokens for r in results] == expected
    assert stats.drafts_accepted > 0 and any(r.from_draft for x in results for r in x.responses)
    for x in results:  # logprobs of accepted drafts come from the verification pass
        assert all(r.top_logprobs[0][0] == r.token for r in x.responses)
    for mode in ("self:2", "suffix", "auto"):
        with pytest.raises(ValueError, match=f"not '{mode}'"):
            _scheduler(engine, speculative=mode)


def test_draft_model_speculation_in_the_batch_equals_plain(repetitive, tmp_path):
    """A draft model drafts for every row from its own cache rows: greedy output unchanged, sampled
    requests keep their seeds' tokens' distribution (checked here: they run and finish)."""
    from conftest import build_tiny_llama

    from edgerun.export.pipeline import export

    export(build_tiny_llama(tmp_path / "hf", seed=6, num_hidden_layers=2), tmp_path / "draft")
    engine, reference = (edgerun.Engine(repetitive, max_context=128, threads=1) for _ in range(2))
    prompts = [p * 2 for p in PROMPTS[:4]]
    expected = [_alone(reference, p, max_new_tokens=24, ignore_eos=True) for p in prompts]
    with _scheduler(engine, speculative=f"draft:{tmp_path / 'draft'}", speculate_rows=2, max_batch=3) as scheduler:
        handles = [scheduler.submit(p, max_new_tokens=24, ignore_eos=True) for p in prompts]
        sampled = scheduler.submit(prompts[0], max_new_tokens=12, temperature=0.8, seed=1)
        results = [h.result() for h in handles]
        assert len(sampled.result().tokens) >= 1
        stats = scheduler.stats
    assert [r.tokens for r in results] == expected
    assert stats.drafts_proposed > 0


def test_lookup_speculation_on_quantized_weights_is_exact(tmp_path):
    """int4 weights: the speculating scheduler runs invariant steps, so each request's greedy output
    equals plain greedy of a batch-invariant engine (issue 24's promise, in the server too)."""
    from conftest import build_tiny_llama

    from edgerun.export.pipeline import ExportOptions, export

    export(build_tiny_llama(tmp_path / "hf", seed=5), tmp_path / "int4", ExportOptions(quant="int4"))
    reference = edgerun.Engine(tmp_path / "int4", max_context=128, threads=1, batch_invariant=True)
    engine = edgerun.Engine(tmp_path / "int4", max_context=128, threads=1)
    prompts = [p * 2 for p in PROMPTS[:4]]
    expected = [_alone(reference, p, max_new_tokens=24, ignore_eos=True) for p in prompts]
    with _scheduler(engine, speculative="lookup", speculate_rows=2, max_batch=2) as scheduler:
        assert type(scheduler.backend).__name__ == "InvariantSteps"
        results = [h.result() for h in [scheduler.submit(p, max_new_tokens=24, ignore_eos=True) for p in prompts]]
    assert [r.tokens for r in results] == expected
    with _scheduler(engine, speculative="lookup", exact=False) as scheduler:
        assert scheduler.backend is engine.backend


def test_prompt_cache_source_survives_the_eviction_it_causes(engines):
    """A request reusing the least recently stored sequence, in a row whose old sequence must be
    stored too (evicting that one to make room): the source is kept aside, so it is not lost."""
    engine, reference = engines
    a, b, c = (engine.encode(p) for p in ("the quick brown fox " * 3, "lazy dog " * 6, "edge run onnx " * 4))
    with _scheduler(engine, max_batch=1, prompt_cache_bytes=1) as scheduler:
        per_token = scheduler.prompt_cache._bytes_per_token()
        scheduler.prompt_cache.budget = 2 * (max(map(len, (a, b, c))) + 4) * per_token  # two sequences
        for prompt in (a, b, c):
            scheduler.submit(prompt, max_new_tokens=4, ignore_eos=True).result()
        d = a + [7, 8]
        got = scheduler.submit(d, max_new_tokens=6).result()
        assert got.usage.cached_tokens >= len(a) and scheduler.prompt_cache.stats.evicted >= 1
        assert got.tokens == _alone(reference, d, max_new_tokens=6)
        assert scheduler.alive and scheduler.prompt_cache.stats.stored_bytes <= scheduler.prompt_cache.budget
