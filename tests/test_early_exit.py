"""Early exit: never-exit equals plain decoding; deferred layers fill the KV the full model would."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.exits import fit_exits
from edgerun.export.package import write_package
from edgerun.runtime.early_exit import EarlyExitRunner, exit_points, threshold_for

PROMPT = [5, 17, 42, 99, 3, 250, 7, 61]


@pytest.fixture(scope="module")
def exit_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit")
    ckpt = load_checkpoint(build_tiny_llama(root / "hf", seed=6, num_hidden_layers=6))
    rng = np.random.default_rng(0)
    windows = [rng.integers(3, ckpt.spec.vocab_size, 48).tolist() for _ in range(8)]
    exits = fit_exits(ckpt, [2, 4], windows)
    write_package(ckpt, root / "pkg", stage_boundaries=[2, 4], separate_head=True, exits=exits)
    return edgerun.Engine(root / "pkg", max_context=128)


def test_never_exit_equals_plain_decoding(exit_engine):
    # random weights: ignore_eos runs every generation to its full length
    plain = [r.token for r in exit_engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True)]
    never = list(exit_engine.generate(PROMPT, max_new_tokens=24, exit_threshold=1.01, ignore_eos=True))
    assert [r.token for r in never] == plain
    assert all(r.exit_layer is None for r in never)
    assert exit_engine.exit_layers == [6] * 24


def test_always_exit_reports_the_first_exit(exit_engine):
    responses = list(exit_engine.generate(PROMPT, max_new_tokens=12, exit_threshold=0.0, ignore_eos=True))
    layers = [r.exit_layer for r in responses]
    assert layers[0] is None  # the first token comes from the prefill
    # every exit passes threshold 0; the probe gate (95% recall) may send a few tokens deeper
    assert layers[1:].count(2) >= 8 and set(layers[1:]) <= {2, 4, None}
    assert np.mean(exit_engine.exit_layers) < 6


def test_deferred_layers_fill_the_kv_of_the_full_model(exit_engine):
    """Tokens that exit at layer 2 get layers 2..5 later, batched with the next deep token."""
    engine = exit_engine
    tokens = PROMPT + [11, 12, 13, 14, 15]
    shallow = [dataclasses.replace(p, probe=None)  # no probe gate: every token exits at layer 2
               for p in exit_points(engine.package_dir, engine.manifest, threshold=0.0)]
    deep = exit_points(engine.package_dir, engine.manifest, threshold=2.0)
    cache = engine.backend.new_cache(1, 64)
    engine.prefill([PROMPT], cache)
    runner = EarlyExitRunner(engine.backend, cache, shallow)
    for pos, tok in enumerate(tokens[len(PROMPT):-1], start=len(PROMPT)):
        assert runner.step(tok, pos)[1] == 2
    runner.points = {p.stage: p for p in deep}  # the last token goes deep and flushes the deferral
    logits, layer = runner.step(tokens[-1], len(tokens) - 1)
    assert layer is None
    full = engine.backend.new_cache(1, 64)
    ref = engine.prefill([tokens], full)[0]
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    n = len(tokens)
    for layer_index in range(6):
        for ours, theirs in ((cache.arrays[0][layer_index], full.arrays[0][layer_index]),
                             (cache.arrays[1][layer_index], full.arrays[1][layer_index])):
            np.testing.assert_allclose(ours[:, :, :n], theirs[:, :, :n], atol=1e-5, rtol=0)


def test_quality_levels_map_to_thresholds(exit_engine):
    curve = {"threshold": [0.9, 0.7, 0.5, 0.2], "agreement": [1.0, 0.97, 0.9, 0.6]}
    assert threshold_for(curve, 0.95) == 0.7
    assert threshold_for(curve, 1.0) == 0.9
    assert threshold_for({"threshold": [0.9], "agreement": [0.5]}, 0.95) == float("inf")
    points = exit_points(exit_engine.package_dir, exit_engine.manifest, quality=0.95)
    assert [p.layer for p in points] == [2, 4]
    assert all(p.adapter.shape == (65, 64) and p.probe.shape == (65,) for p in points)


def test_bad_early_exit_requests(exit_engine, tmp_path):
    with pytest.raises(ValueError, match="agreement level"):
        exit_engine.generate(PROMPT, early_exit=1.5)
    with pytest.raises(ValueError, match="one prompt"):
        exit_engine.generate([PROMPT, PROMPT], early_exit=0.9)
    write_package(load_checkpoint(build_tiny_llama(tmp_path / "hf")), tmp_path / "plain")
    plain = edgerun.Engine(tmp_path / "plain")
    with pytest.raises(ValueError, match="no early exits"):
        plain.generate(PROMPT, early_exit=0.9)


def test_staged_decoding_on_llamacpp_is_a_clear_error(tmp_path):
    """llama.cpp runs the whole GGUF per call: early exit and self-speculation say so up front."""
    write_package(load_checkpoint(build_tiny_llama(tmp_path / "hf", num_hidden_layers=4)), tmp_path / "pkg",
                  stage_boundaries=[2], separate_head=True, formats=("onnx", "gguf"))
    engine = edgerun.Engine(tmp_path / "pkg", backend="llamacpp", max_context=32)
    fix = r"the llamacpp backend \(llama.cpp\) runs the whole model in one call: load it with backend='onnx'"
    with pytest.raises(ValueError, match="early exit needs the onnx backend.*" + fix):
        engine.generate(PROMPT, early_exit=0.9)
    with pytest.raises(ValueError, match=r"self-speculation \(self:2\) needs the onnx backend.*" + fix):
        engine.generate(PROMPT, speculative="self:2")
    with pytest.raises(ValueError, match=fix):
        EarlyExitRunner(engine.backend, engine.backend.new_cache(1, 32), [])


def test_oracle_bound_uses_the_first_agreeing_exit(exit_engine):
    from conftest import experiment

    early_exit = experiment("early_exit")  # bench/experiments/early_exit.py
    exit_top1, oracle_layers = early_exit.exit_top1, early_exit.oracle_layers

    tokens = PROMPT + [11, 12, 13, 14, 15]
    exits, full = exit_top1(exit_engine, tokens)
    assert sorted(exits) == [2, 4]
    np.testing.assert_array_equal(full, exit_engine.logits(tokens).argmax(-1))  # the staged run is the model
    full = np.array([7, 7, 7, 7, 7])
    exits = {2: np.array([7, 1, 1, 1, 1]), 4: np.array([0, 7, 7, 1, 1])}
    np.testing.assert_array_equal(oracle_layers(exits, full, 6), [2, 4, 4, 6, 6])
    np.testing.assert_array_equal(oracle_layers(exits, full, 6, quality=0.8), [2, 4, 4, 2, 6])


class _FakeClock:
    """Seconds that advance by what the runner's step is made to cost."""

    def __init__(self):
        self.now, self.cost = 0.0, {True: 1.0, False: 1.0}

    def __call__(self):
        return self.now


def _guarded_steps(engine, exit_cost: float, full_cost: float, steps: int):
    """Run `steps` tokens through a guarded runner whose steps take exit_cost (a step that tried
    exits) or full_cost seconds on a fake clock; the guard and the exit layers."""
    from edgerun.runtime.early_exit import ExitGuard

    clock = _FakeClock()
    guard = ExitGuard(baseline=2, trial=3, backoff=4, clock=clock)
    points = [dataclasses.replace(p, probe=None) for p in exit_points(engine.package_dir, engine.manifest,
                                                                      threshold=0.0)]
    cache = engine.backend.new_cache(1, 64)
    engine.prefill([PROMPT], cache)
    runner = EarlyExitRunner(engine.backend, cache, points, guard)
    layers = []
    for pos in range(len(PROMPT), len(PROMPT) + steps):
        tried = guard.exits_on
        original = runner._step

        def timed(token, position, exits, original=original, tried=tried):
            clock.now += exit_cost if tried else full_cost
            return original(token, position, exits)

        runner._step = timed
        layers.append(runner.step(11, pos)[1])
        runner._step = original
    return guard, layers


def test_guard_turns_exits_off_when_they_do_not_pay(exit_engine):
    guard, layers = _guarded_steps(exit_engine, exit_cost=1.3, full_cost=1.0, steps=20)
    # baseline 2 full steps, a trial of 3 exits + 1 settling step that loses, 4 off, a second trial
    assert layers[:2] == [None, None] and layers[2:5] == [2, 2, 2] and layers[5:10] == [None] * 5
    assert guard.failed == 2 and guard.phase == "off" and guard.backoff == 16
    assert layers[10:13] == [2, 2, 2] and all(layer is None for layer in layers[13:])


def test_guard_keeps_exits_that_pay(exit_engine):
    guard, layers = _guarded_steps(exit_engine, exit_cost=0.5, full_cost=1.0, steps=20)
    assert guard.failed == 0 and guard.phase == "on"
    assert layers.count(2) >= 12  # every step but the baseline and one settling step per trial


def test_a_quality_level_is_guarded_and_a_raw_threshold_is_not(exit_engine, monkeypatch):
    from edgerun.runtime import engine as engine_module

    guards = []

    class Recording(EarlyExitRunner):
        def __init__(self, backend, cache, points, guard=None):
            guards.append(guard)
            super().__init__(backend, cache, points, guard)

    monkeypatch.setattr(engine_module, "EarlyExitRunner", Recording)
    list(exit_engine.generate(PROMPT, max_new_tokens=4, early_exit=0.5, ignore_eos=True))
    list(exit_engine.generate(PROMPT, max_new_tokens=4, exit_threshold=0.5, ignore_eos=True))
    assert guards[0] is not None and guards[1] is None
