"""onnxruntime backend for a generic exported decoder graph (optimum's `text-generation-with-past`).

Such a graph takes `input_ids`, `attention_mask` over past + new positions, `position_ids`
(required here) and `past_key_values.N.key/value` [batch, kv_heads, past, head_dim]; it returns
`logits` for every new token and `present.N.key/value`, the past with the new keys/values
concatenated. The present of a step is the next step's past as it is (`kv_cache.SlotKVCache`), so
edge-run copies no cache per step, but the graph itself copies the whole past into each present:
the cost edge-run's own graphs avoid with a KV buffer updated in place.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..devices.providers import open_session, resolve_device, session_options
from .backend import register_backend
from .kv_cache import SlotKVCache
from .manifest import Manifest, ModelSpec, PackageError, Stage
from .memory import release_mapped_pages
from .onnx_backend import stage_graph

log = logging.getLogger(__name__)

# what a package of a generic graph cannot do, and why (`edge-run info` and the README list these)
LIMITS = (
    "early exit and self:K drafting: the graph is one piece, without stage boundaries or exit heads",
    "depth pruning, --heal, --exit-layers, --stage-boundaries: edge-run cannot edit a graph it did not build",
    "GGUF export and the llama.cpp backend: no family module maps its tensors",
    "--kv-cache f16 and export --device variants (mobile, ORT format): the graph is exported once, in float32",
    "quantization: only --quant int8 / int4, onnxruntime's MatMulNBits (round to nearest) on the "
    "MatMul/Gemm weights; no GPTQ or recipes, embeddings stay float32",
    "speed: the graph copies its whole past into each step's present and computes logits for every new token",
)
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


def graph_layout(graph, where: str) -> tuple[int, int, int, int]:
    """(layers, kv_heads, head_dim, vocab_size) of a generic decoder graph.

    Raises:
        PackageError: the graph lacks an input or output such a decoder has, or its past is not
            [batch, kv_heads, past, head_dim] with fixed heads and head size; names what and where.
    """
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    missing = [n for n in ("input_ids", "attention_mask") if n not in inputs] + \
              [n for n in ("logits",) if n not in outputs]
    layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST.match(n))})
    if missing or not layers or layers != list(range(len(layers))):
        raise PackageError(f"{where} is not a decoder graph with a KV past (missing: {', '.join(missing) or 'none'}; "
                           f"past layers: {layers or 'none'}); export it with the text-generation-with-past task")
    shapes = set()
    for layer in layers:
        for kind in ("key", "value"):
            for name, values in ((f"past_key_values.{layer}.{kind}", inputs), (f"present.{layer}.{kind}", outputs)):
                if name not in values:
                    raise PackageError(f"{where} lacks {name}; its KV cache is not the past/present pairs "
                                       f"edge-run runs (past_key_values.N.key/value in, present.N.key/value out)")
                dims = values[name].type.tensor_type.shape.dim
                shapes.add((len(dims), dims[1].dim_value if len(dims) == 4 else 0,
                            dims[3].dim_value if len(dims) == 4 else 0))
    if len(shapes) != 1 or next(iter(shapes))[0] != 4 or 0 in next(iter(shapes))[1:]:
        raise PackageError(f"{where}: its past/present are not [batch, kv_heads, sequence, head_dim] with fixed "
                           f"heads and head size (found {sorted(shapes)}); edge-run's generic backend runs only "
                           f"that layout")
    _, heads, head_dim = next(iter(shapes))
    vocab = outputs["logits"].type.tensor_type.shape.dim
    if len(vocab) != 3 or not vocab[2].dim_value:
        raise PackageError(f"{where}: logits are not [batch, sequence, vocab] with a fixed vocabulary")
    if "position_ids" not in inputs:
        # without it the graph numbers new tokens by the past's length, which padding slots and
        # rolled-back drafts would shift
        raise PackageError(f"{where} takes no position_ids, so the positions of batched and speculative steps "
                           f"would be wrong; edge-run runs only generic graphs that take them")
    return len(layers), heads, head_dim, vocab[2].dim_value


def _check_io(path: Path, graph, stage: Stage, spec: ModelSpec) -> None:
    layers, heads, head_dim, vocab = graph_layout(graph, str(path))
    found = {"num_layers": layers, "num_kv_heads": heads, "head_dim": head_dim, "vocab_size": vocab}
    for field, value in found.items():
        if getattr(spec, field) != value:
            raise PackageError(f"{path} does not fit its manifest: the graph has {field} {value}, the manifest's "
                               f"model.{field} is {getattr(spec, field)}; re-export the package")


class GenericOnnxBackend:
    """Runs a package's generic decoder graph (manifest.generic) on onnxruntime, whole model per call."""

    name = "onnx"
    library = "onnxruntime"
    staged = False
    # require_staged's message for this backend (early exit, self-speculation)
    unstaged_reason = ("this package's graph was made by a generic exporter (optimum) as one piece, without the "
                       "stage boundaries and exit heads it needs; export a model of a supported family for it")

    def __init__(self, package_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 kv_cache: str = "f32", batch_invariant: bool = False):
        """`batch_invariant`: as the onnx backend (backend.InvariantSteps wraps this one)."""
        if kv_cache != "f32":
            raise ValueError(f"this package's graph was made by a generic exporter and keeps its KV cache in "
                             f"float32; --kv-cache {kv_cache} is not available for it (drop the option)")
        if manifest.device not in (None, "cpu"):
            raise PackageError(f"package {package_dir} claims device variant {manifest.device}, which a generic "
                               f"graph does not have; re-export it")
        self.manifest, self.device = manifest, resolve_device(device)
        stage = manifest.stages[0]
        path = stage_graph(package_dir, 0, stage, manifest.model, check_io=_check_io)
        try:
            self.session = open_session(str(path), session_options(threads), self.device)
        except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail,
                ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
            raise PackageError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        spec = manifest.model
        self._past = [f"past_key_values.{i}.{kind}" for i in range(spec.num_layers) for kind in ("key", "value")]
        self._outputs = ["logits"] + [f"present.{i}.{kind}" for i in range(spec.num_layers)
                                      for kind in ("key", "value")]
        data = path.with_name(path.name + ".data")
        self.weight_bytes = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        release_mapped_pages([data] if data.is_file() else [])

    def new_cache(self, batch: int, max_len: int) -> SlotKVCache:
        spec = self.manifest.model
        return SlotKVCache(spec.num_layers, spec.num_kv_heads, spec.head_dim, batch, max_len)

    def forward(self, inputs: np.ndarray, cache: SlotKVCache, counts: np.ndarray,
                logits_positions: np.ndarray) -> np.ndarray:
        """Append `inputs` (int64 [B, S], right-padded; `counts[b]` real tokens in row b) to each
        sequence and return float32 logits [B, N, vocab] at `logits_positions` [B, N].

        Raises:
            ValueError: a sequence would pass the cache's max_len.
        """
        if not isinstance(inputs, np.ndarray):
            raise ValueError(f"the {self.name} backend of a generic graph takes token ids, not hidden states")
        counts = np.asarray(counts)
        positions, mask = cache.step_inputs(counts, inputs.shape[1])
        feeds = {"input_ids": np.ascontiguousarray(inputs, dtype=np.int64), "attention_mask": mask,
                 "position_ids": positions}
        feeds.update(zip(self._past, cache.arrays))
        logits, *presents = self.session.run(self._outputs, feeds)
        cache.append(presents, counts)
        index = np.asarray(logits_positions, dtype=np.int64)[:, :, None]
        return np.take_along_axis(logits, index, axis=1).astype(np.float32, copy=False)


register_backend("onnx-generic", GenericOnnxBackend)
