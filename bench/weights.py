"""Bytes of weights an engine reads per decoded token, and its size on disk, from its model files.

Decoding one token reads every weight once, except tables it only gathers a few rows from
(an untied input embedding, rotary caches): those are left out. Computed by the harness, so
the workers never import onnx or gguf just to count (their memory figures stay their own).
"""
from __future__ import annotations

import json
from pathlib import Path

GATHER_OPS = {"Gather", "GatherElements", "GatherND", "GatherBlockQuantized", "GroupQueryAttention",
              "RotaryEmbedding"}  # ops that read a few rows of a table per token


def disk_bytes(path: Path) -> int:
    """Size of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def onnx_bytes_per_token(model_path: Path) -> int:
    """Initializer bytes of an ONNX graph one token reads: all but tables only gathered from."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in model.graph.initializer:
        uses = consumers.get(init.name, set())
        if uses and uses <= GATHER_OPS:
            continue
        total += initializer_bytes(init)
    return total


def initializer_bytes(init) -> int:
    """Stored bytes of an ONNX initializer (external data, raw data, or typed fields)."""
    import onnx

    external = {e.key: e.value for e in init.external_data}
    return int(external["length"]) if "length" in external else \
        len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes


def gguf_bytes_per_token(path: Path) -> int:
    """Tensor bytes of a GGUF one token reads (an untied token_embd is only gathered)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def safetensors_bytes_per_token(folder: Path) -> int:
    """Tensor bytes of a Hugging Face folder one token reads (an untied input embedding is gathered)."""
    from safetensors import safe_open

    config = json.loads((Path(folder) / "config.json").read_text())
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                if name.endswith("embed_tokens.weight") and not config.get("tie_word_embeddings", False):
                    continue
                view = f.get_slice(name)
                count = 1
                for d in view.get_shape():
                    count *= d
                total += count * _DTYPE_BYTES[view.get_dtype()]
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def edgerun_files(package: Path) -> tuple[int, int]:
    """(bytes per token, bytes on disk) of an edge-run package (its GGUF counted if kept elsewhere)."""
    from ..runtime.manifest import read_manifest

    package = Path(package)
    manifest = read_manifest(package)
    if manifest.stages:
        return sum(onnx_bytes_per_token(package / s.file) for s in manifest.stages), disk_bytes(package)
    gguf_file = manifest.gguf_path(package)
    outside = package.resolve() not in gguf_file.resolve().parents
    return gguf_bytes_per_token(gguf_file), disk_bytes(package) + (disk_bytes(gguf_file) if outside else 0)


def engine_files(engine: str, model: Path) -> tuple[int, int]:
    """(weight bytes read per token, bytes on disk) of what worker engine `engine` loads from `model`.

    Raises:
        ValueError: an engine this module does not know.
    """
    model = Path(model)
    if engine == "edgerun":
        if model.suffix == ".gguf":
            return gguf_bytes_per_token(model), disk_bytes(model)
        return edgerun_files(model)
    if engine == "llamacpp":
        return gguf_bytes_per_token(model), disk_bytes(model)
    if engine == "ortgenai":
        config = json.loads((model / "genai_config.json").read_text())
        return onnx_bytes_per_token(model / config["model"]["decoder"]["filename"]), disk_bytes(model)
    if engine == "transformers":
        return safetensors_bytes_per_token(model), disk_bytes(model)
    raise ValueError(f"no weight accounting for engine {engine!r}; "
                     f"expected edgerun, llamacpp, ortgenai or transformers")
