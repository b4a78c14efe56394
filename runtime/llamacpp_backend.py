"""llama.cpp backend: runs a package's GGUF through llama-cpp-python's low-level C API.

One llama context per cache: sequence id = batch row, each sequence with its own `max_len`
cells (non-unified KV). A forward call is one batched `llama_decode` (split only when it holds
more than `n_batch` tokens) with logits requested at exactly the asked positions, copied into
numpy once. The batch arrays live in numpy buffers owned here, so filling them is vectorised.
"""
from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import llama_cpp as llc
import numpy as np

from ..devices.providers import llamacpp_offload, physical_cores
from .backend import register_backend
from .manifest import Manifest, PackageError

log = logging.getLogger(__name__)
_LLAMA_LOG = logging.getLogger("edgerun.llamacpp")  # llama.cpp's own messages (debug level)
_ERROR, _CONT = 4, 5  # ggml_log_level values (NONE, DEBUG, INFO, WARN, ERROR, CONT)
_captured: list[str] | None = None  # collects llama.cpp errors while a model loads
_last_level = 0

# The KV cache is F32 unless the caller asks for F16 (llama.cpp's default). With F16 the CPU
# kernels round a chunk of several new tokens differently from one token, enough for greedy
# speculative output to leave plain greedy's, so only F32 keeps speculative decoding token-exact;
# it costs some decode speed and twice the KV memory (README, "Design notes: runtime").
# q8_0 (int8 with an fp16 scale per 32 values) needs flash attention, llama.cpp's only attention
# path that reads a quantized V cache; see _FLASH_ATTN for what that costs in invariance.
_KV_TYPES = {"f32": (llc.GGML_TYPE_F32, 4), "f16": (llc.GGML_TYPE_F16, 2), "q8_0": (llc.GGML_TYPE_Q8_0, 34 / 32)}
# Flash attention stays off: llama.cpp's CPU kernel picks one of three paths by shape (query rows
# >= 64: tiled F32; one row over >= 512 cells: split-KV; else F16 accumulation), so a sequence's
# logits would depend on what else shares its batch (enough to change greedy output) and on draft
# length; with it off, batch-4 equals batch-1 token for token.
_FLASH_ATTN = llc.LLAMA_FLASH_ATTN_TYPE_DISABLED
# Batch-invariant steps (see backend.InvariantSteps) also need the CPU kernels that switch by the
# number of rows off: weight repacking (Q4_0, Q4_K, ... multiplied 4 rows at a time, the rest one
# by one) per model, and the tiled K-quant/IQ kernel (from 8 rows on), which llama.cpp reads from
# GGML_CPU_TILED_MM once per process.
_TILED_ENV = "GGML_CPU_TILED_MM"
_contexts_made = False  # once a context exists, llama.cpp may have read _TILED_ENV


def _tiled_types(weights: dict[str, str]) -> list[str]:
    """The K-quant and IQ types among a manifest's weights (llama.cpp's tiled kernel takes those)."""
    types = {t for value in weights.values() for t in value.split("+")}
    return sorted(t for t in types if t.endswith("_K") or (t.startswith("IQ") and t != "IQ4_NL"))


def _untile_for_invariance(path: Path, tiled: list[str]) -> None:
    if not tiled or os.environ.get(_TILED_ENV) == "0":
        return
    if _contexts_made:
        raise ValueError(f"batch-invariant decoding of {path} ({'/'.join(tiled)} weights) needs llama.cpp's "
                         f"tiled matmul off, which it reads once per process and this process already ran "
                         f"llama.cpp; set {_TILED_ENV}=0 in the environment before starting it")
    os.environ[_TILED_ENV] = "0"
    log.info("%s=0 for this process: llama.cpp's tiled %s kernel depends on the number of rows",
             _TILED_ENV, "/".join(tiled))


@llc.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Route llama.cpp's logging to Python logging instead of stderr (the CLI owns the terminal)."""
    global _last_level
    level = _last_level if level == _CONT else level
    _last_level = level
    message = text.decode("utf-8", errors="replace")
    if level == _ERROR and _captured is not None:
        _captured.append(message.strip())  # becomes part of the exception we raise
    elif level == _ERROR:
        _LLAMA_LOG.warning("%s", message.rstrip())
    else:
        _LLAMA_LOG.debug("%s", message.rstrip())


llc.llama_log_set(_log_callback, ctypes.c_void_p(0))
llc.llama_backend_init()

# llama_get_logits declared to return the plain address (llama-cpp-python's binding returns a ctypes
# pointer, whose address takes a cast per call): the same C function, our own prototype
_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(
    ctypes.cast(llc.llama_get_logits, ctypes.c_void_p).value)


@contextmanager
def _capture_errors() -> Iterator[list[str]]:
    global _captured
    _captured = errors = []
    try:
        yield errors
    finally:
        _captured = None


def _gguf_path(package_dir: Path, manifest: Manifest) -> Path:
    path = manifest.gguf_path(package_dir)
    if not path.is_file():
        raise PackageError(f"package {package_dir} names GGUF file {path}, which does not exist; "
                           f"re-export the package (or put the file back)")
    return path


def _load_model(path: Path, gpu: bool, repack: bool = True) -> int:
    """Load a GGUF with llama.cpp; a PackageError with llama.cpp's reason when it cannot."""
    params = llc.llama_model_default_params()
    params.n_gpu_layers = -1 if gpu else 0  # -1: every layer
    params.use_extra_bufts = repack
    with _capture_errors() as errors:
        model = llc.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        reason = next((e for e in errors if e), "no reason given")  # the first is the cause
        raise PackageError(f"llama.cpp cannot load {path}: {reason}. Check that the file is complete "
                           f"(download or export it again) and that its architecture is one this "
                           f"llama-cpp-python {llc.__version__} supports (else upgrade it, or use --backend onnx)")
    return model


def _check_room(cache: LlamaCppCache, longest: int) -> None:
    """Raise when a sequence of `longest` tokens would not fit the cache."""
    if longest > cache.max_len:
        raise ValueError(f"sequence of {longest} tokens exceeds the cache ({cache.max_len}); raise max_context")


class _Batch:
    """A llama_batch whose arrays are numpy buffers of `capacity` tokens (one sequence id each)."""

    def __init__(self, capacity: int):
        self.token = np.zeros(capacity, np.int32)
        self.pos = np.zeros(capacity, np.int32)
        self.n_seq_id = np.ones(capacity, np.int32)
        self.seq = np.zeros(capacity, np.int32)
        self.logits = np.zeros(capacity, np.int8)
        # seq_id[i] points at seq[i]
        self.seq_ptrs = (self.seq.ctypes.data + 4 * np.arange(capacity)).astype(np.uintp)
        def ptr(a, t):
            return a.ctypes.data_as(ctypes.POINTER(t))

        self.struct = llc.llama_batch(
            n_tokens=0, token=ptr(self.token, ctypes.c_int32), embd=None, pos=ptr(self.pos, ctypes.c_int32),
            n_seq_id=ptr(self.n_seq_id, ctypes.c_int32),
            seq_id=ptr(self.seq_ptrs, ctypes.POINTER(ctypes.c_int32)), logits=ptr(self.logits, ctypes.c_int8))


class LlamaCppCache:
    """The KV memory of one llama context: `batch` sequences of up to `max_len` positions each.

    Rollback removes the sequence's cells from a position on (llama_memory_seq_rm); no copies.
    """

    def __init__(self, backend: LlamaCppBackend, batch: int, max_len: int):
        self.batch, self.max_len = batch, max_len
        self.lengths = np.zeros(batch, dtype=np.int32)
        self.backend = backend  # keeps the model alive as long as this context
        params = llc.llama_context_default_params()
        params.n_ctx = batch * max_len
        params.n_seq_max = batch
        params.kv_unified = False  # each sequence owns max_len cells
        params.n_batch = min(params.n_ctx, 2048)
        params.n_ubatch = min(params.n_batch, params.n_ubatch)
        params.n_threads = params.n_threads_batch = backend.threads
        params.type_k = params.type_v = backend.kv_type
        params.flash_attn_type = (llc.LLAMA_FLASH_ATTN_TYPE_ENABLED if backend.kv_type == llc.GGML_TYPE_Q8_0
                                  else _FLASH_ATTN)
        params.no_perf = True
        global _contexts_made
        _contexts_made = True
        with _capture_errors() as errors:
            ctx = llc.llama_init_from_model(backend.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for batch {batch} x {max_len} "
                               f"positions: {'; '.join(errors) or 'no reason given'}; lower max_context")
        self.ctx = ctx
        self._finalizer = weakref.finalize(self, llc.llama_free, ctx)
        self.memory = llc.llama_get_memory(ctx)
        self.n_batch = llc.llama_n_batch(ctx)
        self._batch = _Batch(self.n_batch)
        self._logits_view: tuple = (None, 0, None)  # (address, rows, view) of the last logits read
        self._kv_bytes = llc.llama_n_ctx(ctx) * backend.kv_bytes_per_token

    @property
    def nbytes(self) -> int:
        return self._kv_bytes

    def reset(self) -> None:
        llc.llama_memory_clear(self.memory, False)
        self.lengths[:] = 0

    def rollback(self, lengths: np.ndarray) -> None:
        """Forget every position at or past `lengths[b]` (e.g. rejected draft tokens)."""
        # plain Python over <= 8 rows: this runs every decode step, mostly as a no-op
        for row, (new, old) in enumerate(zip(np.asarray(lengths).tolist(), self.lengths.tolist())):
            if new > old:
                raise ValueError(f"rollback can only shorten a sequence (row {row}: {old} -> {new})")
            if new < old:
                if not llc.llama_memory_seq_rm(self.memory, row, new, -1):
                    raise RuntimeError(f"llama.cpp could not remove positions >= {new} of sequence {row}")
                self.lengths[row] = new

    def close(self) -> None:
        """Free the llama context now (it is also freed when the cache is garbage collected)."""
        self._finalizer()


class LlamaCppBackend:
    """Decodes a package's GGUF with llama.cpp behind the same interface as the ONNX backend."""

    name = "llamacpp"
    library = "llama.cpp"
    staged = False  # the GGUF runs whole: no early exit, no self-speculation
    invariant_at_load = True  # repacking and the tiled kernel are chosen with the model (see backend.py)

    def __init__(self, package_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 kv_cache: str = "f32", batch_invariant: bool = False):
        """`batch_invariant`: choose kernels that do not switch by the number of rows (no weight
        repacking, no tiled K-quant kernel); backend.InvariantSteps does the rest."""
        if batch_invariant and kv_cache == "q8_0":
            raise ValueError("a q8_0 KV cache needs llama.cpp's flash attention, whose CPU kernel changes with the "
                             "step's shape, so it cannot give batch-invariant steps (--batch-invariant, or exact "
                             "speculative decoding of quantized weights); use --kv-cache f16 or f32, or "
                             "--inexact-speculation")
        self.manifest = manifest
        self.path = _gguf_path(package_dir, manifest)
        self.weight_bytes = self.path.stat().st_size
        self.threads = threads or physical_cores()
        gpu = llamacpp_offload(device, bool(llc.llama_supports_gpu_offload()),
                               llc.llama_print_system_info().decode(errors="replace"))
        if batch_invariant:
            _untile_for_invariance(self.path, _tiled_types(manifest.weights))
            if gpu:
                log.warning("batch-invariant steps are verified on llama.cpp's CPU kernels only; with GPU "
                            "offload the GPU library may still pick kernels by shape")
        self.model = _load_model(self.path, gpu, repack=not batch_invariant)
        self._finalizer = weakref.finalize(self, llc.llama_model_free, self.model)
        self.vocab_size = llc.llama_vocab_n_tokens(llc.llama_model_get_vocab(self.model))
        if self.vocab_size != manifest.model.vocab_size:
            raise PackageError(f"{self.path} has {self.vocab_size} tokens but the manifest says "
                               f"{manifest.model.vocab_size}; re-export the package")
        self.kv_type, itemsize = _KV_TYPES[kv_cache]
        self.kv_bytes_per_token = manifest.model.kv_bytes_per_token(itemsize)
        log.info("llama.cpp loaded %s (%d threads, %s KV cache, gpu offload: %s)",
                 self.path, self.threads, kv_cache.upper(), gpu)

    def new_cache(self, batch: int, max_len: int) -> LlamaCppCache:
        return LlamaCppCache(self, batch, max_len)

    def forward(self, inputs: np.ndarray, cache: LlamaCppCache, counts: np.ndarray,
                logits_positions: np.ndarray) -> np.ndarray:
        """Append each row's real tokens to its sequence; logits at the asked positions.

        Args:
            inputs: int64 [B, S] new token ids, right-padded where a row has fewer.
            cache: the cache of this backend; row b's new positions start at cache.lengths[b].
            counts: int [B] real tokens per row (0: the row takes no token this call).
            logits_positions: int64 [B, N] positions within the S new tokens to score.
        Returns:
            float32 logits [B, N, vocab]; zeros where a position is not a real token of its row.
        """
        if inputs.shape[1] == 1 and logits_positions.shape[1] == 1 and not logits_positions.any():
            return self._step(inputs, cache, counts)
        counts = np.asarray(counts, dtype=np.int64)
        ends = cache.lengths + counts
        _check_room(cache, int(ends.max()))
        starts = np.cumsum(counts) - counts  # first flat index of each row
        total = int(counts.sum())
        rows = np.repeat(np.arange(len(counts)), counts)
        offsets = np.arange(total) - starts[rows]
        positions = np.asarray(logits_positions, dtype=np.int64)
        valid = positions < counts[:, None]
        flat = np.where(valid, starts[:, None] + positions, 0)
        wanted = np.zeros(total, dtype=np.int8)
        wanted[flat[valid]] = 1
        out_index = np.cumsum(wanted) - 1  # row of each wanted token in llama.cpp's output
        out = np.empty((*positions.shape, self.vocab_size), dtype=np.float32)
        out2d = out.reshape(-1, self.vocab_size)
        chunks = range(0, total, cache.n_batch)
        for begin in chunks:
            end = min(begin + cache.n_batch, total)
            n_out = self._decode(cache, inputs[rows[begin:end], offsets[begin:end]],
                                 cache.lengths[rows[begin:end]] + offsets[begin:end],
                                 rows[begin:end], wanted[begin:end])
            if n_out == 0:
                continue
            view = self._logits(cache, n_out)
            first = out_index[begin] - wanted[begin] + 1  # output rows before this chunk
            if len(chunks) == 1:
                np.take(view, out_index[flat.ravel()], axis=0, out=out2d)  # the one copy
            else:
                mine = valid.ravel() & (flat.ravel() >= begin) & (flat.ravel() < end)
                out2d[mine] = view[out_index[flat.ravel()[mine]] - first]
        out2d[~valid.ravel()] = 0.0
        cache.lengths[:] = ends
        return out

    def _step(self, inputs: np.ndarray, cache: LlamaCppCache, counts: np.ndarray) -> np.ndarray:
        """The decode step (one token per active row, its logits): forward() for this one case.

        It runs once per generated token, right after llama_decode has streamed the weights
        through every CPU cache, when each distinct numpy code path costs far more than usual
        (ufuncs with scalars most): so plain Python over the <= 8 rows, and one numpy copy.
        """
        rows, batch = len(counts), cache._batch
        active = [row for row, count in enumerate(counts.tolist()) if count]
        if not active:
            return np.zeros((rows, 1, self.vocab_size), dtype=np.float32)
        lengths, tokens = cache.lengths.tolist(), inputs[:, 0].tolist()
        _check_room(cache, max(lengths[row] for row in active) + 1)
        for i, row in enumerate(active):
            batch.token[i], batch.pos[i], batch.seq[i], batch.logits[i] = tokens[row], lengths[row], row, 1
        self._run(cache, len(active))
        if len(active) == rows:
            out = self._logits(cache, rows).copy()[:, None]  # the one copy
        else:
            out = np.zeros((rows, 1, self.vocab_size), dtype=np.float32)
            out[active, 0] = self._logits(cache, len(active))
        for row in active:
            cache.lengths[row] = lengths[row] + 1
        return out

    def _logits(self, cache: LlamaCppCache, n_out: int) -> np.ndarray:
        """A view [n_out, vocab] of llama.cpp's logits buffer (valid until the next decode)."""
        address = _logits_address(cache.ctx)
        if cache._logits_view[:2] != (address, n_out):  # the buffer moves only when it grows
            view = np.frombuffer((ctypes.c_float * (n_out * self.vocab_size)).from_address(address),
                                 dtype=np.float32).reshape(n_out, self.vocab_size)
            cache._logits_view = (address, n_out, view)
        return cache._logits_view[2]

    def _run(self, cache: LlamaCppCache, n: int) -> None:
        cache._batch.struct.n_tokens = n
        status = llc.llama_decode(cache.ctx, cache._batch.struct)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} "
                               f"({'no KV slot: the context is full' if status == 1 else 'see llama.cpp log with -v'})")

    def _decode(self, cache: LlamaCppCache, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray,
                wanted: np.ndarray) -> int:
        """One llama_decode of up to n_batch tokens; returns how many logit rows it produced."""
        batch, n = cache._batch, len(tokens)
        batch.token[:n], batch.pos[:n], batch.seq[:n], batch.logits[:n] = tokens, pos, seq, wanted
        self._run(cache, n)
        return int(wanted.sum())

    def close(self) -> None:
        """Free the model now; caches made from it must be closed first."""
        self._finalizer()


register_backend("llamacpp", LlamaCppBackend)
