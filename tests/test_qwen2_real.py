"""Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF assembled from six PyPI parts): the qwen2 family on the
real model. Our fp32 ONNX export against transformers loading the same GGUF, and against llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest

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
def qwen_onnx(qwen_gguf, tmp_path_factory):
    import edgerun
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "qwen-fp32"
    export(qwen_gguf, out, ExportOptions(formats=("onnx",)))
    return edgerun.Engine(out, max_context=256)


@pytest.fixture(scope="module")
def chat_tokens(qwen_onnx) -> list[list[int]]:
    engine = qwen_onnx
    return [engine.encode(engine.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in PROMPTS]


def test_spec_of_the_real_model(qwen_onnx):
    spec = qwen_onnx.manifest.model
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads,
            spec.vocab_size) == ("qwen2", 24, 896, 14, 2, 151936)
    assert spec.attention_bias and spec.rope_theta == 1e6  # this GGUF stores an output.weight: untied


def test_logits_match_transformers_on_the_same_gguf(qwen_gguf, qwen_onnx, chat_tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(qwen_gguf.parent), gguf_file=qwen_gguf.name, dtype=torch.float32).eval()
    tokens = chat_tokens[0]
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ours = qwen_onnx.logits(tokens)
    assert ours.shape == ref.shape == (len(tokens), 151936)
    assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_agrees_with_llamacpp_on_the_same_gguf(qwen_gguf, qwen_onnx, chat_tokens):
    """llama.cpp computes Q4_K/Q6_K dot products on 8-bit activations, our fp32 package on the dequantized
    weights: the two agree on the first tokens of every prompt (the README gives the measured prefixes)."""
    import edgerun

    cpp = edgerun.load(qwen_gguf, max_context=256)
    for tokens in chat_tokens:
        ours = [r.token for r in qwen_onnx.generate(tokens, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        theirs = [r.token for r in cpp.generate(tokens, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        assert ours[:8] == theirs[:8], (qwen_onnx.decode(ours), cpp.decode(theirs))
