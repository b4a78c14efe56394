"""Execution providers: the only place in edge-run that names them.

A device name ("cpu", "cuda", "coreml", ...) maps to an onnxruntime provider, its options, and
where OrtValues (the KV cache) live. "auto" takes the first available in preference order.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

if TYPE_CHECKING:
    import onnxruntime as ort

# onnxruntime is imported where it is used, so the llama.cpp path never loads it (~25 MB resident)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """An execution target.

    Attributes:
        name: edge-run device name.
        provider: onnxruntime execution provider.
        ort_device: OrtValue device type for activations passed between stage graphs ("cpu" or "cuda").
        options: provider options.
    """

    name: str
    provider: str
    ort_device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)


# preference order for "auto"; mobile / NPU providers first where they exist
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("cuda", "CUDAExecutionProvider", "cuda"),
    Device("dml", "DmlExecutionProvider"),
    Device("coreml", "CoreMLExecutionProvider"),
    Device("qnn", "QNNExecutionProvider",
           options={"backend_path": "QnnHtp.dll" if os.name == "nt" else "libQnnHtp.so"}),
    Device("nnapi", "NnapiExecutionProvider"),
    Device("xnnpack", "XnnpackExecutionProvider"),
    Device("cpu", "CPUExecutionProvider"),
)}


def available_devices() -> list[str]:
    import onnxruntime as ort

    providers = set(ort.get_available_providers())
    return [name for name, d in DEVICES.items() if d.provider in providers]


def resolve_device(name: str = "cpu") -> Device:
    """Return the Device for `name` ("auto" = best available).

    Raises:
        ValueError: unknown name, or its provider is not in this onnxruntime build.
    """
    import onnxruntime as ort

    if name == "auto":
        name = available_devices()[0]
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of: auto, {', '.join(DEVICES)}")
    device = DEVICES[name]
    if device.provider not in ort.get_available_providers():
        raise ValueError(f"device {name!r} needs {device.provider}, which this onnxruntime build lacks "
                         f"(available: {', '.join(available_devices())}); install the matching "
                         f"onnxruntime package (e.g. onnxruntime-gpu for cuda)")
    return device


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def session_options(threads: int | None = None, spinning: bool = True) -> ort.SessionOptions:
    """Session options for decoding: all graph optimisations, one thread per physical core."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        # with several stage sessions, a finished session's spinning workers starve the next one
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    else:
        # workers spin between the kernels of one run but stop when it returns: spinning past the
        # run starves whatever runs next (a draft model's session, llama.cpp, the sampler)
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def providers_for(device: Device) -> list[tuple[str, dict[str, Any]]]:
    """Provider list for an InferenceSession: the device's provider, CPU as fallback for the rest."""
    chain = [(device.provider, dict(device.options))]
    if device.provider != "CPUExecutionProvider":
        chain.append(("CPUExecutionProvider", {}))
    return chain


# llama.cpp offloads to whatever GPU backend it was built with (CUDA, Metal, Vulkan, ...);
# these device names ask for that offload, "cpu" keeps every layer on the CPU.
LLAMACPP_GPU_DEVICES = ("cuda", "metal", "vulkan")


def llamacpp_offload(name: str, gpu_available: bool) -> bool:
    """Whether llama.cpp should offload layers to a GPU for device `name`.

    Args:
        name: edge-run device name ("cpu", "cuda", "auto", ...).
        gpu_available: whether this llama.cpp build can offload (llama_supports_gpu_offload()).
    Raises:
        ValueError: the device is unknown to llama.cpp, or asks for a GPU this build lacks.
    """
    if name == "cpu":
        return False
    if name == "auto":
        return gpu_available
    if name not in LLAMACPP_GPU_DEVICES:
        raise ValueError(f"device {name!r} is not one llama.cpp runs on; choose cpu, auto or "
                         f"{', '.join(LLAMACPP_GPU_DEVICES)} (or use --backend onnx for {name})")
    if not gpu_available:
        raise ValueError(f"device {name!r}: this llama-cpp-python build has no GPU support; reinstall it "
                         f"with GPU support (e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install llama-cpp-python) "
                         f"or use --device cpu")
    return True
