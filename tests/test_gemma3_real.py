"""Gemma 3 270M (Q4_K_M GGUF assembled from four PyPI parts): the gemma3 family on the real model.
Our fp32 ONNX export against transformers loading the same GGUF, and against llama.cpp (on that GGUF
and on our own F32 GGUF export of it)."""
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
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_gguf():
    from edgerun.hub import pull

    return pull("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_package(gemma_gguf, tmp_path_factory):
    """fp32 ONNX graphs plus our writer's F32 GGUF of the same weights, in one package (this
    checkpoint's attention scale is 1/sqrt(head_dim), which the GGUF writer needs)."""
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "gemma-fp32"
    export(gemma_gguf, out, ExportOptions(formats=("onnx", "gguf")))
    yield out
    shutil.rmtree(out.parent)  # gigabytes of fp32: free them before the next module


@pytest.fixture(scope="module")
def gemma_onnx(gemma_package):
    import edgerun

    engine = edgerun.Engine(gemma_package, max_context=512)
    assert engine.backend.name == "onnx"
    return engine


@pytest.fixture(scope="module")
def mt_tokens(gemma_onnx, mt_bench_prompts) -> list[list[int]]:
    """The 8 MT-Bench prompts (one per category) in Gemma's standard chat template."""
    engine = gemma_onnx
    return [engine.encode(engine.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in mt_bench_prompts]


@pytest.fixture(scope="module")
def greedy(gemma_onnx, mt_tokens) -> list[list[int]]:
    """Our package's batch-1 greedy tokens per MT-Bench prompt (past end of turn too)."""
    return [[r.token for r in gemma_onnx.generate(t, max_new_tokens=GREEDY_TOKENS, ignore_eos=True)]
            for t in mt_tokens]


@pytest.fixture(scope="module")
def reference(gemma_gguf, gemma_onnx, mt_tokens, greedy) -> dict:
    """What the tests need from transformers on the same GGUF, computed once, the model released after."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32).eval()
    engine = gemma_onnx
    tokens = engine.encode(engine.apply_chat_template([{"role": "user", "content": "Explain recursion."}]),
                           add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].numpy()
    forced = [teacher_forced(model, prompt, ours) for prompt, ours in zip(mt_tokens, greedy)]
    del model
    gc.collect()
    return {"tokens": tokens, "logits": logits, "forced": forced}


def test_spec_and_template_of_the_real_model(gemma_onnx):
    spec = gemma_onnx.manifest.model
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.vocab_size) == ("gemma3", 18, 640, 4, 1, 256, 262144)
    # the GGUF ships no chat template: the family's standard one, and <end_of_turn> ends a turn
    text = gemma_onnx.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert gemma_onnx.tokenizer.token_to_id("<end_of_turn>") in gemma_onnx.eos_token_ids


def test_logits_match_transformers_on_the_same_gguf(gemma_onnx, reference):
    ours = gemma_onnx.logits(reference["tokens"])
    ref = reference["logits"]
    assert ours.shape == ref.shape == (len(reference["tokens"]), 262144)
    assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_on_mt_bench_matches_transformers(mt_tokens, greedy, reference):
    """64 greedy tokens on each of 8 chat-templated MT-Bench prompts: at every position transformers'
    argmax, given the same prefix, is our next token. A flip where transformers' top logit beats our
    token's by <= 1e-3 is a near-tie of two fp32 implementations: reported as a warning, not failed."""
    check_teacher_forced(mt_tokens, greedy, reference["forced"])


def test_batch4_of_unequal_lengths_equals_batch1(gemma_onnx, mt_tokens, greedy):
    check_batch4_equals_batch1(gemma_onnx, mt_tokens, greedy)


def test_our_f32_gguf_on_llamacpp_equals_the_onnx_package(gemma_package, mt_tokens, greedy):
    """Our writer's F32 GGUF of the same weights on llama.cpp (fp32 matmuls there too): greedy
    identical to the fp32 ONNX package."""
    check_gguf_equals_onnx(gemma_package, mt_tokens, greedy)


def test_greedy_agrees_with_llamacpp_on_the_same_gguf(gemma_gguf, gemma_onnx):
    """llama.cpp multiplies K-quants with 8-bit activations, our fp32 package the dequantized weights:
    the two agree on the first tokens of every prompt."""
    import edgerun

    cpp = edgerun.load(gemma_gguf, max_context=256)
    for prompt in PROMPTS:
        ours = [r.token for r in gemma_onnx.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        theirs = [r.token for r in cpp.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]
        assert ours[:8] == theirs[:8], (gemma_onnx.decode(ours), cpp.decode(theirs))


def test_structured_output_at_a_262k_vocabulary(gemma_onnx):
    """The grammar's mask over Gemma's 262,144 tokens: a schema-constrained answer parses and validates."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"schema": schema}}
    responses = list(gemma_onnx.generate("The capital of France, as JSON:", max_new_tokens=60, response_format=fmt))
    assert responses[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(r.text for r in responses)), schema)
