"""CUDA: the onnxruntime CUDA execution provider and llama.cpp GPU offload give the CPU's results.

These run only where the hardware and the matching builds exist (onnxruntime-gpu; a CUDA build of
llama-cpp-python) and are skipped elsewhere with the reason. Both paths are the same code the CPU
runs: the device only changes the provider / `n_gpu_layers`. An fp32 ONNX package keeps its KV cache
on the host (its attention runs on the CPU kernel); `test_cuda_matches_cpu` was checked on an H100
with onnxruntime-gpu 1.31.1 and llama-cpp-python 0.3.36 built with -DGGML_CUDA=on.

The `--device cuda` package (fp16 attention and KV cache) keeps its cache on the GPU
(runtime/device_kv_cache.py); the `gpu_resident` tests below check it against the same package on
the CPU provider. They have not run on a GPU yet (written in a session without one); the same code
path runs on CPU OrtValues in tests/test_device_kv.py.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import build_tiny_llama, count_kv_copies

import edgerun
from edgerun.devices.profiles import get_profile, load_profiles
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.device_kv_cache import DeviceKVCache
from edgerun.runtime.scheduler import Scheduler

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33]
PROMPTS = [[5, 17, 42], [99, 3, 250, 7, 61, 12], [200, 33]]

needs_ort_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason=f"onnxruntime has no CUDAExecutionProvider here (providers: {', '.join(ort.get_available_providers())}); "
           f"install onnxruntime-gpu on a machine with an NVIDIA GPU")


def _llama_gpu() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


needs_llama_gpu = pytest.mark.skipif(
    not _llama_gpu(), reason="this llama-cpp-python build cannot offload to a GPU (llama_supports_gpu_offload() "
                             "is false); build it with CMAKE_ARGS=-DGGML_CUDA=on on a CUDA machine")


@pytest.fixture(scope="module")
def tiny_both(tmp_path_factory) -> Path:
    hf = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=5)
    out = tmp_path_factory.mktemp("pkg") / "tiny-both"
    export(hf, out, ExportOptions(formats=("onnx", "gguf")))
    return out


def _greedy(engine, prompts, **options) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for r in engine.generate(prompts, max_new_tokens=12, **options):
        out[r.index].append(r.token)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [pytest.param("onnx", marks=needs_ort_cuda),
                                     pytest.param("llamacpp", marks=needs_llama_gpu)])
def test_cuda_matches_cpu(tiny_both, backend):
    cpu = edgerun.Engine(tiny_both, backend=backend, max_context=64)
    gpu = edgerun.Engine(tiny_both, backend=backend, device="cuda", max_context=64)
    np.testing.assert_allclose(gpu.logits(TOKENS), cpu.logits(TOKENS), atol=2e-3, rtol=0)
    expected = _greedy(cpu, PROMPTS)
    assert _greedy(gpu, PROMPTS) == expected  # batch 3, unequal lengths
    # speculative verification, several tokens per step, at batch 1 and batch 3 (rows accept
    # different numbers of drafts); the package drafts for itself, also on the GPU
    for speculative in ("lookup", f"draft:{tiny_both}"):
        assert _greedy(gpu, PROMPTS[1:2], speculative=speculative, draft_tokens=3) == expected[1:2], speculative
        assert _greedy(gpu, PROMPTS, speculative=speculative, draft_tokens=3) == expected, speculative


# -- the GPU-resident fp16 variant (export --device cuda) -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cuda(tmp_path_factory) -> Path:
    hf = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=5, initializer_range=0.2)
    out = tmp_path_factory.mktemp("pkg") / "tiny-cuda"
    export(hf, out, ExportOptions(device="cuda"))
    return out


@pytest.mark.gpu
@needs_ort_cuda
def test_gpu_resident_tiny_matches_cpu_with_no_kv_copies(tiny_cuda, monkeypatch):
    cpu = edgerun.Engine(tiny_cuda, max_context=64)  # the same fp16-attention package on the CPU provider
    gpu = edgerun.Engine(tiny_cuda, device="cuda", max_context=64)
    assert gpu.backend.kv_device == "cuda"
    steps = count_kv_copies(gpu.backend)
    np.testing.assert_allclose(gpu.logits(TOKENS), cpu.logits(TOKENS), atol=1e-2, rtol=0)
    expected = _greedy(cpu, PROMPTS)
    assert _greedy(gpu, PROMPTS) == expected
    for prompts in (PROMPTS[1:2], PROMPTS):
        assert _greedy(gpu, prompts, speculative="lookup", draft_tokens=3) == [expected[PROMPTS.index(p)]
                                                                                for p in prompts]
    assert isinstance(gpu._kv, DeviceKVCache) and gpu._kv.host_copies == 0
    assert steps and set(steps) == {0}
    # the prompt cache reaches the contents only through counted host copies
    with Scheduler(gpu, max_batch=2, prefill_chunk=4, prompt_cache_bytes=1 << 20) as scheduler:
        first = scheduler.submit(PROMPTS[1], max_new_tokens=6).result()
        for prompt in PROMPTS:
            scheduler.submit(prompt, max_new_tokens=4).result()
        again = scheduler.submit(PROMPTS[1] + first.tokens + [7], max_new_tokens=6).result()
        assert again.usage.cached_tokens >= len(PROMPTS[1])
        assert again.tokens == _greedy(cpu, [PROMPTS[1] + first.tokens + [7]])[0][:6]
        assert scheduler.cache.host_copies > 0
    # the counter counts: the same package with its cache on the host moves it every step
    monkeypatch.setitem(load_profiles(), "cuda", dataclasses.replace(get_profile("cuda"), kv_cache="host"))
    host = edgerun.Engine(tiny_cuda, device="cuda", max_context=64)
    host_steps = count_kv_copies(host.backend)
    assert _greedy(host, PROMPTS[:1]) == expected[:1]
    assert min(host_steps) == 4 * host.manifest.model.num_layers


@pytest.fixture(scope="module")
def smollm2_cuda(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M as the `--device cuda` variant: float weights, fp16 attention and KV cache."""
    out = tmp_path_factory.mktemp("pkg") / "smollm2-cuda"
    export(smollm2_gguf, out, ExportOptions(device="cuda"))
    return out


@pytest.mark.gpu
@needs_ort_cuda
def test_gpu_resident_fp16_variant_matches_the_fp16_cpu_reference(smollm2_cuda, mt_bench_prompts):
    """8 MT-Bench prompts x 64 greedy tokens identical to the same package on the CPU provider
    (its fp16 attention runs there too), logits within fp16 tolerance, no KV copies per step."""
    cpu = edgerun.Engine(smollm2_cuda, max_context=512)
    gpu = edgerun.Engine(smollm2_cuda, device="cuda", max_context=512)
    assert gpu.backend.kv_device == "cuda"
    prompts = [gpu.encode(gpu.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False)
               for p in mt_bench_prompts]
    want, got = cpu.logits(prompts[0]), gpu.logits(prompts[0])
    scale = float(np.abs(want).max())
    assert float(np.abs(got - want).max()) <= 1e-2 * scale, "logits beyond fp16 tolerance"
    steps = count_kv_copies(gpu.backend)
    decoded, seconds = 0, 0.0
    for k, prompt in enumerate(prompts):
        expected = [r.token for r in cpu.generate(prompt, max_new_tokens=64, ignore_eos=True)]
        start = time.perf_counter()
        tokens = [r.token for r in gpu.generate(prompt, max_new_tokens=64, ignore_eos=True)]
        seconds += time.perf_counter() - start
        decoded += len(tokens)
        assert tokens == expected, f"prompt {k}: first difference at token " \
            f"{next(i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b)}"
    assert set(steps) == {0}, "KV copied between host and device in a step"
    print(f"\nGPU-resident fp16 SmolLM2-135M: {decoded / seconds:.0f} tok/s (batch 1, prefill included)")
