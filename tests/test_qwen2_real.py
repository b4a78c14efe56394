"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF assembled from six PyPI parts): the qwen2 family on the
real model. Our fp32 ONNX export against transformers loading the same GGUF, and against llama.cpp
(on that GGUF and on our own F32 GGUF export of it)."""
from __future__ import annotations

import gc
import shutil

import numpy as np
import pytest
from greedy_reference import (
    GREEDY_TOKENS,
    check_batch4_equals_batch1,
    check_gguf_equals_onnx,
    check_teacher_forced,
    teacher_forced,
)

pytestmark = pytest.mark.slow
PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "What does the SQL keyword JOIN do?",
           "Explain recursion in one sentence."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def qwen_gguf():
    from edgerun.hub import pull

    return pull("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def qwen_package(qwen_gguf, tmp_path_factory):
    """fp32 ONNX graphs plus our writer's F32 GGUF of the same weights, in one package."""
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "qwen-fp32"
    export(qwen_gguf, out, ExportOptions(formats=("onnx", "gguf")))
    yield out
    shutil.rmtree(out.parent)  # gigabytes of fp32: free them before the next module


@pytest.fixture(scope="module")
def qwen_onnx(qwen_package):
    import edgerun

    engine = edgerun.Engine(qwen_package, max_context=512)
    assert engine.backend.name == "onnx"
    return engine


def _templated(engine, prompts: list[str]) -> list[list[int]]:
    return [engine.encode(engine.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in prompts]


@pytest.fixture(scope="module")
def chat_tokens(qwen_onnx) -> list[list[int]]:
    return _templated(qwen_onnx, PROMPTS)


@pytest.fixture(scope="module")
def mt_tokens(qwen_onnx, mt_bench_prompts) -> list[list[int]]:
    """The 8 MT-Bench prompts (one per category) in Qwen's chat template (its default system prompt)."""
    return _templated(qwen_onnx, mt_bench_prompts)


@pytest.fixture(scope="module")
def greedy(qwen_onnx, mt_tokens) -> list[list[int]]:
    """Our package's batch-1 greedy tokens per MT-Bench prompt (past end of turn too)."""
    return [[r.token for r in qwen_onnx.generate(t, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)]
            for t in mt_tokens]


@pytest.fixture(scope="module")
def reference(qwen_gguf, chat_tokens, mt_tokens, greedy) -> dict:
    """What the tests need from transformers on the same GGUF, computed once; the model (2 GB in
    fp32) is released before the llama.cpp tests load theirs."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen_gguf.parent), gguf_file=qwen_gguf.name, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([chat_tokens[0]])).logits[0].numpy()
    forced = [teacher_forced(model, prompt, ours) for prompt, ours in zip(mt_tokens, greedy)]
    del model
    gc.collect()
    return {"logits": logits, "forced": forced}


def test_spec_of_the_real_model(qwen_onnx):
    spec = qwen_onnx.manifest.model
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
            spec.vocab_size) == ("qwen2", 24, 896, 14, 2, 151936)
    assert spec.attention_bias and spec.rope_theta == 1e6  # this GGUF stores an output.weight: untied


def test_logits_match_transformers_on_the_same_gguf(qwen_onnx, chat_tokens, reference):
    ours = qwen_onnx.logits(chat_tokens[0])
    ref = reference["logits"]
    assert ours.shape == ref.shape == (len(chat_tokens[0]), 151936)
    assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_on_mt_bench_matches_transformers(mt_tokens, greedy, reference):
    """64 greedy tokens on each of 8 chat-templated MT-Bench prompts: at every position transformers'
    argmax, given the same prefix, is our next token. A flip where transformers' top logit beats our
    token's by <= 1e-3 is a near-tie of two fp32 implementations: reported as a warning, not failed."""
    check_teacher_forced(mt_tokens, greedy, reference["forced"])


def test_batch4_of_unequal_lengths_equals_batch1(qwen_onnx, mt_tokens, greedy):
    check_batch4_equals_batch1(qwen_onnx, mt_tokens, greedy)


def test_our_f32_gguf_on_llamacpp_equals_the_onnx_package(qwen_package, mt_tokens, greedy):
    """Our writer's F32 GGUF of the same weights on llama.cpp (fp32 matmuls there too): greedy
    identical to the fp32 ONNX package."""
    check_gguf_equals_onnx(qwen_package, mt_tokens, greedy)


def test_greedy_agrees_with_llamacpp_on_the_same_gguf(qwen_gguf, qwen_onnx, chat_tokens):
    """llama.cpp computes Q4_K/Q6_K dot products on 8-bit activations, our fp32 package on the dequantized
    weights: the two agree on the first tokens of every prompt (the README gives the measured prefixes)."""
    import edgerun

    cpp = edgerun.load(qwen_gguf, max_context=256)
    for tokens in chat_tokens:
        ours = [r.token for r in qwen_onnx.generate(tokens, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        theirs = [r.token for r in cpp.generate(tokens, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        assert ours[:8] == theirs[:8], (qwen_onnx.decode(ours), cpp.decode(theirs))
