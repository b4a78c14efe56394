"""Execution providers: the only place in edge-run that names them.

A device name ("cpu", "cuda", "coreml", ...) maps to an onnxruntime provider, its options, and
where OrtValues (the KV cache) live; the table is derived from the device profiles
(`profiles.json`, see `profiles.py`). "auto" takes the first available in preference order.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from .inventory import llamacpp_has_backend
from .profiles import load_profiles

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
        plugin: Python module of a plugin EP library that loads into onnxruntime (None: built in).
        host_inputs: the provider reads its inputs from host memory; otherwise onnxruntime copies an
            input to the provider's memory when it is bound (so a rewritten host buffer is bound again).
    """

    name: str
    provider: str
    ort_device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)
    plugin: str | None = None
    host_inputs: bool = True


def _devices() -> dict[str, Device]:
    return {p.name: Device(p.name, p.provider, p.ort_device, dict(p.options),
                           p.plugin.replace("-", "_") if p.plugin else None, p.host_inputs)
            for p in load_profiles().values() if p.onnx}


# every onnxruntime target of devices/profiles.json, in its ("auto" preference) order
DEVICES: dict[str, Device] = _devices()


def available_devices() -> list[str]:
    import onnxruntime as ort

    providers = set(ort.get_available_providers())
    return [name for name, d in DEVICES.items() if d.provider in providers or d.plugin and plugin_devices(d)]


_registered: set[str] = set()


def plugin_devices(device: Device) -> list:
    """The OrtEpDevices a plugin EP (e.g. onnxruntime-ep-webgpu) offers here, registering its library
    once; empty when the plugin is not installed or finds no device."""
    import importlib

    import onnxruntime as ort

    try:
        module = importlib.import_module(device.plugin)
    except ImportError:
        return []
    if device.plugin not in _registered and hasattr(ort, "register_execution_provider_library"):
        ort.register_execution_provider_library(device.plugin, module.get_library_path())
        _registered.add(device.plugin)
    return [d for d in getattr(ort, "get_ep_devices", list)() if d.ep_name == device.provider]


def _auto_device() -> str:
    """The first profile "auto" may pick whose provider this onnxruntime has (CPU at the latest)."""
    profiles = load_profiles()
    return next(name for name in available_devices() if profiles[name].auto)


def resolve_device(name: str = "cpu") -> Device:
    """Return the Device for `name` ("auto" = best available).

    Raises:
        ValueError: unknown name, or its provider is not in this onnxruntime build.
    """
    import onnxruntime as ort

    if name == "auto":
        name = _auto_device()
    if name not in DEVICES:
        profile = load_profiles().get(name)
        if profile is not None:  # a llama.cpp-only target
            raise ValueError(f"device {name!r} is a llama.cpp GPU backend; run a GGUF package with --backend "
                             f"llamacpp, or choose an onnxruntime device: auto, {', '.join(DEVICES)}")
        raise ValueError(f"unknown device {name!r}; choose one of: auto, {', '.join(DEVICES)}")
    device = DEVICES[name]
    if device.plugin and plugin_devices(device):
        return device
    if device.provider not in ort.get_available_providers():
        profile = load_profiles()[name]
        raise ValueError(f"device {name!r} needs {device.provider}, which this onnxruntime build lacks "
                         f"(available: {', '.join(available_devices())}); install {profile.wheel} "
                         f"in place of onnxruntime")
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
    # no CPU arena: it keeps the high-water mark of every shape it served (a batch of 8, a long
    # prompt) for the session's life; freed buffers go back to the allocator instead (README:
    # design notes, runtime)
    opts.enable_cpu_mem_arena = False
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


def open_session(path: str, options: ort.SessionOptions, device: Device) -> ort.InferenceSession:
    """An InferenceSession of `path` on `device` (CPU for what its provider lacks).

    A plugin EP (webgpu) is added to the session options through its EP devices; a built-in provider
    goes in the provider list.
    """
    import onnxruntime as ort

    if device.plugin:
        options.add_provider_for_devices(plugin_devices(device), dict(device.options))
        return ort.InferenceSession(path, options)
    return ort.InferenceSession(path, options, providers=providers_for(device))


# llama.cpp offloads to whatever GPU backend it was built with (CUDA, Metal, Vulkan, ...);
# these device names (profiles with llamacpp_cmake) ask for that offload, "cpu" keeps every layer on the CPU.
LLAMACPP_GPU_DEVICES = tuple(p.name for p in load_profiles().values() if p.llamacpp_cmake)


def llamacpp_offload(name: str, gpu_available: bool, system_info: str | None = None) -> bool:
    """Whether llama.cpp should offload layers to a GPU for device `name`.

    Args:
        name: edge-run device name ("cpu", "cuda", "vulkan", "metal", "auto", ...).
        gpu_available: whether this llama.cpp build can offload (llama_supports_gpu_offload()).
        system_info: llama.cpp's system info line (llama_print_system_info()), which names the GPU
            backend it was built with; None skips that check.
    Raises:
        ValueError: the device is unknown to llama.cpp, or asks for a GPU backend this build lacks
            (the message gives the CMAKE_ARGS to rebuild llama-cpp-python with).
    """
    if name == "cpu":
        return False
    if name == "auto":
        return gpu_available
    if name not in LLAMACPP_GPU_DEVICES:
        raise ValueError(f"device {name!r} is not one llama.cpp runs on; choose cpu, auto or "
                         f"{', '.join(LLAMACPP_GPU_DEVICES)} (or use --backend onnx for {name})")
    profile = load_profiles()[name]
    built = system_info is None or llamacpp_has_backend(profile, system_info)
    if not gpu_available or not built:
        what = "cannot offload to a GPU" if not gpu_available else f"was built without the {name} backend"
        raise ValueError(f"device {name!r}: this llama-cpp-python build {what}; rebuild it with "
                         f"CMAKE_ARGS=\"{profile.llamacpp_cmake}\" pip install --force-reinstall --no-cache-dir "
                         f"llama-cpp-python, or use --device cpu")
    return True
