"""onnxruntime backend: runs a package's stage graphs with I/O binding over a shared KV cache."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..devices.profiles import check_package_device, get_profile
from ..devices.providers import open_session, resolve_device, session_options
from .backend import register_backend
from .device_kv_cache import DeviceKVCache, DeviceSpan, SpanCopier
from .kv_cache import KVCache
from .manifest import Manifest, ModelSpec, PackageError, Stage, package_file
from .memory import release_mapped_pages

log = logging.getLogger(__name__)


def stage_graph(package_dir: Path, k: int, stage: Stage, spec: ModelSpec, check_io=None) -> Path:
    """Stage `k`'s graph file, checked before onnxruntime opens it: it and every external data file
    it names lie inside the package, and its inputs and outputs fit the manifest (`check_io(path,
    graph, stage, spec)`, default: those of edge-run's own graphs).

    Raises:
        PackageError: the graph is missing or unreadable, leads outside the package, or does not
            fit the manifest (layers, KV heads, head size, hidden size, vocabulary).
    """
    import onnx
    from google.protobuf.message import DecodeError

    name = stage.file
    path = package_file(package_dir, name, f"stages[{k}].file")
    if not path.is_file():
        raise PackageError(f"package {package_dir} lacks {name}; re-export it")
    try:
        model = onnx.load(str(path), load_external_data=False)  # the graph alone: weights are external
    except (DecodeError, ValueError, OSError) as e:
        raise PackageError(f"{path} is not a valid ONNX graph ({e}); re-export the package") from None
    graphs = [model.graph]
    for graph in graphs:  # subgraphs (If/Loop bodies) are appended as they are found
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors]
                graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
        for tensor in tensors:
            for entry in tensor.external_data:
                if entry.key == "location":  # relative to the graph's folder
                    package_file(package_dir, str(Path(name).parent / entry.value),
                                 f"{name}'s external data of {tensor.name!r}")
    (check_io or _check_io)(path, model.graph, stage, spec)
    return path


def _check_io(path: Path, graph, stage: Stage, spec: ModelSpec) -> None:
    """The graph's inputs and outputs against the manifest (a mismatch would fail at the first step)."""
    fixed = {"past_key": {1: ("num_kv_heads", spec.num_kv_heads), 3: ("head_dim", spec.head_dim)},
             "logits": {2: ("vocab_size", spec.vocab_size)}, "hidden": {2: ("hidden_size", spec.hidden_size)}}
    fixed["past_value"] = fixed["present_key"] = fixed["present_value"] = fixed["past_key"]
    names = {v.name for v in graph.input} | {v.name for v in graph.output}
    layers = sum(v.name.startswith("past_key_") for v in graph.input)
    embeds, head = "input_ids" in names, "logits" in names
    if layers != stage.end_layer - stage.first_layer or embeds != stage.embeds or head != stage.has_head:
        raise PackageError(f"{path} does not fit its manifest: it runs {layers} layers, embeds: {embeds}, head: "
                           f"{head}; the manifest says layers [{stage.first_layer}, {stage.end_layer}), embeds: "
                           f"{stage.embeds}, head: {stage.has_head}; re-export the package")
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, (field, expected) in fixed.get(re.sub(r"_(\d+|in|out)$", "", value.name), {}).items():
            if axis < len(dims) and dims[axis].dim_value and dims[axis].dim_value != expected:
                raise PackageError(f"{path} does not fit its manifest: {value.name} has {dims[axis].dim_value} at "
                                   f"axis {axis}, the manifest's model.{field} is {expected}; re-export the package")


class OnnxBackend:
    """Runs stage graphs in order; hidden states pass between stages without leaving the device.

    Where the KV cache lives follows the device profile (devices/profiles.json): on a profile with
    `kv_cache: "device"` whose provider has a GroupQueryAttention kernel for the package's KV type
    (cuda with a `--device cuda` package: fp16), it is a DeviceKVCache in the provider's memory
    (`kv_device`); otherwise a host KVCache. `step_kv_copies` counts the KV tensors onnxruntime
    moves between host and device for the last `forward` call (0 when the cache lives where
    attention runs), `kv_copies` all of them since load.
    """

    name = "onnx"
    library = "onnxruntime"
    staged = True  # a StagedBackend (see backend.py): forward takes stage ranges

    def __init__(self, package_dir: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None,
                 kv_cache: str = "f32", batch_invariant: bool = False):
        """`batch_invariant`: nothing to choose here; onnxruntime's CPU kernels switch only between
        one row and several, which backend.InvariantSteps covers (with `invariant=True` steps
        where the package's graphs pick their attention rows: `pads_attention`)."""
        packaged = "f16" if manifest.model.kv_dtype == "float16" else "f32"
        if kv_cache not in ("f32", packaged):  # the default (f32) means: the package's own
            fix = f"export with --kv-cache {kv_cache}" if kv_cache == "f16" else "ONNX packages have f32 or f16"
            raise ValueError(f"this ONNX package's KV cache is {packaged} (its graphs' attention type), not "
                             f"{kv_cache}; {fix}, or use --backend llamacpp")
        self.manifest, self.device = manifest, resolve_device(device)
        # graphs that pick their attention rows (export/onnx_graph.py: pad_attention) take the
        # invariant form on request (`forward(..., invariant=True)`), verified on the CPU kernels;
        # a padded step writes one key/value slot past its tokens
        self._padded = bool(manifest.extra.get("attention_rows"))
        self.pads_attention = self._padded and self.device.ort_device == "cpu"
        fallback = check_package_device(manifest.device, self.device.name)
        if fallback:
            log.warning("%s", fallback)
        # a mobile profile runs the package's ORT-format graphs, as the mobile runtime would
        ort_format = get_profile(self.device.name).variant.ort_format and bool(manifest.ort_models)
        if batch_invariant and self.device.ort_device != "cpu":
            log.warning("batch-invariant steps are verified on onnxruntime's CPU kernels only; on %s the "
                        "library may still pick kernels by shape", self.device.ort_device)
        self.sessions = []
        for k, stage in enumerate(manifest.stages):
            opts = session_options(threads, spinning=len(manifest.stages) == 1)  # one per session: providers go in it
            path = stage_graph(package_dir, k, stage, manifest.model)
            if ort_format:
                path = package_file(package_dir, manifest.ort_models[k], f"ort_models[{k}]")
            try:
                self.sessions.append(open_session(str(path), opts, self.device))
            except (RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail,
                    ort.capi.onnxruntime_pybind11_state.InvalidGraph) as e:
                raise PackageError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from None
        self.bindings = [s.io_binding() for s in self.sessions]
        files = [Path(package_dir) / stage.file for stage in manifest.stages]
        data = [f.with_name(f.name + ".data") for f in files]
        self.weight_bytes = sum(f.stat().st_size for f in files + data if f.is_file())
        release_mapped_pages([f for f in data if f.is_file()])  # keeps only the pre-packed copies resident
        self._bound: list[tuple | None] = [None] * len(self.sessions)  # (cache, its version) bound to each binding
        # the head stage writes logits into a host buffer bound once per shape: no per-run output
        # allocation, and no wrapping of every bound output (the KV cache's too) to read it back
        self._logits: list[np.ndarray | None] = [None] * len(self.sessions)
        # small host inputs (token ids, lengths, positions) likewise: bound once per shape, then
        # rewritten in place, so a decode step binds nothing
        self._inputs: list[dict[str, tuple[np.ndarray, ort.OrtValue]]] = [{} for _ in self.sessions]
        self._place_kv(get_profile(self.device.name))
        self.kv_copies = self.step_kv_copies = 0

    def _place_kv(self, profile) -> None:
        """Choose where the KV cache lives (`kv_device`, None: host) and where attention runs."""
        kv_type = self.manifest.model.kv_dtype
        attention_here = profile.runs_op("GroupQueryAttention", kv_type)
        # where GroupQueryAttention runs: a provider without its kernel hands it to the CPU provider
        self._attention_device = self.device.ort_device if attention_here else "cpu"
        self.kv_device = self.device.ort_device if profile.kv_cache == "device" and attention_here else None
        if profile.kv_cache == "device" and not attention_here:
            log.info("KV cache on the host: %s has no GroupQueryAttention kernel for this package's %s cache; "
                     "export with --device %s for the device-resident variant", profile.provider, kv_type,
                     profile.name)
        self._copier = None  # made with the first device cache

    def _main_output(self, stage) -> tuple[str, str]:
        """Name and device of a stage's main output: logits come to the host, hidden stays put."""
        return ("logits", "cpu") if stage.has_head else ("hidden_out", self.device.ort_device)

    def _bind_cache(self, k: int, cache: KVCache | DeviceKVCache) -> None:
        """Bind past and present of every layer to the same buffer: the graph updates it in place."""
        stage, io = self.manifest.stages[k], self.bindings[k]
        io.clear_binding_outputs()
        self._logits[k] = None
        io.bind_output(*self._main_output(stage))
        for local, layer in enumerate(range(stage.first_layer, stage.end_layer)):
            for kind, buffers in (("key", cache.keys), ("value", cache.values)):
                buffer = buffers[layer]
                if isinstance(buffer, DeviceSpan):
                    buffer.bind_input(io, f"past_{kind}_{local}")
                    buffer.bind_output(io, f"present_{kind}_{local}")
                else:
                    io.bind_ortvalue_input(f"past_{kind}_{local}", buffer)
                    io.bind_ortvalue_output(f"present_{kind}_{local}", buffer)
        if (getattr(cache, "kv_device", None) or "cpu") != self._attention_device:
            # onnxruntime copies each bound past buffer to attention's device, and present back
            self.step_kv_copies += 4 * (stage.end_layer - stage.first_layer)

    def _forward_rows(self, inputs, cache: KVCache, counts, logits_positions, stages: range, start, invariant):
        inputs = inputs if isinstance(inputs, np.ndarray) else inputs.numpy()  # hidden states (CPU)
        to_head = self.manifest.stages[stages[-1]].has_head
        out = (np.zeros((inputs.shape[0], logits_positions.shape[1], self.manifest.model.vocab_size), np.float32)
               if to_head else None)
        for b in map(int, np.flatnonzero(counts)):
            width = int(counts[b])  # this row's tokens only: no padding
            positions = np.minimum(logits_positions[b:b + 1], width - 1) if to_head else None
            row = self._forward(inputs[b:b + 1, :width], cache.row(b), counts[b:b + 1], positions, stages,
                                start[b:b + 1], invariant)
            if to_head:
                out[b] = row[0]
                continue
            hidden = row.numpy()
            if out is None:
                out = np.zeros((inputs.shape[0], inputs.shape[1], hidden.shape[-1]), np.float32)
            out[b, :width] = hidden[0]
        return out if to_head else ort.OrtValue.ortvalue_from_numpy(out)

    def new_cache(self, batch: int, max_len: int) -> KVCache | DeviceKVCache:
        """A KV cache for `batch` rows of `max_len` positions, where `kv_device` says (None: the host)."""
        spec = self.manifest.model
        if self.kv_device is None:
            return KVCache(spec, spec.num_layers, batch, max_len, extra_slots=int(self._padded))  # see KVCache
        if self._copier is None:
            self._copier = SpanCopier(lambda model: open_session(model, session_options(1), self.device),
                                      np.dtype(spec.kv_dtype))
        device_id = int(self.device.options.get("device_id", 0))
        return DeviceKVCache(spec, spec.num_layers, batch, max_len, self.kv_device, device_id, self._copier,
                             extra_slots=int(self._padded))

    def forward(self, inputs, cache: KVCache, counts: np.ndarray, logits_positions: np.ndarray | None = None,
                stages: range | None = None, start: np.ndarray | None = None, invariant: bool = False):
        """Run new tokens through the package's stages (all, or a contiguous run of them).

        Running a prefix of the stages returns the residual stream, which a later call can pass
        on to the remaining stages (early exit, self-speculative drafting).

        Args:
            inputs: int64 [B, S] new token ids, right-padded where a row has fewer, when the
                run starts at the embedding stage; else hidden states [B, S, H] (the OrtValue
                a previous call returned, or a float32 array).
            cache: the KV cache; row b's new positions start at `start[b]`.
            counts: int [B] real (non-pad) tokens per row.
            logits_positions: int64 [B, N] positions within the S new tokens to score.
            stages: indices of the stages to run (default: all).
            start: first position of the new tokens per row (default: cache.lengths). When
                given, the caller owns the offsets: the cache does not advance.
            invariant: run the step's attention on its several-token kernels, also for a
                one-token step, so logits do not depend on the step's shape (`pads_attention`
                packages only; backend.InvariantSteps asks for it).
        Returns:
            float32 logits [B, N, vocab] when the run ends at the head, else the hidden OrtValue.
            A run that ends at the head with `start` unset advances cache.lengths by `counts`.
        """
        self.step_kv_copies = 0
        if invariant and not self._padded:
            raise ValueError("invariant steps need a package whose graphs pick their attention rows "
                             "(re-export it with this edge-run); wrap the backend in backend.InvariantSteps")
        out = self._forward(inputs, cache, counts, logits_positions, stages, start, invariant)
        self.kv_copies += self.step_kv_copies
        return out

    def _forward(self, inputs, cache, counts: np.ndarray, logits_positions: np.ndarray | None = None,
                 stages: range | None = None, start: np.ndarray | None = None, invariant: bool = False):
        stages = range(len(self.sessions)) if stages is None else stages
        advance = start is None and self.manifest.stages[stages[-1]].has_head
        start = cache.lengths if start is None else np.asarray(start, dtype=np.int32)
        batch, seq = inputs.shape[:2] if isinstance(inputs, np.ndarray) else inputs.shape()[:2]
        cache.reserve(int(start.max()) + seq)  # grows the buffers (or says the context is full)
        if batch > 1 and seq + invariant > 1 and start.any():
            # onnxruntime's CPU GroupQueryAttention rejects several new tokens on top of a cache
            # at batch > 1, so such steps (batched speculative verification, invariant steps: their
            # attention gets two or more) run row by row; that
            # kernel runs these float32 graphs on every provider (see KVCache)
            logits = self._forward_rows(inputs, cache, counts, logits_positions, stages, start.copy(), invariant)
            if advance:
                cache.advance(counts)
            return logits
        pad = int(invariant)  # attention also gets each row's last token again, one position further
        seqlens = (start + (seq - 1 + pad)).astype(np.int32)
        total = np.array(int(seqlens.max()) + 1, dtype=np.int32)
        if self._padded:  # the rows attention gets: the step's, then the copy's
            rows = np.minimum(np.arange(seq + pad, dtype=np.int64), seq - 1)
        out = inputs
        for k in stages:
            stage, io = self.manifest.stages[k], self.bindings[k]
            name = "input_ids" if stage.embeds else "hidden_in"
            if isinstance(out, np.ndarray):
                self._bind_host(k, name, out, np.int64 if stage.embeds else np.float32)
            else:
                io.bind_ortvalue_input(name, out)
                self._inputs[k].pop(name, None)
            self._bind_host(k, "seqlens_k", seqlens, np.int32)
            self._bind_host(k, "total_sequence_length", total, np.int32)
            if self._padded and stage.end_layer > stage.first_layer:  # stages with attention
                self._bind_host(k, "attention_rows", rows, np.int64)
            if stage.has_head:
                self._bind_host(k, "logits_positions", logits_positions[..., None], np.int64)
            bound = self._bound[k]
            # onnxruntime copies a host input to the provider's memory when it is bound, so there a
            # host KV cache is bound again every step (the provider reads it from a fresh copy); a
            # cache in the provider's memory is bound once
            rebind = not self.device.host_inputs and getattr(cache, "kv_device", None) is None
            if bound is None or bound[0] is not cache or bound[1] != cache.version or rebind:
                self._bind_cache(k, cache)
                self._bound[k] = (cache, cache.version)
            if stage.has_head:
                logits = self._logits_buffer(k, (batch, logits_positions.shape[1], self.manifest.model.vocab_size))
                self.sessions[k].run_with_iobinding(io)
                continue
            # ORT allocates the hidden output per run (its shape varies); re-binding replaces it in place
            io.bind_output(*self._main_output(stage))
            self.sessions[k].run_with_iobinding(io)
            out = io.get_outputs()[0]
        if not self.manifest.stages[stages[-1]].has_head:
            return out
        if advance:
            cache.advance(counts)
        return logits.copy()  # the buffer is rewritten by the next step

    def _bind_host(self, k: int, name: str, values, dtype) -> None:
        """Give stage k's input `name` these values through a host buffer bound once per shape."""
        held = self._inputs[k].get(name)
        if held is not None and held[0].shape == np.shape(values):
            held[0][...] = values
            if not self.device.host_inputs:  # binding copied the old values to the provider's memory
                self.bindings[k].bind_ortvalue_input(name, held[1])
            return
        buffer = np.array(values, dtype=dtype, order="C")
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        self.bindings[k].bind_ortvalue_input(name, value)
        self._inputs[k][name] = (buffer, value)

    def _logits_buffer(self, k: int, shape: tuple[int, ...]) -> np.ndarray:
        """Stage k's logits buffer of `shape`, bound as its output (rebound only when the shape changes)."""
        buffer = self._logits[k]
        if buffer is None or buffer.shape != shape:
            buffer = self._logits[k] = np.empty(shape, np.float32)
            self.bindings[k].bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(buffer))
        return buffer


register_backend("onnx", OnnxBackend)
