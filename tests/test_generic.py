"""The long tail: a tiny random GPT-2 (an architecture without a family module) written with
transformers' save_pretrained, exported through optimum's ONNX exporter and run by the generic
onnx backend, against transformers on the same weights."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import edgerun
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.drafters import Draft, Drafter
from edgerun.runtime.manifest import PackageError, read_manifest

if os.environ.get("EDGE_RUN_REQUIRE_OPTIMUM"):  # .ci/run's export environment: no optimum is a failure there
    import optimum.exporters.onnx  # noqa: F401
else:
    pytest.importorskip("optimum.exporters.onnx",
                        reason="optimum-onnx is not installed (pip install 'edge-run[export]')")
pytestmark = pytest.mark.usefixtures("home")
TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]


def build_tiny_gpt2(folder, seed: int = 0):
    """A tiny random GPT-2 saved with save_pretrained, with the tiny Llama's byte-level BPE tokenizer."""
    import torch
    import transformers
    from conftest import build_tiny_llama

    build_tiny_llama(folder, seed=seed, num_hidden_layers=1)  # tokenizer files (the Llama is replaced)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    for stale in [*folder.glob("*.safetensors"), folder / "config.json"]:
        stale.unlink()
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                                     bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random norms and biases, so a wrong or missing one cannot hide
        for name, p in model.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(HF folder, transformers model, fp32 generic package, its engine)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    folder = build_tiny_gpt2(tmp_path_factory.mktemp("hf") / "gpt2", seed=3)
    out = tmp_path_factory.mktemp("pkg") / "gpt2"
    export(folder, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return folder, model, out, edgerun.Engine(out, max_context=96)


def _greedy(engine, prompt, n=16, **kwargs):
    return [r.token for r in engine.generate(prompt, max_new_tokens=n, ignore_eos=True, **kwargs)]


def test_manifest_records_the_generic_graph(gpt2):
    _, model, out, engine = gpt2
    manifest = read_manifest(out)
    assert manifest.generic["exporter"] == "optimum-onnx" and manifest.generic["version"]
    assert manifest.generic["task"] == "text-generation-with-past"
    assert manifest.generic["versions"]["transformers"]
    spec = manifest.model
    assert (spec.architecture, spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size,
            spec.context_length) == ("gpt2", 3, 4, 16, model.config.vocab_size, 128)
    assert [s.file for s in manifest.stages] == ["model.onnx"] and manifest.backends == ("onnx",)
    assert not list(out.glob("*.partial")) and not (out / "optimum").exists()  # written atomically, work removed


def test_logits_match_transformers(gpt2):
    import torch

    _, model, _, engine = gpt2
    long_prompt = (TOKENS * 8)[:80]
    for tokens in (TOKENS, long_prompt):
        with torch.no_grad():
            ref = model(torch.tensor([tokens])).logits[0].numpy()
        ours = engine.logits(tokens)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_generation_matches_transformers(gpt2):
    import torch

    _, model, _, engine = gpt2
    ref = model.generate(torch.tensor([TOKENS]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(TOKENS):].tolist()
    assert _greedy(engine, TOKENS) == ref


def test_batch_of_unequal_prompts_equals_single_rows(gpt2):
    engine = gpt2[3]
    prompts = [TOKENS[:3], TOKENS, TOKENS[4:9]]
    batched = list(engine.generate(prompts, max_new_tokens=12, ignore_eos=True))
    for row, prompt in enumerate(prompts):
        assert [r.token for r in batched if r.index == row] == _greedy(engine, prompt, 12)


class _SometimesWrong(Drafter):
    """Drafts the known greedy continuation, with every third draft token wrong: verification steps
    accept several tokens and roll back the rest."""

    def __init__(self, prompt, continuation, vocab):
        self.text, self.vocab = list(prompt) + list(continuation), vocab

    def propose(self, contexts, lengths):
        drafts = []
        for context, k in zip(contexts, lengths):
            true = self.text[len(context):len(context) + k]
            drafts.append(Draft([(t + 1) % self.vocab if i % 3 == 2 else t for i, t in enumerate(true)]))
        return drafts


def test_speculation_equals_plain_greedy(gpt2):
    engine = gpt2[3]
    prompt = TOKENS[:5] * 4  # repeats: lookup finds matches
    plain = _greedy(engine, prompt, 40)
    assert _greedy(engine, prompt, 40, speculative="lookup", draft_tokens=4) == plain
    assert engine.stats.proposed > 0
    drafter = _SometimesWrong(prompt, plain, engine.manifest.model.vocab_size)
    assert _greedy(engine, prompt, 40, speculative=drafter, draft_tokens=5) == plain
    stats = engine.stats
    assert 0 < stats.accepted < stats.proposed  # multi-token steps accepted and rolled back
    # batched verification of rows at different lengths (and the slots' packing along the way)
    other = TOKENS[2:9]
    batched = list(engine.generate([prompt, other], max_new_tokens=40, ignore_eos=True, speculative="lookup",
                                   draft_tokens=4))
    assert [r.token for r in batched if r.index == 0] == plain
    assert [r.token for r in batched if r.index == 1] == _greedy(engine, other, 40)


def test_sampling_is_reproducible_with_a_seed(gpt2):
    engine = gpt2[3]
    runs = [_greedy(engine, TOKENS, 12, temperature=0.9, top_p=0.95, seed=11) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0] != _greedy(engine, TOKENS, 12)  # sampled, not greedy
    spec = list(engine.generate(TOKENS, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=11,
                                ignore_eos=True, speculative="lookup"))
    assert len(spec) == 12


def test_rollback_frees_slots_and_packing_keeps_the_sequences(gpt2):
    """The cache's slots: rolled-back positions are hidden, packing moves only valid slots."""
    engine = gpt2[3]
    backend = engine.backend
    cache = backend.new_cache(2, 64)
    tokens = np.array([TOKENS[:6], TOKENS[:6]], dtype=np.int64)
    backend.forward(tokens, cache, np.array([6, 3]), np.zeros((2, 1), np.int64))
    backend.forward(np.array([[9, 9, 9], [9, 9, 9]]), cache, np.array([3, 3]), np.zeros((2, 1), np.int64))
    cache.rollback(np.array([6, 3]))  # drop the 9s
    assert cache.slots == 9 and list(cache.lengths) == [6, 3]
    rest = np.array([TOKENS[6:], TOKENS[3:8]], dtype=np.int64)
    before = backend.forward(rest, cache, np.array([5, 5]), np.array([[4], [4]]))
    cache.rollback(np.array([6, 3]))
    cache.pack()
    assert cache.slots == 6
    after = backend.forward(rest, cache, np.array([5, 5]), np.array([[4], [4]]))
    np.testing.assert_allclose(after, before, atol=1e-5)
    full = engine.logits(TOKENS)
    np.testing.assert_allclose(after[0, 0], full[-1], atol=1e-4)
    np.testing.assert_allclose(after[1, 0], engine.logits(TOKENS[:8])[-1], atol=1e-4)
    saved = cache.save_row(0, 11)
    cache.load_row(saved, 1, 11)
    cache.rollback(np.array([11, 10]))
    row = backend.forward(np.array([[TOKENS[10]], [TOKENS[10]]]), cache, np.array([0, 1]), np.zeros((2, 1), np.int64))
    np.testing.assert_allclose(row[1, 0], full[-1], atol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_generic_export(gpt2, quant, tmp_path):
    folder, _, _, engine = gpt2
    manifest = export(folder, tmp_path / quant, ExportOptions(quant=quant))
    assert manifest.quantization["quantized"] == manifest.quantization["matrices"] > 0
    assert manifest.weights["other"] == quant
    quantized = edgerun.Engine(tmp_path / quant, max_context=96)
    ours, ref = quantized.logits(TOKENS), engine.logits(TOKENS)
    assert np.abs(ours - ref).mean() <= (0.05 if quant == "int8" else 0.4) * ref.std()
    prompt = TOKENS[:5] * 4
    assert _greedy(quantized, prompt, 24, speculative="lookup") == _greedy(quantized, prompt, 24)


@pytest.mark.parametrize("options, flag", [
    (dict(prune_layers=1), "--prune-layers"), (dict(exit_layers=(1,)), "--exit-layers"),
    (dict(formats=("gguf",)), "--format gguf"), (dict(kv_cache="f16"), "--kv-cache f16"),
    (dict(quant="int4-gptq"), "--quant int4-gptq"),
])
def test_options_a_generic_graph_cannot_take(gpt2, options, flag, tmp_path):
    with pytest.raises(ValueError, match="no edge-run family module") as info:
        export(gpt2[0], tmp_path / "out", ExportOptions(**options))
    assert flag in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_limits_are_errors_at_run_time(gpt2):
    engine = gpt2[3]
    for kwargs in (dict(speculative="self:1"), dict(early_exit=0.9)):
        with pytest.raises(ValueError, match="generic exporter"):
            list(engine.generate(TOKENS, max_new_tokens=2, **kwargs))
    with pytest.raises(ValueError, match="kv-cache f16"):
        edgerun.Engine(gpt2[2], kv_cache="f16")


def test_missing_optimum_names_the_extra(gpt2, monkeypatch, tmp_path):
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name == "optimum-onnx":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)  # import fails
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(PackageError, match=r"no family module for 'gpt2'.*not installed: pip install "
                                           r"\"edge-run\[export\]\"") as info:
        export(gpt2[0], tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_optimum_that_cannot_import_names_the_versions(gpt2, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "optimum.exporters.onnx", None)
    with pytest.raises(PackageError, match=r"optimum-onnx \S+ cannot be imported here.*transformers") as info:
        export(gpt2[0], tmp_path / "out")
    assert 'pip install "edge-run[export]"' in str(info.value)


def test_a_transformers_optimum_does_not_support_names_both_versions(gpt2, monkeypatch, tmp_path):
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "5.24.0" if name == "transformers" else real(name))
    with pytest.raises(PackageError, match=r"which needs transformers\S*<4\.58.* has transformers 5\.24\.0: "
                                           r"pip install \"edge-run\[export\]\"") as info:
        export(gpt2[0], tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_info_states_the_limits(gpt2, capsys):
    from edgerun.cli import main
    from edgerun.runtime.generic_backend import LIMITS

    assert main(["info", str(gpt2[2])]) == 0
    out = capsys.readouterr().out
    assert "generic, made by optimum-onnx" in out and "not available" in out
    assert all(limit in out for limit in LIMITS)


def test_a_draft_model_speculates_on_the_generic_graph(gpt2):
    engine, package = gpt2[3], gpt2[2]
    prompt = TOKENS[:7]
    speculated = _greedy(engine, prompt, 24, speculative=f"draft:{package}", draft_tokens=3)
    assert engine.stats.accepted > 0  # the draft is the target itself: it is right every time
    assert speculated == _greedy(engine, prompt, 24)


def test_scheduler_batches_reuses_prompts_and_speculates(gpt2):
    """Continuous batching over the slot cache: rows joining mid-flight, the prompt cache's row copies,
    lookup speculation; each request equals its own plain generation."""
    from edgerun.runtime.scheduler import Scheduler

    engine = gpt2[3]
    prompts = [TOKENS[:k] * 2 for k in (3, 7, 11)] + [TOKENS * 2]
    expected = [_greedy(engine, p, 14) for p in prompts]
    for speculative in (None, "lookup"):
        scheduler = Scheduler(engine, max_batch=2, prefill_chunk=8, speculative=speculative)
        try:
            handles = [scheduler.submit(p, max_new_tokens=14, ignore_eos=True) for p in prompts]
            assert [h.result().tokens for h in handles] == expected
            again = scheduler.submit(prompts[3], max_new_tokens=14, ignore_eos=True)  # same prompt: cached prefix
            assert again.result().tokens == expected[3]
            assert scheduler.stats.cached_tokens > 0
        finally:
            scheduler.close()


def test_cli_export_of_a_folder_without_a_family(gpt2, tmp_path, capsys):
    from edgerun.cli import main

    assert main(["export", str(gpt2[0]), "-o", str(tmp_path / "cli"), "--quant", "int4"]) == 0
    out = capsys.readouterr().out
    assert "gpt2, 3 layers, one generic graph made by optimum-onnx" in out
    assert main(["export", str(gpt2[0]), "-o", str(tmp_path / "pruned"), "--prune-layers", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prune-layers" in err[0] and not (tmp_path / "pruned").exists()
