"""CUDA: the onnxruntime CUDA execution provider and llama.cpp GPU offload give the CPU's results.

These run only where the hardware and the matching builds exist (onnxruntime-gpu; a CUDA build of
llama-cpp-python) and are skipped elsewhere with the reason. Both paths are the same code the CPU
runs: the device only changes the provider / `n_gpu_layers` (onnx keeps the KV cache in host memory
on every provider, see runtime.kv_cache). Checked on an H100 with onnxruntime-gpu 1.31.1 and
llama-cpp-python 0.3.36 built with -DGGML_CUDA=on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.pipeline import ExportOptions, export

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
