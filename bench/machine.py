"""What the benchmark ran on: CPU, cores, SIMD flags, memory bandwidth, package versions, commit."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx_vnni", "amx_tile", "neon", "asimd", "asimddp", "sve")
PACKAGES = ("edge-run", "numpy", "onnxruntime", "onnx", "llama_cpp_python", "onnxruntime-genai", "torch",
            "transformers", "accelerate", "tokenizers", "gguf", "psutil", "rich", "matplotlib")


def cpu_info() -> dict:
    """CPU model, logical and physical cores, SIMD flags (from /proc/cpuinfo where there is one)."""
    import psutil

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags |= set(value.split())
    return {"model": model, "arch": platform.machine(), "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False), "simd": [f for f in SIMD_FLAGS if f in flags],
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the benchmark touches (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(start: Path | None = None) -> str | None:
    """The checkout's HEAD commit, read from .git without running git (None outside a checkout)."""
    start = (start or Path(__file__)).resolve()
    for folder in (start, *start.parents):
        git = folder / ".git"
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
        return None
    return None


def read_bandwidth(megabytes: int = 1024, threads: int = 1, rounds: int = 5) -> float:
    """This machine's memory read bandwidth in bytes/s: best of `rounds` max-reductions over a buffer.

    The buffer (far larger than any cache) is split across `threads` threads; numpy's SIMD max
    does almost no arithmetic per byte and releases the GIL, so memory is the bound.

    Raises:
        ValueError: a size or count below 1.
    """
    if megabytes < 1 or threads < 1 or rounds < 1:
        raise ValueError(f"bandwidth probe needs megabytes, threads and rounds >= 1, got "
                         f"{megabytes}, {threads}, {rounds}")
    data = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best
