"""Model families on tiny random models built with transformers: Qwen2 (q/k/v biases, tied or untied
head), Qwen3 (per-head q/k RMSNorm) and Llama 3 rope scaling, exported to ONNX and compared with
transformers on the same weights."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.families import get_family, supported_architectures
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.manifest import PackageError, read_manifest

pytestmark = pytest.mark.usefixtures("home")
TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}
# family -> (transformers class names, config overrides); head_dim 16 keeps the rope tables small
FAMILIES = {
    "qwen2-tied": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen2-untied": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False, rope_theta=5e5)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(tie_word_embeddings=True, head_dim=16, rope_theta=1e6)),
    "llama3": ("LlamaForCausalLM", "LlamaConfig", dict(tie_word_embeddings=False, rope_theta=5e5,
                                                       rope_scaling=LLAMA3_SCALING)),
    # 6 layers: 5 sliding-window (window 5, shorter than the prompts) and a global one, as in Gemma 3
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(tie_word_embeddings=True, head_dim=16, rope_theta=1e6,
                                                             num_hidden_layers=6, sliding_window=5,
                                                             query_pre_attn_scalar=16)),
    # fused qkv / gate_up; a sliding window on every layer, shorter than the prompts
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(tie_word_embeddings=False, rope_theta=1e4, sliding_window=6,
                                                   pad_token_id=0)),
}


def build_tiny(folder, family: str, seed: int = 0):
    """A tiny random model of `family` saved with save_pretrained, with the tiny Llama's tokenizer."""
    import torch
    import transformers

    build_tiny_llama(folder, seed=seed, num_hidden_layers=1)  # tokenizer files (the Llama is replaced)
    model_cls, config_cls, overrides = FAMILIES[family]
    config = dict(vocab_size=json.loads((folder / "config.json").read_text())["vocab_size"], hidden_size=64,
                  intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  initializer_range=0.2) | overrides
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    with torch.no_grad():  # random norms and biases, so a wrong or missing one cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory):
    """(family, HF folder, transformers model, fp32 engine)."""
    import torch
    import transformers

    torch.set_num_threads(2)
    folder = build_tiny(tmp_path_factory.mktemp("hf") / request.param, request.param, seed=7)
    out = tmp_path_factory.mktemp("pkg") / request.param
    export(folder, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return request.param, folder, model, edgerun.Engine(out, max_context=128)


def _reference_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


def test_spec_carries_the_family_differences(family_model):
    family, _, _, engine = family_model
    spec = engine.manifest.model
    assert spec.architecture == family.split("-")[0].replace("llama3", "llama")
    assert spec.attention_bias is family.startswith("qwen2")
    assert spec.qk_norm is (family in ("qwen3", "gemma3"))
    assert spec.tie_embeddings is FAMILIES[family][2]["tie_word_embeddings"]
    assert spec.rope_theta == FAMILIES[family][2]["rope_theta"]  # from the checkpoint, not a default
    assert (spec.rope_scaling or {}).get("rope_type") == ("llama3" if family == "llama3" else None)


def test_logits_match_transformers(family_model):
    _, _, model, engine = family_model
    long_prompt = (TOKENS * 6)[:60]  # past the 16-token original context: llama3 scaling matters
    for tokens in (TOKENS, long_prompt):
        ours, ref = engine.logits(tokens), _reference_logits(model, tokens)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 2e-3


def test_greedy_generation_matches_transformers(family_model):
    import torch

    _, _, model, engine = family_model
    ref = model.generate(torch.tensor([TOKENS]), max_new_tokens=16, do_sample=False,
                         eos_token_id=None, pad_token_id=0)[0, len(TOKENS):].tolist()
    ours = [r.token for r in engine.generate(TOKENS, max_new_tokens=16, ignore_eos=True)]
    assert ours == ref


def test_batch_of_unequal_prompts_equals_single_rows(family_model):
    _, _, _, engine = family_model
    prompts = [TOKENS[:3], TOKENS]
    batched = list(engine.generate(prompts, max_new_tokens=8, ignore_eos=True))
    for row, prompt in enumerate(prompts):
        single = [r.token for r in engine.generate(prompt, max_new_tokens=8, ignore_eos=True)]
        assert [r.token for r in batched if r.index == row] == single


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_export_runs_and_stays_close(family_model, quant, tmp_path):
    family, folder, model, engine = family_model
    export(folder, tmp_path / quant, ExportOptions(quant=quant))
    quantized = edgerun.Engine(tmp_path / quant, max_context=128)
    assert read_manifest(tmp_path / quant).model == engine.manifest.model
    ours, ref = quantized.logits(TOKENS), engine.logits(TOKENS)
    # relative to the logits' spread: int8 is near exact, int4 stays in the neighbourhood
    spread = ref.std()
    assert np.abs(ours - ref).mean() <= (0.05 if quant == "int8" else 0.4) * spread, family


def test_calibration_forward_matches_the_package(family_model):
    """GPTQ's numpy forward (export/calibrate.py) computes what the fp32 graphs compute, for every
    family's differences (biases, q/k norms, post norms, GeGLU, sliding windows, fused weights)."""
    from edgerun.export.calibrate import SEQUENTIAL, rms_norm

    family, folder, _, engine = family_model
    ckpt = load_checkpoint(folder)
    spec, weights = ckpt.spec, ckpt.weights
    x = SEQUENTIAL[spec.architecture](spec, weights, np.array([TOKENS]), lambda *a: None, weights["embed"],
                                      False, False)
    head = weights["embed"] if spec.tie_embeddings else weights["lm_head"]
    logits = rms_norm(x, weights["final_norm"], spec.rms_norm_eps)[0] @ head.T
    assert np.abs(logits - engine.logits(TOKENS)).max() <= 2e-3, family


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "phi3"])
def test_gptq_calibrated_export_runs(tmp_path, family):
    folder = build_tiny(tmp_path / "hf", family, seed=3)
    export(folder, tmp_path / "gptq", ExportOptions(quant="int4-gptq"))
    engine = edgerun.Engine(tmp_path / "gptq", max_context=64)
    export(folder, tmp_path / "fp32")
    reference = edgerun.Engine(tmp_path / "fp32", max_context=64)
    ours, ref = engine.logits(TOKENS), reference.logits(TOKENS)
    # in the neighbourhood of the float model (a random tiny model is no measure of GPTQ against RTN:
    # measured 0.20 / 0.49 / 0.32 x std here, RTN int4 0.22 / 0.39 / 0.28; the calibration forward
    # itself matches the graphs, test_calibration_forward_matches_the_package)
    assert np.abs(ours - ref).mean() <= 0.6 * ref.std(), family


@pytest.mark.parametrize("family", ["qwen2-untied", "qwen3", "llama3", "gemma3"])
def test_gguf_export_runs_on_llamacpp(family, tmp_path):
    """Our GGUF writer on biases / q-k norms / rope scaling (rope_freqs): llama.cpp greedy equals fp32 ONNX."""
    pytest.importorskip("llama_cpp")
    folder = build_tiny(tmp_path / "hf", family, seed=5)
    export(folder, tmp_path / "pkg", ExportOptions(formats=("onnx", "gguf")))
    onnx_engine = edgerun.Engine(tmp_path / "pkg", max_context=64, backend="onnx")
    gguf_engine = edgerun.Engine(tmp_path / "pkg", max_context=64, backend="llamacpp")
    ours = [r.token for r in onnx_engine.generate(TOKENS, max_new_tokens=12, ignore_eos=True)]
    assert [r.token for r in gguf_engine.generate(TOKENS, max_new_tokens=12, ignore_eos=True)] == ours


@pytest.mark.parametrize("family", ["gemma3", "qwen2-untied"])
def test_bench_hf_folder_of_a_gguf_holds_its_weights(family, tmp_path, monkeypatch):
    """The bench's Hugging Face folder of a non-Llama GGUF (what onnxruntime-genai's builder reads) is
    written by transformers' GGUF loader and gives the source model's logits."""
    import torch
    import transformers

    from edgerun.bench.artifacts import save_with_transformers

    if family == "gemma3":  # transformers' GGUF loader takes Gemma 3's head_dim as 256 (the real model's)
        model_cls, config_cls, overrides = FAMILIES["gemma3"]
        monkeypatch.setitem(FAMILIES, "gemma3", (model_cls, config_cls, overrides | dict(
            head_dim=256, query_pre_attn_scalar=256, num_attention_heads=2, num_key_value_heads=1)))
    folder = build_tiny(tmp_path / "hf", family, seed=5)
    export(folder, tmp_path / "pkg", ExportOptions(formats=("gguf",)))
    save_with_transformers(tmp_path / "pkg" / "model.gguf", tmp_path / "out")
    logits = []
    for source in (folder, tmp_path / "out"):
        model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(torch.tensor([TOKENS])).logits[0].numpy())
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_unknown_architecture_is_one_line_listing_supported(tmp_path):
    folder = build_tiny(tmp_path / "hf", "qwen3")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "mamba9"}))
    with pytest.raises(PackageError) as info:
        load_checkpoint(folder)
    message = str(info.value)
    assert "\n" not in message and "'mamba9'" in message
    assert all(name in message for name in ("llama", "qwen2", "qwen3"))
    assert {"llama", "qwen2", "qwen3"} <= set(supported_architectures())
    assert get_family("qwen2").name == "qwen2"


def test_unsupported_rope_scaling_names_itself(tmp_path):
    folder = build_tiny(tmp_path / "hf", "llama3")
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match=r"rope scaling 'yarn' is not supported yet \(supported: default, llama3\)"):
        load_checkpoint(folder)


def test_a_checkpoint_without_a_template_gets_its_familys(tmp_path, caplog):
    """Gemma 3's GGUF ships no chat template: the family's standard one is used, with a log line."""
    import logging

    from edgerun.export.checkpoint import load_checkpoint
    from edgerun.export.families.gemma3 import CHAT_TEMPLATE

    folder = build_tiny(tmp_path / "gemma3", "gemma3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO):
        ckpt = load_checkpoint(folder)
    assert ckpt.chat_template == CHAT_TEMPLATE and "ships no chat template" in caplog.text
    export(folder, tmp_path / "pkg")
    engine = edgerun.Engine(tmp_path / "pkg", max_context=64)
    text = engine.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert text == "<s><start_of_turn>user\nbe brief\n\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_phi3_limits_are_one_line_errors(tmp_path):
    """Writing a phi3 GGUF (fused tensors) and the 128k models' longrope scaling are refused by name."""
    folder = build_tiny(tmp_path / "phi3", "phi3")
    with pytest.raises(PackageError, match="writing a phi3 GGUF is not supported"):
        export(folder, tmp_path / "gguf", ExportOptions(formats=("gguf",)))
    assert not (tmp_path / "gguf").exists()
    config = json.loads((folder / "config.json").read_text())
    config["rope_scaling"] = {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match="longrope"):
        export(folder, tmp_path / "onnx")
