"""SmolLM2-135M: our fp32 ONNX package against Hugging Face transformers loading the same GGUF."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def hf_greedy(hf_smollm2, chat_prompts) -> list[list[int]]:
    import torch

    outputs = []
    with torch.no_grad():
        for tokens in chat_prompts:
            out = hf_smollm2.generate(torch.tensor([tokens]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=2, pad_token_id=2)
            outputs.append(out[0, len(tokens):].tolist())
    return outputs


def test_logits_match_transformers_full_vocab(smollm2_engine, hf_smollm2, chat_prompts):
    import torch

    texts = ["The history of the Roman Empire spans more than a thousand years, from",
             " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : Unrecorded Chronicles"]
    sequences = [smollm2_engine.encode(t) for t in texts] + chat_prompts[:2]
    for tokens in sequences:
        ours = smollm2_engine.logits(tokens)
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([tokens])).logits[0].numpy()
        assert ours.shape == ref.shape == (len(tokens), 49152)
        assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_batch1_with_cache_matches_transformers(smollm2_engine, chat_prompts, hf_greedy):
    for tokens, ref in zip(chat_prompts, hf_greedy):
        ours = [r.token for r in smollm2_engine.generate(tokens, max_new_tokens=NEW_TOKENS)]
        assert ours == ref


def test_greedy_without_cache_matches_transformers(smollm2_engine, chat_prompts, hf_greedy):
    for tokens, ref in zip(chat_prompts, hf_greedy):
        seq, ours = list(tokens), []
        while len(ours) < len(ref):
            token = int(np.argmax(smollm2_engine.logits(seq)[-1]))  # full recompute, no cache reuse
            ours.append(token)
            seq.append(token)
        assert ours == ref


def test_greedy_batch4_unequal_lengths_matches_transformers(smollm2_engine, chat_prompts, hf_greedy):
    for start in (0, 4):
        group = chat_prompts[start:start + 4]
        assert len({len(t) for t in group}) > 1, "prompts must differ in length"
        responses = list(smollm2_engine.generate(group, max_new_tokens=NEW_TOKENS))
        for row in range(4):
            assert [r.token for r in responses if r.index == row] == hf_greedy[start + row]


def test_streamed_text_equals_decoded_tokens(smollm2_engine, chat_prompts):
    responses = list(smollm2_engine.generate(chat_prompts[0], max_new_tokens=NEW_TOKENS))
    assert "".join(r.text for r in responses) == smollm2_engine.decode([r.token for r in responses])
    assert responses[-1].finish_reason in ("stop", "length")


def test_seeded_sampling_is_reproducible(smollm2_engine, chat_prompts):
    kwargs = dict(max_new_tokens=24, temperature=0.8, top_k=50, top_p=0.9, seed=1234)
    a = [r.token for r in smollm2_engine.generate(chat_prompts[1], **kwargs)]
    b = [r.token for r in smollm2_engine.generate(chat_prompts[1], **kwargs)]
    c = [r.token for r in smollm2_engine.generate(chat_prompts[1], **(kwargs | {"seed": 99}))]
    assert a == b
    assert a != c


def test_stop_string_ends_generation(smollm2_engine):
    full = smollm2_engine.complete("1, 2, 3, 4, 5,", max_new_tokens=16)
    assert " 7" in full
    cut = list(smollm2_engine.generate("1, 2, 3, 4, 5,", max_new_tokens=16, stop=[" 7"]))
    text = "".join(r.text for r in cut)
    assert text == full[:full.index(" 7")]
    assert cut[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def exit_engine(smollm2_gguf, tmp_path_factory):
    """The same model exported with an exit after layer 10 and a separate head stage."""
    import edgerun
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "smollm2-exit10"
    export(smollm2_gguf, out, ExportOptions(stage_boundaries=(10,), separate_head=True))
    return edgerun.Engine(out, max_context=512)


@pytest.mark.parametrize("mode", ["lookup", "self:10"])
@pytest.mark.parametrize("batch", [1, 4])
def test_speculative_greedy_matches_transformers(smollm2_engine, exit_engine, chat_prompts, hf_greedy, mode, batch):
    engine = exit_engine if mode.startswith("self") else smollm2_engine
    for start in range(0, 8, batch):
        group = chat_prompts[start:start + batch]
        responses = list(engine.generate(group if batch > 1 else group[0], max_new_tokens=NEW_TOKENS,
                                         speculative=mode))
        for row in range(batch):
            assert [r.token for r in responses if r.index == row] == hf_greedy[start + row]


@pytest.mark.slow
def test_memory_report_on_the_real_model(smollm2_engine, chat_prompts):
    """Weights, KV cache, runtime and activations as `edge-run run` reports them: the KV figure is the
    allocation, the weights the package's files, and the parts add up to the process's RSS."""
    from edgerun.runtime.memory import process_rss

    list(smollm2_engine.generate(chat_prompts[0], max_new_tokens=128))
    use = smollm2_engine.memory()
    assert use.kv_cache == smollm2_engine._kv.nbytes > 0
    assert use.weights == sum(f.stat().st_size for f in smollm2_engine.package_dir.glob("stage*.onnx*"))
    assert use.weights_resident + use.kv_cache + use.runtime + use.activations + use.process + use.drafts == use.rss
    assert use.runtime >= 0 and use.weights_resident <= use.weights
    assert abs(use.rss - process_rss()) <= 0.1 * use.rss


def test_f16_kv_cache_greedy_equals_f32_on_mt_bench(smollm2_gguf, chat_prompts, hf_greedy, tmp_path_factory):
    """The fp32 package exported with an f16 KV cache (`export --kv-cache f16`) decodes the MT-Bench
    prompts exactly as transformers' f32 greedy does (the f32-KV package's reference here)."""
    import edgerun
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "smollm2-f16kv"
    export(smollm2_gguf, out, ExportOptions(formats=("onnx",), kv_cache="f16"))
    engine = edgerun.Engine(out, max_context=512)
    assert engine.manifest.model.kv_dtype == "float16"
    for tokens, expected in zip(chat_prompts, hf_greedy):
        ours = [r.token for r in engine.generate(tokens, max_new_tokens=NEW_TOKENS)]
        assert ours == expected[:len(ours)] and (len(ours) == NEW_TOKENS or ours[-1] == 2)
