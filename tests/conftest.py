"""Shared fixtures: the real default model (pulled through pip), its package, tiny models."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "bench" / "experiments"


def experiment(name: str) -> ModuleType:
    """A research script of bench/experiments (not installed) imported from the checkout, with its
    folder on sys.path as when it runs as `python bench/experiments/NAME.py` (they import each other)."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == EXPERIMENTS, f"{name} resolved to {module.__file__}"
    return module


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF, pulled into the edge-run cache (a no-op when already there)."""
    from edgerun.hub import pull

    return pull("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_package(smollm2_gguf, tmp_path_factory) -> Path:
    """fp32 ONNX graphs plus the F32 GGUF of the same weights (backend "auto" picks onnx)."""
    from edgerun.export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("pkg") / "smollm2-fp32"
    export(smollm2_gguf, out, ExportOptions(formats=("onnx", "gguf")))
    return out


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_package):
    import edgerun

    return edgerun.Engine(smollm2_package, max_context=512)


@pytest.fixture(scope="session")
def mt_bench_prompts() -> list[str]:
    """First turn of the first MT-Bench question of each category (8 prompts)."""
    from edgerun import data

    first: dict[str, str] = {}
    for r in data.mt_bench():
        first.setdefault(r["category"], r["turns"][0])
    return list(first.values())


@pytest.fixture(scope="session")
def chat_prompts(smollm2_engine, mt_bench_prompts) -> list[list[int]]:
    """The MT-Bench prompts in the model's chat template, as token ids."""
    engine = smollm2_engine
    return [engine.encode(engine.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in mt_bench_prompts]


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """Hugging Face transformers' own GGUF loader: the independent reference implementation."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A private, empty edge-run cache for one test (the real one is never touched); test files that
    make packages or light packages use it for every test (`pytestmark = usefixtures("home")`)."""
    path = tmp_path / "home"
    monkeypatch.setenv("EDGE_RUN_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def tiny256(tmp_path_factory) -> Path:
    """A tiny Llama whose rows are multiples of 256, so every GGML block type (TQ*, K-quants) fits."""
    return build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny256", seed=11, hidden_size=256,
                            intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def build_tiny_llama(folder: Path, seed: int = 0, tie: bool = True, **overrides) -> Path:
    """Save a randomly initialised tiny Llama (HF format + byte-level BPE tokenizer) to `folder`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20,
                                   "edge run exports small language models to onnx"], trainer)
    config = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    with torch.no_grad():  # random norms, so a wrong norm weight cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}"}))
    return folder


def torch_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].numpy()


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory) -> Path:
    """A tiny random Llama (with a chat template) as an fp32 package: scheduler and server tests."""
    from edgerun.export.pipeline import ExportOptions, export

    # larger initial weights than HF's default: varied text instead of one repeated token
    folder = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-serve", seed=5, initializer_range=0.2)
    out = tmp_path_factory.mktemp("pkg") / "tiny-serve-fp32"
    export(folder, out, ExportOptions(formats=("onnx", "gguf")))  # backend auto: onnx; F32 GGUF for llama.cpp
    return out


def count_kv_copies(backend) -> list[int]:
    """Record the onnx backend's host<->device KV copies (`step_kv_copies`) of every forward call
    from now on: the returned list grows by one entry per call."""
    steps: list[int] = []
    forward = backend.forward

    def counted(*args, **kwargs):
        out = forward(*args, **kwargs)
        steps.append(backend.step_kv_copies)
        return out

    backend.forward = counted
    return steps
