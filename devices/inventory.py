"""What this machine can run: the targets present, their libraries' versions, and where a graph's nodes go.

`node_placement` takes the split from onnxruntime itself: a session is made with verbose logging,
and onnxruntime's own "Node placements" report (session_state.cc, logged when a session is
initialized) says how many nodes each provider took. The session runs in a child process, so its
log (C++ stderr) can be read and a provider that crashes takes nothing else down.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .profiles import Profile, load_profiles

CPU = "CPUExecutionProvider"
# distributions that provide the `onnxruntime` module (or load into it), in the order they are looked for
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-ep-webgpu")
PLACEMENT_TIMEOUT_S = 600

_SESSION = """
import importlib, json, sys
import onnxruntime as ort
path, provider, options, plugin = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
opts = ort.SessionOptions()
opts.log_severity_level = 0  # verbose: onnxruntime then logs its node placements
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
if plugin:  # a plugin EP: registered, then added through its EP devices
    ort.register_execution_provider_library(plugin, importlib.import_module(plugin).get_library_path())
    opts.add_provider_for_devices([d for d in ort.get_ep_devices() if d.ep_name == provider], options)
    ort.InferenceSession(path, opts)
else:
    chain = [(provider, options)] + ([("CPUExecutionProvider", {})] if provider != "CPUExecutionProvider" else [])
    ort.InferenceSession(path, opts, providers=chain)
"""
_PLACED = re.compile(r"(?:All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")


@dataclass(frozen=True)
class Placement:
    """How onnxruntime split a graph between a provider and the CPU provider.

    Attributes:
        provider: the provider asked for first.
        nodes: graph nodes after onnxruntime's provider-independent (basic) optimizations.
        on_cpu: of those, the nodes the CPU provider runs (the provider's share is the rest,
            possibly fused by it into fewer compiled subgraphs).
        subgraphs: nodes onnxruntime reports on `provider` (compiled subgraphs count once).
    """

    provider: str
    nodes: int
    on_cpu: int
    subgraphs: int

    @property
    def share(self) -> float:
        """The fraction of the graph's nodes that `provider` runs."""
        if self.provider == CPU:
            return 1.0
        return (self.nodes - self.on_cpu) / self.nodes if self.nodes else 0.0


def _placed(graph: Path, provider: str, options: dict, plugin: str | None = None) -> dict[str, int]:
    """Nodes per provider as onnxruntime's verbose log reports them for a session on `provider`."""
    try:
        run = subprocess.run([sys.executable, "-c", _SESSION, str(graph), provider, json.dumps(options), plugin or ""],
                             capture_output=True, text=True, timeout=PLACEMENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ValueError(f"{provider} took over {PLACEMENT_TIMEOUT_S} s to load {graph}") from None
    if run.returncode != 0:
        reason = next((line for line in reversed(run.stderr.splitlines()) if line.strip()), "no reason given")
        raise ValueError(f"{provider} cannot load {graph}: {reason[:300]}")
    counts: dict[str, int] = {}
    for name, count in _PLACED.findall(run.stderr):
        counts[name] = counts.get(name, 0) + int(count)
    if not counts:
        raise ValueError(f"onnxruntime's log for {graph} on {provider} holds no node placements (its format "
                         f"changed?); cannot tell the split")
    return counts


def node_placement(graphs: list[Path], provider: str, options: dict | None = None,
                   plugin: str | None = None) -> Placement:
    """How onnxruntime places the nodes of `graphs` (a package's stages) with `provider` first.

    `plugin`: the Python module of a plugin EP library providing `provider` (e.g. onnxruntime_ep_webgpu).

    Raises:
        ValueError: the provider cannot load a graph (its reason), or the log holds no placements.
    """
    nodes = on_cpu = subgraphs = 0
    for graph in graphs:
        total = _placed(graph, CPU, {})[CPU]
        placed = _placed(graph, provider, options or {}, plugin) if provider != CPU else {CPU: total}
        nodes += total
        on_cpu += placed.get(CPU, 0) if provider != CPU else 0
        subgraphs += placed.get(provider, 0)
    return Placement(provider, nodes, on_cpu, subgraphs)


def onnxruntime_version() -> str:
    """The imported onnxruntime module's version and the distribution whose version matches it."""
    import onnxruntime as ort

    for name in ORT_DISTRIBUTIONS:
        try:
            if metadata.version(name) == ort.__version__:
                return f"{name} {ort.__version__}"
        except metadata.PackageNotFoundError:
            continue
    return f"onnxruntime {ort.__version__}"


def llamacpp_info() -> tuple[str, bool, str]:
    """(llama-cpp-python version, whether it can offload to a GPU, llama.cpp's system info line)."""
    try:
        import llama_cpp
    except ImportError:
        return "not installed", False, ""
    info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    return llama_cpp.__version__, bool(llama_cpp.llama_supports_gpu_offload()), info


def llamacpp_has_backend(profile: Profile, system_info: str) -> bool:
    """Whether llama.cpp's system info lists the GPU backend of `profile` (e.g. "Vulkan : ...")."""
    return re.search(rf"\b{re.escape(profile.name)}\s*:", system_info, re.IGNORECASE) is not None


def present_targets() -> list[tuple[Profile, bool, str]]:
    """Every profile with whether it is usable here and the library that runs it (and its version)."""
    from .providers import DEVICES, available_devices

    ort_version = onnxruntime_version()
    present = set(available_devices())
    llc_version, offload, info = llamacpp_info()
    rows = []
    for profile in load_profiles().values():
        if profile.onnx:
            plugin = DEVICES[profile.name].plugin
            version = f"{profile.plugin} {metadata.version(profile.plugin)} in {ort_version}" \
                if plugin and profile.name in present else ort_version
            rows.append((profile, profile.name in present, version))
        else:
            usable = offload and llamacpp_has_backend(profile, info)
            rows.append((profile, usable, f"llama-cpp-python {llc_version} (GPU offload: {offload})"))
    return rows


__all__ = ["Placement", "llamacpp_has_backend", "llamacpp_info", "node_placement", "onnxruntime_version",
           "present_targets"]
