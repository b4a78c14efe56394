"""Continuous batching: one engine serving concurrent requests from a fixed KV cache of rows.

Requests join and leave between steps. A step runs one decode pass over every decoding row (one
new token each) and then one chunk of the oldest newcomer's prompt on that row alone, so a long
prompt delays the running streams by at most one chunk per token. A finished or cancelled row is
freed before the next step, and the oldest waiting request takes it.

Every request keeps its own sampling settings, stop strings, seed and token limit. Greedy output
does not depend on what else runs: each row's numbers are computed independently of the other
rows, prompts are cut into chunks at fixed offsets, and on onnxruntime the decode pass always
runs every row of the cache (idle rows are padding), so kernels never switch with the load. On
llama.cpp idle rows are skipped, so the number of rows varies: exact there with float weights or
a batch-invariant engine only (README, "Serving").
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .constraints import choose
from .drafters import Drafter, ModelDrafter
from .prompt_cache import PromptCache
from .requests import RequestHandle, RequestSettings, SchedulerClosed, StreamResponse, Timings, Usage
from .sampling import Sampler, SamplingParams
from .speculative import draft_round, make_drafter, parse_speculative, verify
from .textstream import StopMatcher, TextStream, step_text

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8
DEFAULT_PREFILL_CHUNK = 128  # prompt tokens per step for a newcomer (README, "Serving")
DEFAULT_DRAFT_TOKENS = 6  # most lookup drafts per row and step
# rows drafting only while at most this many decode: verification spends spare compute on latency,
# and a fuller batch has none to spare (onnxruntime also verifies rows one by one at batch > 1)
DEFAULT_SPECULATE_ROWS = 2


class QueueFull(RuntimeError):
    """More requests wait than the scheduler's `max_queue`; retry later."""


class _Sequence:
    """Decoding state of one admitted request: its row, context, sampler, text stream, finish rules."""

    def __init__(self, handle: RequestHandle, engine, order: int):
        settings = handle.settings
        self.handle, self.order, self.row = handle, order, -1
        self.prompt = handle.prompt
        self.tokens = list(handle.prompt)
        self.prefilled = 0  # prompt tokens whose KV is in the row
        self.cached = 0  # of which came from the prompt cache
        self.sampler = Sampler(settings.sampling, engine.manifest.model.vocab_size, handle._rng)
        self.sampler.observe(self.prompt)
        self.stream, self.matcher = TextStream(engine.tokenizer), StopMatcher(list(settings.stop))
        self.eos = frozenset() if settings.ignore_eos else engine.eos_token_ids
        self.generated = 0
        self.admitted = self.first_token = math.nan
        grammar = settings.grammar
        self.constraint = engine.grammars.matcher(grammar) if grammar is not None else None

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)

    def emit(self, logits: np.ndarray, max_len: int, token: int | None = None, from_draft: bool = False,
             last: bool = True) -> StreamResponse:
        """Pick the next token from `logits` [vocab] (or take `token`, already chosen by speculative
        verification; `last`: the last one it chose), record it and decide whether the request ends."""
        if token is None:
            token = choose(self.sampler, logits, self.constraint)
        logprob, top = None, ()
        if self.handle.settings.logprobs is not None:
            logprob, top = _logprobs(logits, token, self.handle.settings.logprobs)
        self.tokens.append(token)
        self.generated += 1
        # out of tokens, or no cache position left for the next one
        out_of_room = self.generated >= self.handle.settings.max_new_tokens or len(self.tokens) - 1 >= max_len
        done = last and self.constraint is not None and self.constraint.finished
        text, finish = step_text(self.stream, self.matcher, token, self.eos, out_of_room, done)
        now = time.perf_counter()
        if self.generated == 1:
            self.first_token = now
        usage = timings = None
        if finish is not None:
            start = self.handle.submitted
            usage = Usage(len(self.prompt), self.generated, self.cached)
            timings = Timings(self.admitted - start, self.first_token - start, now - start)
        return StreamResponse(token, text, finish, logprob, top, from_draft, now, usage, timings)


def _logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log-softmax of `logits` at `token`, and the k best (id, log-probability) pairs."""
    peak = float(logits.max())
    log_norm = peak + math.log(float(np.exp(logits - peak).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = np.argpartition(-logits, k - 1)[:k]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        top = tuple((int(i), float(logits[i]) - log_norm) for i in ids)
    return float(logits[token]) - log_norm, top


@dataclass
class SchedulerStats:
    """Running totals since the scheduler started (the server's /metrics reads them)."""

    steps: int = 0  # decode passes
    step_rows: int = 0  # decoding rows summed over decode passes (occupancy = step_rows / steps)
    prefill_chunks: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (prompt-cache hits excluded)
    cached_tokens: int = 0  # prompt tokens taken from the prompt cache
    generated_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    drafts_proposed: int = 0
    drafts_accepted: int = 0


class Scheduler:
    """Serves concurrent requests with one engine and one KV cache of `max_batch` rows.

    A worker thread runs the steps; `submit` may be called from any thread.

    Args:
        engine: a loaded Engine (the scheduler owns its backend while running: do not call
            engine.generate at the same time).
        max_batch: rows of the KV cache, i.e. requests decoding at once; more wait in a queue.
        prefill_chunk: prompt tokens run per step for a newcomer (bounds how long it stalls
            the running streams).
        max_queue: most requests waiting for a row; submit raises QueueFull beyond it.
        prompt_cache_bytes: host memory for the KV of finished sequences kept for reuse; running
            and idle rows are searched too (0: no prompt cache at all).
        speculative: None, "lookup[:MAX_NGRAM[,MIN_NGRAM]]" (prompt lookup) or "draft:MODEL" (a
            draft model with the target's vocabulary, loaded once with a cache row per scheduler
            row): rows draft and verify in the shared step.
        exact: with speculation on quantized weights, run every step in the batch-invariant form
            (as Engine.generate's `exact`), so speculation does not change greedy output; False:
            the fast kernels.
        draft_tokens: most drafts per row and step.
        speculate_rows: rows draft only while at most this many decode.
    Raises:
        ValueError: a bad setting, a speculative mode other than lookup or draft:, or exact speculation on
            a quantized llama.cpp engine not loaded with speculative=True.
    """

    def __init__(self, engine, max_batch: int = DEFAULT_MAX_BATCH, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 max_queue: int = 1024, prompt_cache_bytes: int = 256 << 20, speculative: str | None = None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, speculate_rows: int = DEFAULT_SPECULATE_ROWS,
                 exact: bool = True):
        for name, value, low in (("max_batch", max_batch, 1), ("prefill_chunk", prefill_chunk, 1),
                                 ("max_queue", max_queue, 0), ("prompt_cache_bytes", prompt_cache_bytes, 0),
                                 ("draft_tokens", draft_tokens, 1), ("speculate_rows", speculate_rows, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.engine, self.max_batch, self.prefill_chunk, self.max_queue = engine, max_batch, prefill_chunk, max_queue
        self.settings = dict(max_batch=max_batch, prefill_chunk=prefill_chunk, max_queue=max_queue,
                             prompt_cache_bytes=prompt_cache_bytes, speculative=speculative,
                             draft_tokens=draft_tokens, speculate_rows=speculate_rows, exact=exact)
        self.drafter = _drafter(speculative, engine, max_batch)
        self.backend = engine._step_backend(self.drafter is not None, exact)  # every step, prompts included
        self.draft_tokens, self.speculate_rows = draft_tokens, speculate_rows
        self.max_len = engine.max_context
        self.cache = self.backend.new_cache(max_batch, self.max_len)
        self.cache.reset()
        self.prompt_cache = PromptCache(self.cache, prompt_cache_bytes) if prompt_cache_bytes else None
        self.slots: list[_Sequence | None] = [None] * max_batch
        self.stats = SchedulerStats()
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._order = 0
        # decode-step inputs, reused every step
        self._tokens = np.zeros((max_batch, 1), dtype=np.int64)
        self._counts = np.zeros(max_batch, dtype=np.int64)
        self._positions = np.zeros((max_batch, 1), dtype=np.int64)
        self._thread = threading.Thread(target=self._run, name="edgerun-scheduler", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """The worker thread runs (False after close, or if it died)."""
        return self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Iterable[str] = (), add_special_tokens: bool = True, logprobs: int | None = None,
               ignore_eos: bool = False, response_format: dict | None = None) -> RequestHandle:
        """Queue one request; returns its handle at once (thread-safe).

        Args:
            prompt: a string or token ids.
            max_new_tokens .. seed, stop, add_special_tokens, ignore_eos, response_format: as in
                Engine.generate (one response_format for this request).
            logprobs: None, or k >= 0 (at most 20): each response carries the token's
                log-probability and the k most likely alternatives.
        Raises:
            ValueError: a bad setting, an empty prompt or one that fills the context.
            QueueFull: `max_queue` requests already wait.
            SchedulerClosed: after close().
        """
        stop = [stop] if isinstance(stop, str) else list(stop)
        settings = RequestSettings(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                                   tuple(stop), logprobs, ignore_eos, self.engine.grammars.compile(response_format))
        tokens = self.engine._tokens(prompt, add_special_tokens)
        if not tokens:
            raise ValueError("the prompt is empty; give at least one token")
        if len(tokens) >= self.max_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the context holds {self.max_len}; "
                             f"shorten it or raise max_context")
        vocab = self.engine.manifest.model.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:  # else the step that runs it fails every row with it
            raise ValueError(f"prompt token ids must be in 0..{vocab - 1}")
        handle = RequestHandle(self._wake, tokens, settings)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the scheduler is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue}); retry later")
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the worker; requests still waiting or running end with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- worker ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not any(self.slots):
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step ends its requests, not the scheduler
                log.exception("scheduler step failed")
                for seq in [s for s in self.slots if s is not None]:
                    self._release(seq, error=e)
        error = SchedulerClosed("the scheduler was closed")
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle._push(None, done=True, error=error)
        for seq in [s for s in self.slots if s is not None]:
            self._release(seq, error=error)

    def _drop_cancelled(self) -> None:
        for seq in self.slots:
            if seq is not None and seq.handle.cancelled:
                self._release(seq, reason="cancelled")
        with self._cond:
            dropped = [h for h in self._waiting if h.cancelled]
            if dropped:
                self._waiting = collections.deque(h for h in self._waiting if not h.cancelled)
        for handle in dropped:
            handle._push(None, done=True, reason="cancelled")

    def _admit(self) -> None:
        """Give free rows to the oldest waiting requests (reusing cached prompt prefixes)."""
        while None in self.slots:
            with self._cond:
                if not self._waiting:
                    return
                handle = self._waiting.popleft()
            seq = _Sequence(handle, self.engine, self._order)
            self._order += 1
            seq.admitted = time.perf_counter()
            free = [row for row, s in enumerate(self.slots) if s is None]
            try:
                if self.prompt_cache is not None:
                    seq.row, seq.cached = self.prompt_cache.place(seq.prompt, free, self._live_contexts())
                else:
                    seq.row = free[0]
                    self._empty(seq.row)
            except Exception as e:  # noqa: BLE001 - the request fails, the others go on
                log.exception("could not place a request in the KV cache")
                handle._push(None, done=True, error=e)
                continue
            seq.prefilled = seq.cached
            self.stats.cached_tokens += seq.cached
            self.slots[seq.row] = seq

    def _live_contexts(self) -> dict[int, list[int]]:
        """Tokens whose KV each running row holds (prompt-cache sources)."""
        lengths = self.cache.lengths
        return {s.row: s.tokens[:int(lengths[s.row])] for s in self.slots if s is not None}

    def _release(self, seq: _Sequence, reason: str | None = None, error: BaseException | None = None) -> None:
        """End a sequence without a last token (cancelled, failed, closed) and free its row."""
        finish = reason or "error"
        self.stats.finished[finish] = self.stats.finished.get(finish, 0) + 1
        try:
            self._free(seq, keep=error is None)
        finally:  # whatever happens to the row, the request ends
            seq.handle._push(None, done=True, error=error, reason=reason)

    def _deliver(self, seq: _Sequence, response: StreamResponse) -> None:
        self.stats.generated_tokens += 1
        if response.finish_reason is None:
            seq.handle._push(response)
            return
        self.stats.finished[response.finish_reason] = self.stats.finished.get(response.finish_reason, 0) + 1
        try:
            self._free(seq, keep=True)
        finally:
            seq.handle._push(response, done=True)

    def _free(self, seq: _Sequence, keep: bool) -> None:
        """Free a row at once; with `keep`, its KV stays there for the prompt cache."""
        self.slots[seq.row] = None
        if self.prompt_cache is not None and keep:
            self.prompt_cache.retire(seq.row, seq.tokens[:int(self.cache.lengths[seq.row])])
            return
        if self.prompt_cache is not None:
            self.prompt_cache.retire(seq.row, [])
        self._empty(seq.row)

    def _empty(self, row: int) -> None:
        self.cache.rollback(np.where(np.arange(self.max_batch) == row, 0, self.cache.lengths))

    def _step(self) -> None:
        decoding = [s for s in self.slots if s is not None and s.decoding]
        if decoding:
            self._decode(decoding)
        prefilling = [s for s in self.slots if s is not None and not s.decoding]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda s: s.order))

    def _decode(self, decoding: list[_Sequence]) -> None:
        """One new token for every decoding row in one pass; idle rows take none."""
        constrained = any(seq.constraint is not None for seq in decoding)
        if (constrained or (self.drafter is not None and len(decoding) <= self.speculate_rows)) \
                and self._speculate(decoding):
            return
        tokens, counts = self._tokens, self._counts
        counts[:] = 0
        for seq in decoding:
            tokens[seq.row, 0], counts[seq.row] = seq.tokens[-1], 1
        logits = self.backend.forward(tokens, self.cache, counts, self._positions)
        self.stats.steps += 1
        self.stats.step_rows += len(decoding)
        for seq in decoding:
            self._deliver(seq, seq.emit(logits[seq.row, 0], self.max_len))

    def _speculate(self, decoding: list[_Sequence]) -> bool:
        """Draft by prompt lookup for every decoding row (when it speculates at this occupancy) and
        verify all rows in one pass (each row's pending token, the tokens its grammar forces, its
        drafts); False, having run nothing, when no row has a draft."""
        # one entry per scheduler row (a draft model's cache rows follow them); idle rows draft nothing
        contexts: list[list[int]] = [[] for _ in range(self.max_batch)]
        constraints: list = [None] * self.max_batch
        room, lengths = [0] * self.max_batch, [0] * self.max_batch
        speculating = self.drafter is not None and len(decoding) <= self.speculate_rows
        for seq in decoding:
            contexts[seq.row], constraints[seq.row] = seq.tokens, seq.constraint
            room[seq.row] = min(seq.handle.settings.max_new_tokens - seq.generated - 1, self.max_len - len(seq.tokens))
            lengths[seq.row] = self.draft_tokens if speculating else 0
        all_forced, all_drafts = draft_round(self.drafter if speculating else None, contexts, constraints, room,
                                             lengths)
        forced = [all_forced[seq.row] for seq in decoding]
        drafts = [all_drafts[seq.row] for seq in decoding]
        width = 1 + max(len(d.tokens) for d in drafts)
        if width == 1:
            return False
        tokens = np.zeros((self.max_batch, width), dtype=np.int64)
        counts = np.zeros(self.max_batch, dtype=np.int64)
        for seq, draft in zip(decoding, drafts):
            counts[seq.row] = 1 + len(draft.tokens)
            tokens[seq.row, :counts[seq.row]] = [seq.tokens[-1], *draft.tokens]
        start = self.cache.lengths.copy()
        logits = self.backend.forward(tokens, self.cache, counts,
                                             np.tile(np.arange(width), (self.max_batch, 1)))
        self.stats.steps += 1
        self.stats.step_rows += len(decoding)
        outs = []
        for seq, draft, f in zip(decoding, drafts, forced):
            out = verify(seq.sampler, draft, logits[seq.row, :counts[seq.row]], seq.constraint)
            outs.append(out)
            self.stats.drafts_proposed += len(draft.tokens) - len(f)  # the drafter's, not the grammar's
            self.stats.drafts_accepted += max(0, len(out) - 1 - len(f))
            start[seq.row] += len(out)  # the pending token and the accepted drafts stay cached
        self.cache.rollback(np.minimum(start, self.cache.lengths))
        for seq, out in zip(decoding, outs):
            for j, token in enumerate(out):
                response = seq.emit(logits[seq.row, j], self.max_len, token, from_draft=j < len(out) - 1,
                                    last=j == len(out) - 1)
                self._deliver(seq, response)
                if response.finish_reason is not None:
                    break
        return True

    def _prefill_chunk(self, seq: _Sequence) -> None:
        """Run the next chunk of `seq`'s prompt on its row; after the last, emit its first token."""
        start = seq.prefilled
        # chunks end at multiples of prefill_chunk, whatever was cached, so the numbers of a prompt's
        # last positions do not depend on how much of it another request left in the cache
        end = min(len(seq.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
        logits = self._forward_row(seq.row, seq.prompt[start:end])
        seq.prefilled = end
        self.stats.prefill_chunks += 1
        self.stats.prompt_tokens += end - start
        if seq.decoding:
            self._deliver(seq, seq.emit(logits, self.max_len))

    def _forward_row(self, row: int, tokens: list[int]) -> np.ndarray:
        """Append `tokens` to one row's sequence; the logits [vocab] of the last one."""
        n, forward = len(tokens), self.backend.forward
        if hasattr(self.cache, "row"):
            # a batch-1 view of the row: onnxruntime would run a multi-token step on a cache row by
            # row anyway (its GroupQueryAttention), and the view spares it the padding rows
            return forward(np.array([tokens], dtype=np.int64), self.cache.row(row), np.array([n]),
                           np.array([[n - 1]]))[0, 0]
        batch = np.zeros((self.max_batch, n), dtype=np.int64)
        batch[row] = tokens
        counts = np.zeros(self.max_batch, dtype=np.int64)
        counts[row] = n
        return forward(batch, self.cache, counts, np.full((self.max_batch, 1), n - 1))[row, 0]


def _drafter(speculative: str | None, engine, rows: int) -> Drafter | None:
    """The scheduler's drafter for a mode string: prompt lookup, or a draft model with a KV cache of
    `rows` rows, one per scheduler row (self-speculation would run the target's own layers between
    its steps, so it is not offered).

    A draft model drafts greedily for every request: its drafts are then a point mass, which
    sampled verification accepts losslessly too (at a lower rate than drafts sampled like the
    request's own settings would pass)."""
    if speculative is None:
        return None
    spec = parse_speculative(speculative)
    if spec.kind not in ("lookup", "draft"):  # suffix and auto keep state per generation, which a server lacks
        raise ValueError(f"the scheduler speculates with prompt lookup or a draft model (lookup[:...], "
                         f"draft:MODEL), not {speculative!r}")
    drafter = make_drafter(spec, engine, max_context=engine.max_context, threads=engine.threads)
    if isinstance(drafter, ModelDrafter):
        drafter.start([[0]] * rows, SamplingParams())  # a row's first proposal feeds its whole context
    return drafter


_STARTING = threading.Lock()


def scheduler_for(engine, **settings) -> Scheduler:
    """The engine's running scheduler, started on first use (thread-safe).

    Args:
        engine: the Engine to serve.
        settings: Scheduler arguments (max_batch, prefill_chunk, ...) for a scheduler started now;
            none: the running one whatever its settings, else one with the defaults.
    Raises:
        ValueError: settings given while a scheduler with other settings runs (close it first).
    """
    with _STARTING:
        running = getattr(engine, "_scheduler", None)
        if running is not None and not running.closed:
            if settings and settings != running.settings:
                raise ValueError(f"the engine's scheduler already runs with {running.settings}; "
                                 f"close it (engine.scheduler().close()) before starting one with {settings}")
            return running
        engine._scheduler = Scheduler(engine, **settings)
        return engine._scheduler
