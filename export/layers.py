"""Run a checkpoint one decoder layer at a time (onnxruntime, in memory) for layer analysis.

Depth pruning and early-exit calibration need the residual stream between every pair of
layers and the logits of any layer subset; one small session per layer gives both without
exporting a package per configuration.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from ..devices.providers import session_options
from .checkpoint import Checkpoint
from .onnx_graph import build_stage

log = logging.getLogger(__name__)


class LayerRunner:
    """Per-layer sessions over full sequences (no cache reuse): hidden states and logits.

    Args:
        ckpt: the float checkpoint.
        max_tokens: longest sequence that will be run.
    """

    def __init__(self, ckpt: Checkpoint, max_tokens: int = 512, progress: bool = False):
        self.spec, self.weights, self.max_tokens = ckpt.spec, ckpt.weights, max_tokens
        opts = session_options()
        n = self.spec.num_layers

        def session(first: int, end: int, head: bool) -> ort.InferenceSession:
            model = build_stage(self.spec, self.weights, first, end, embeds=False, has_head=head)
            return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        self.layers = [session(i, i + 1, False) for i in tqdm(range(n), desc="layer graphs", disable=not progress)]
        self.head = session(n, n, True)
        self._kv = np.zeros((1, self.spec.num_kv_heads, max_tokens, self.spec.head_dim), np.float32)

    def embed(self, tokens: Sequence[int]) -> np.ndarray:
        table = self.weights["embed"]  # [1, T, H], scaled as the graphs scale it (spec.embed_scale)
        return (table[np.asarray(tokens)][None] * np.float32(self.spec.embed_scale)).astype(np.float32)

    def _feeds(self, hidden: np.ndarray) -> dict:
        t = hidden.shape[1]
        if t > self.max_tokens:
            raise ValueError(f"sequence of {t} tokens is longer than this runner's max_tokens={self.max_tokens}")
        return {"hidden_in": hidden, "seqlens_k": np.array([t - 1], np.int32),
                "total_sequence_length": np.array(t, np.int32)}

    def layer(self, i: int, hidden: np.ndarray) -> np.ndarray:
        """Layer i on the residual stream [1, T, H] (causal attention over the same T tokens)."""
        feeds = self._feeds(hidden) | {"past_key_0": self._kv, "past_value_0": self._kv}
        return self.layers[i].run(["hidden_out"], feeds)[0]

    def run(self, hidden: np.ndarray, layers: Iterable[int]) -> np.ndarray:
        for i in layers:
            hidden = self.layer(i, hidden)
        return hidden

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """Final norm + LM head on every position: [T, vocab]."""
        t = hidden.shape[1]
        feeds = self._feeds(hidden) | {"logits_positions": np.arange(t, dtype=np.int64)[None, :, None]}
        return self.head.run(["logits"], feeds)[0][0]

    def residuals(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """Residual stream entering every layer and leaving the last: L + 1 arrays [1, T, H]."""
        states = [self.embed(tokens)]
        for i in range(self.spec.num_layers):
            states.append(self.layer(i, states[-1]))
        return states


def with_bias(x: np.ndarray) -> np.ndarray:
    """x [n, k] with a column of ones appended: the design matrix of an affine fit."""
    return np.hstack([x, np.ones((len(x), 1))])


def fit_affine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares [k + 1, ...] coefficients (last row the bias) of with_bias(x) @ coef ~ y."""
    return np.linalg.lstsq(with_bias(x), y, rcond=None)[0]


def nll(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood of tokens[1:] under logits[:-1] (natural log), per position."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -logp[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]
