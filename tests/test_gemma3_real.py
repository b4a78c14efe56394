"""Gemma 3 270M (Q4_K_M GGUF assembled from four PyPI parts): the gemma3 family on the real model.
Our fp32 ONNX export against transformers loading the same GGUF, and against llama.cpp."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "def fibonacci(n):"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gemma_gguf():
    from edgerun.hub import pull

    return pull("gemma3-270m")


@pytest.fixture(scope="module")
def gemma_onnx(gemma_gguf, tmp_path_factory):
    import edgerun
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "gemma-fp32"
    export(gemma_gguf, out, ExportOptions(formats=("onnx",)))
    return edgerun.Engine(out, max_context=256)


def test_spec_and_template_of_the_real_model(gemma_onnx):
    spec = gemma_onnx.manifest.model
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.vocab_size) == ("gemma3", 18, 640, 4, 1, 256, 262144)
    # the GGUF ships no chat template: the family's standard one, and <end_of_turn> ends a turn
    text = gemma_onnx.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.endswith("<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")
    assert gemma_onnx.tokenizer.token_to_id("<end_of_turn>") in gemma_onnx.eos_token_ids


def test_logits_match_transformers_on_the_same_gguf(gemma_gguf, gemma_onnx):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_gguf.parent), gguf_file=gemma_gguf.name, dtype=torch.float32).eval()
    engine = gemma_onnx
    tokens = engine.encode(engine.apply_chat_template([{"role": "user", "content": "Explain recursion."}]),
                           add_special_tokens=False)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    ours = engine.logits(tokens)
    assert ours.shape == ref.shape == (len(tokens), 262144)
    assert np.abs(ours - ref).max() <= 2e-3


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
