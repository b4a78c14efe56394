"""onnxruntime backend: runs a package's stage graphs with I/O binding over a shared KV cache."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..devices.providers import Device, providers_for, session_options
from .kv_cache import KVCache
from .manifest import Manifest, PackageError

log = logging.getLogger(__name__)


class OnnxBackend:
    """Runs stage graphs in order; hidden states pass between stages without leaving the device."""

    name = "onnx"

    def __init__(self, package_dir: Path, manifest: Manifest, device: Device, threads: int | None = None):
        self.manifest, self.device = manifest, device
        opts = session_options(threads)
        self.sessions = []
        for stage in manifest.stages:
            path = Path(package_dir) / stage.file
            if not path.is_file():
                raise PackageError(f"package {package_dir} lacks {stage.file}; re-export it")
            try:
                self.sessions.append(ort.InferenceSession(str(path), opts, providers=providers_for(device)))
            except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail,
                    ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
                raise PackageError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.bindings = [s.io_binding() for s in self.sessions]

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.manifest.model, self.manifest.model.num_layers, batch, max_len, self.device.ort_device)

    def forward(self, tokens: np.ndarray, cache: KVCache, counts: np.ndarray,
                logits_positions: np.ndarray) -> np.ndarray:
        """Run new tokens through every stage and advance the cache.

        Args:
            tokens: int64 [B, S] new tokens per row, right-padded where a row has fewer.
            cache: the KV cache; row b's tokens go at positions lengths[b] ...
            counts: int [B] real (non-pad) tokens per row; the cache advances by these.
            logits_positions: int64 [B, N] positions within the S new tokens to score.
        Returns:
            float32 logits [B, N, vocab].
        """
        batch, seq = tokens.shape
        seqlens = (cache.lengths + (seq - 1)).astype(np.int32)
        if int(seqlens.max()) >= cache.max_len + 1:
            raise ValueError(f"sequence of {int(seqlens.max()) + 1} tokens exceeds the cache "
                             f"({cache.max_len}); raise max_context")
        total = np.array(int(seqlens.max()) + 1, dtype=np.int32)
        hidden = None
        for stage, session, io in zip(self.manifest.stages, self.sessions, self.bindings):
            if stage.embeds:
                io.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, dtype=np.int64))
            else:
                io.bind_ortvalue_input("hidden_in", hidden)
            io.bind_cpu_input("seqlens_k", seqlens)
            io.bind_cpu_input("total_sequence_length", total)
            if stage.has_head:
                io.bind_cpu_input("logits_positions", np.ascontiguousarray(logits_positions[..., None], dtype=np.int64))
                io.bind_output("logits", "cpu")
            else:
                io.bind_output("hidden_out", self.device.ort_device)
            # bound after the main output, so get_outputs()[0] is logits / hidden_out
            for local, layer in enumerate(range(stage.first_layer, stage.end_layer)):
                for kind, buffers in (("key", cache.keys), ("value", cache.values)):
                    io.bind_ortvalue_input(f"past_{kind}_{local}", buffers[layer])
                    io.bind_ortvalue_output(f"present_{kind}_{local}", buffers[layer])
            session.run_with_iobinding(io)
            out = io.get_outputs()[0]
            if stage.has_head:
                logits = out.numpy()
            else:
                hidden = out
            io.clear_binding_outputs()
        cache.advance(counts)
        return logits
