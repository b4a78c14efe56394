"""Batch-invariant decoding: logits that do not depend on how many tokens a step carries.

Tiny quantized models on both backends check that single steps, chunks of any size and batches
give bit-identical logits and leave the cache as plain steps do; a fresh process checks the
K-quant case (llama.cpp reads its tiled-kernel switch once per process); the real Q4_1 model
checks that greedy prompt-lookup and batch-4 output equal plain batch-1 greedy token for token.
Speculation on quantized weights is exact by default (invariant steps for that generation on
onnxruntime, a load-time hint on llama.cpp) while plain decoding keeps the one-token kernels.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.cli import main
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime import llamacpp_backend
from edgerun.runtime.backend import InvariantSteps

PROMPT = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33, 8, 140, 77]
MORE = [21, 4, 90, 18, 230, 6, 71, 15, 160, 44, 9]


pytestmark = pytest.mark.usefixtures("home")  # a private edge-run cache per test (conftest)


@pytest.fixture(scope="module", params=["gguf-int8", "gguf-int4", "onnx-int4", "onnx-int8"])
def quantized(request, tiny256, tmp_path_factory) -> Path:
    target, preset = request.param.split("-")
    out = tmp_path_factory.mktemp("q") / request.param
    export(tiny256, out, ExportOptions(formats=(target,), quant=preset))
    return out


def _continuation_logits(engine, chunk: int) -> np.ndarray:
    """Logits of MORE after PROMPT, fed `chunk` tokens per step (0: one token, scoring only it)."""
    backend = engine.backend
    cache = backend.new_cache(1, 64)
    backend.forward(np.array([PROMPT]), cache, np.array([len(PROMPT)]), np.array([[len(PROMPT) - 1]]))
    out, i = [], 0
    while i < len(MORE):
        k = min(chunk or 1, len(MORE) - i)
        logits = backend.forward(np.array([MORE[i:i + k]]), cache, np.array([k]), np.arange(k)[None])
        out.extend(logits[0])
        i += k
    assert cache.lengths.tolist() == [len(PROMPT) + len(MORE)]
    return np.array(out)


def test_every_step_shape_gives_bit_identical_logits(quantized):
    engine = edgerun.Engine(quantized, max_context=64, batch_invariant=True)
    assert isinstance(engine.backend, InvariantSteps)
    single = _continuation_logits(engine, 0)
    for chunk in (2, 3, 5, len(MORE)):
        np.testing.assert_array_equal(_continuation_logits(engine, chunk), single, err_msg=f"chunks of {chunk}")
    # and the padded single steps leave the cache as plain steps do: the next logits equal a fresh run's
    plain = edgerun.Engine(quantized, max_context=64)
    np.testing.assert_allclose(single, _continuation_logits(plain, len(MORE)), atol=0.5)


def test_batch_rows_equal_single_rows_and_greedy_speculation_equals_plain(quantized):
    engine = edgerun.Engine(quantized, max_context=64, batch_invariant=True)
    prompts = [PROMPT, MORE, PROMPT[3:] + MORE[:2]]
    alone = [[r.token for r in engine.generate(p, max_new_tokens=12)] for p in prompts]
    together = list(engine.generate(prompts, max_new_tokens=12))
    assert [[r.token for r in together if r.index == i] for i in range(3)] == alone
    for p, expected in zip(prompts, alone):
        got = [r.token for r in engine.generate(p, max_new_tokens=12, speculative="lookup", draft_tokens=3)]
        assert got == expected


def test_lone_row_scores_one_position_and_cache_advances_by_real_tokens(quantized):
    engine = edgerun.Engine(quantized, max_context=64, batch_invariant=True)
    cache = engine.backend.new_cache(2, 64)
    engine.backend.forward(np.array([PROMPT[:5], PROMPT[5:10]]), cache, np.array([5, 5]), np.array([[4], [4]]))
    logits = engine.backend.forward(np.array([[7], [0]]), cache, np.array([1, 0]), np.array([[0], [0]]))
    assert logits.shape == (2, 1, engine.manifest.model.vocab_size)
    assert not logits[1].any()  # the idle row scores nothing
    assert cache.lengths.tolist() == [6, 5]


def test_onnx_invariant_steps_copy_only_attentions_row(quantized, capsys):
    """Quantized ONNX graphs pick their attention rows: invariant steps copy a one-token step's row
    for attention only, and give the logits of the whole-token copy (the form of other backends)
    bit for bit; plain steps are untouched."""
    if not quantized.name.startswith("onnx"):
        pytest.skip("llama.cpp chooses invariant kernels at load")
    engine = edgerun.Engine(quantized, max_context=64, batch_invariant=True)
    assert engine.manifest.extra["attention_rows"] is True and engine.backend.inner.pads_attention
    assert main(["info", str(quantized)]) == 0
    assert "exact steps    attention copies a one-token row" in capsys.readouterr().out
    single = _continuation_logits(engine, 0)
    engine.backend.inner.pads_attention = False  # InvariantSteps copies whole tokens instead
    np.testing.assert_array_equal(_continuation_logits(engine, 0), single)
    np.testing.assert_array_equal(_continuation_logits(engine, 3), single)
    backend = engine.backend.inner
    backend._padded = False  # as a package exported before graphs picked their attention rows
    with pytest.raises(ValueError, match="pick their attention rows"):
        backend.forward(np.array([PROMPT]), backend.new_cache(1, 64), np.array([len(PROMPT)]),
                        np.array([[0]]), invariant=True)


def test_invariant_steps_fill_the_context_to_its_last_position(quantized):
    """A padded step writes one slot past its tokens: a generation that ends exactly at
    max_context still fits, speculating or not."""
    engine = edgerun.Engine(quantized, max_context=32, batch_invariant=True)
    for kw in ({}, {"speculative": "lookup", "draft_tokens": 3}):
        out = [r.token for r in engine.generate(PROMPT, max_new_tokens=32 - len(PROMPT), ignore_eos=True, **kw)]
        assert len(out) == 32 - len(PROMPT), kw


def test_k_quants_untile_in_a_fresh_process(tiny256, tmp_path):
    assert main(["export", str(tiny256), "--format", "gguf", "--quant", "q4_k_m", "-o", str(tmp_path / "k")]) == 0
    script = f"""
import json, os, numpy as np, edgerun
engine = edgerun.Engine({str(tmp_path / 'k')!r}, max_context=64, batch_invariant=True)
prompt, more = {PROMPT}, {MORE}
def run(chunk):
    cache = engine.backend.new_cache(1, 64)
    engine.backend.forward(np.array([prompt]), cache, np.array([len(prompt)]), np.array([[0]]))
    out = []
    for i in range(0, len(more), chunk):
        part = more[i:i + chunk]
        out.extend(engine.backend.forward(np.array([part]), cache, np.array([len(part)]),
                                          np.arange(len(part))[None])[0])
    return np.array(out)
single = run(1)
print(json.dumps({{"env": os.environ.get("GGML_CPU_TILED_MM"),
                  "diff": [float(np.abs(run(k) - single).max()) for k in (2, 4, 8, 11)]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"env": "0", "diff": [0.0, 0.0, 0.0, 0.0]}


def test_k_quants_after_llamacpp_ran_are_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("GGML_CPU_TILED_MM", raising=False)
    monkeypatch.setattr(llamacpp_backend, "_contexts_made", True)
    with pytest.raises(ValueError, match="set GGML_CPU_TILED_MM=0 in the environment"):
        llamacpp_backend._untile_for_invariance(tmp_path / "m.gguf", ["Q4_K", "Q6_K"])
    llamacpp_backend._untile_for_invariance(tmp_path / "m.gguf", [])  # nothing tiled: nothing to do
    assert llamacpp_backend._tiled_types({"mlp": "Q4_K+Q5_0+Q6_K", "attention": "IQ4_NL+IQ2_XS"}) == \
        ["IQ2_XS", "Q4_K", "Q6_K"]


@pytest.mark.parametrize("batch", [1, 3])
def test_every_drafter_through_staged_graphs(tmp_path, batch):
    """Self-speculation runs stage prefixes and suffixes from hidden states: padded too."""
    export(build_tiny_llama(tmp_path / "hf_target", seed=1), tmp_path / "target",
           ExportOptions(stage_boundaries=(2,), separate_head=True))
    export(build_tiny_llama(tmp_path / "hf_draft", seed=2, num_hidden_layers=2), tmp_path / "draft")
    target = edgerun.Engine(tmp_path / "target", max_context=96, batch_invariant=True)
    prompts = [PROMPT, MORE, PROMPT[4:]][:batch]

    def tokens(**kw):
        out = list(target.generate(prompts, max_new_tokens=24, ignore_eos=True, **kw))
        return [[r.token for r in out if r.index == i] for i in range(batch)]

    plain = tokens()
    for mode in ("self:2", f"draft:{tmp_path / 'draft'}", "lookup"):
        assert tokens(speculative=mode, draft_tokens=3) == plain, mode
        assert target.stats.rounds > 0


@pytest.fixture(scope="module")
def tiny_draft(tiny256, tmp_path_factory) -> Path:
    """The tiny model's fp32 ONNX package: drafts that mostly, not always, pass on a quantized target."""
    out = tmp_path_factory.mktemp("d") / "fp32"
    export(tiny256, out, ExportOptions())
    return out


def _spy(monkeypatch, backend) -> list[tuple[list[int], int]]:
    """Every call to this backend object's forward: (tokens per row, positions scored per row), and
    for an invariant step of the graphs' own (onnx, `invariant=True`) a third entry, True."""
    calls, forward = [], backend.forward

    def spy(inputs, cache, counts, logits_positions=None, *args, **kwargs):
        call = (np.asarray(counts).tolist(), None if logits_positions is None else logits_positions.shape[1])
        calls.append((*call, True) if kwargs.get("invariant") else call)
        return forward(inputs, cache, counts, logits_positions, *args, **kwargs)

    monkeypatch.setattr(backend, "forward", spy)
    return calls


def _greedy(engine, prompt, **kw) -> list[int]:
    return [r.token for r in engine.generate(prompt, max_new_tokens=16, ignore_eos=True, **kw)]


def test_speculation_is_exact_by_default_and_plain_keeps_the_fast_path(quantized, tiny_draft, monkeypatch):
    """Greedy speculation on a default engine equals plain greedy of a batch-invariant one; on
    onnxruntime the speculating generation runs invariant steps over the same sessions, and plain
    generations before and after it still run one-token steps on the engine's own backend."""
    reference = edgerun.Engine(quantized, max_context=64, batch_invariant=True)
    prompts = [PROMPT, MORE, PROMPT[3:] + MORE[:2], MORE[::-1]]
    expected = [_greedy(reference, p) for p in prompts]
    llamacpp = quantized.name.startswith("gguf")
    engine = edgerun.Engine(quantized, max_context=64, speculative=llamacpp)  # the CLI's hint for --speculative
    assert engine.batch_invariant is llamacpp and isinstance(engine.backend, InvariantSteps) is llamacpp
    calls = _spy(monkeypatch, engine.backend.inner if llamacpp else engine.backend)
    for mode in ("lookup", f"draft:{tiny_draft}"):
        for prompt, tokens in zip(prompts, expected):
            calls.clear()
            assert _greedy(engine, prompt, speculative=mode, draft_tokens=3) == tokens, mode
            if llamacpp:  # every step carries two tokens or more and scores two positions or more
                assert all(min(c for c in counts if c) >= 2 and scored >= 2 for counts, scored in calls), calls
            else:  # every step asks the graphs for their invariant form
                assert all(len(call) == 3 for call in calls), calls
    if llamacpp:
        return
    assert engine._invariant.inner is engine.backend  # no second model load
    for prompt in prompts:
        calls.clear()
        plain = _greedy(engine, prompt)
        assert calls[0][1] == 1 and all(c == ([1], 1) for c in calls[1:]), calls  # prefill, then one-token steps
        assert len(calls) == len(plain)
    batch = list(engine.generate(prompts, max_new_tokens=16, ignore_eos=True, speculative="lookup", draft_tokens=3))
    assert [[r.token for r in batch if r.index == i] for i in range(len(prompts))] == expected


def test_inexact_speculation_runs_the_fast_kernels(quantized, monkeypatch):
    engine = edgerun.Engine(quantized, max_context=64)
    assert not engine.batch_invariant
    widened = []
    monkeypatch.setattr(InvariantSteps, "forward", lambda self, *a, **kw: widened.append(a) or None)
    calls = _spy(monkeypatch, engine.backend)
    tokens = _greedy(engine, PROMPT + PROMPT, speculative="lookup", draft_tokens=3, exact=False)
    assert len(tokens) == 16 and not widened
    assert calls[0] == ([len(PROMPT) * 2], 1)  # the prefill scores one position, as before
    assert engine.stats.rounds > 0


def test_quantized_llamacpp_engine_not_loaded_for_speculation_says_how(quantized):
    if not quantized.name.startswith("gguf"):
        pytest.skip("onnxruntime switches to invariant steps per generation")
    engine = edgerun.Engine(quantized, max_context=64)
    with pytest.raises(ValueError, match=r"load with speculative=True .*or pass exact=False") as error:
        engine.generate(PROMPT, speculative="lookup")
    assert "\n" not in str(error.value) and "llama.cpp" in str(error.value)
    edgerun.Engine(quantized, max_context=64, speculative="lookup")  # a mode string is a hint too


def test_cli_loads_llamacpp_for_exact_speculation(quantized, monkeypatch, capsys):
    from edgerun import hub

    loaded, load = [], hub.load
    monkeypatch.setattr(hub, "load", lambda *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1])
    llamacpp = quantized.name.startswith("gguf")
    for flags, invariant in ((["--speculative", "lookup"], llamacpp), ([], False),
                             (["--speculative", "lookup", "--inexact-speculation"], False)):
        assert main(["run", str(quantized), "hello", "-n", "4", *flags]) == 0, flags
        assert loaded[-1].batch_invariant is invariant, flags
        assert "| 4 tok in" in capsys.readouterr().err
    assert main(["run", str(quantized), "hello", "--inexact-speculation"]) == 1
    assert "--inexact-speculation applies to speculative decoding" in capsys.readouterr().err


def test_self_speculation_on_a_quantized_staged_package_is_exact(tmp_path):
    """The self drafter writes the target's own KV: it runs on the generation's invariant steps too."""
    export(build_tiny_llama(tmp_path / "hf", seed=4), tmp_path / "int4",
           ExportOptions(quant="int4", stage_boundaries=(2,), separate_head=True))
    engine = edgerun.Engine(tmp_path / "int4", max_context=96)
    reference = edgerun.Engine(tmp_path / "int4", max_context=96, batch_invariant=True)
    for prompt in (PROMPT, MORE):
        assert _greedy(engine, prompt, speculative="self:2", draft_tokens=3) == _greedy(reference, prompt)


def test_cli_flag(quantized, capsys):
    assert main(["run", str(quantized), "hello", "-n", "4", "--batch-invariant", "--speculative", "lookup"]) == 0
    assert "| 4 tok in" in capsys.readouterr().err


# -- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_q4_1_lookup_speculation_and_batch4_equal_plain_greedy(smollm2_gguf, chat_prompts):
    """The default model's own Q4_1 file: plain greedy, greedy prompt lookup and batch 4 agree token
    for token over 8 MT-Bench prompts x 64 tokens (without batch_invariant, lookup left plain greedy
    on 2 of 8 prompts x 128 tokens per prompt set: see the README)."""
    engine = edgerun.load(smollm2_gguf, batch_invariant=True)
    plain = [[r.token for r in engine.generate(tokens, max_new_tokens=64)] for tokens in chat_prompts]
    for tokens, expected in zip(chat_prompts, plain):
        assert [r.token for r in engine.generate(tokens, max_new_tokens=64, speculative="lookup")] == expected
    group = list(chat_prompts[:4])
    for kw in ({}, {"speculative": "lookup"}):
        out = list(engine.generate(group, max_new_tokens=64, **kw))
        assert [[r.token for r in out if r.index == i] for i in range(4)] == plain[:4], kw


@pytest.fixture(scope="module")
def smollm2_quantized(smollm2_gguf, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """INT4 and INT8 ONNX packages of the default model."""
    out = tmp_path_factory.mktemp("smollm2q")
    for preset in ("int4", "int8"):
        export(smollm2_gguf, out / preset, ExportOptions(quant=preset))
    yield {preset: out / preset for preset in ("int4", "int8")}
    shutil.rmtree(out)


@pytest.mark.slow
@pytest.mark.parametrize("target, draft", [("int4", "int8"), ("int8", "int4"), ("q4_1", "int8")])
def test_default_speculation_equals_invariant_plain_greedy(target, draft, smollm2_gguf, smollm2_quantized,
                                                           chat_prompts):
    """The default model, 8 MT-Bench prompts x 64 tokens, lookup and a draft model: greedy speculation
    with no flag equals plain greedy of a batch-invariant engine (the reference the README documents);
    on llama.cpp from an engine loaded with speculative=True, as the CLI loads it for --speculative.
    The draft model drafts 3 tokens a round: an INT8 draft is no lighter than an INT4 or Q4_1 target,
    which the adaptive length would leave out (plain decoding)."""
    llamacpp = target == "q4_1"
    path = smollm2_gguf if llamacpp else smollm2_quantized[target]
    reference = edgerun.load(path, batch_invariant=True)
    expected = [[r.token for r in reference.generate(tokens, max_new_tokens=64)] for tokens in chat_prompts]
    engine = edgerun.load(path, speculative=llamacpp)
    assert engine.batch_invariant is llamacpp
    for mode, length in (("lookup", "auto"), (f"draft:{smollm2_quantized[draft]}", 3)):
        for tokens, plain in zip(chat_prompts, expected):
            out = engine.generate(tokens, max_new_tokens=64, speculative=mode, draft_tokens=length)
            assert [r.token for r in out] == plain, mode
        assert engine.stats.accepted > 0, mode
