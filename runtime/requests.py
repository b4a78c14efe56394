"""A request to the scheduler as its submitter sees it: settings, the handle to iterate or cancel,
and what comes back (a response per token, token usage and timings at the end)."""
from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .constraints import Grammar
from .sampling import SamplingParams

MAX_TOP_LOGPROBS = 20


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request finished."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request. `cached_tokens`: prompt tokens whose KV came from the prompt
    cache instead of being computed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Seconds from submission: to taking a row (`queued`), to the first token (`first_token`, the
    time to first token) and to the last (`total`)."""

    queued: float
    first_token: float
    total: float

    def decode_rate(self, completion_tokens: int) -> float:
        """Tokens per second after the first (nan with fewer than two tokens)."""
        span = self.total - self.first_token
        return (completion_tokens - 1) / span if completion_tokens > 1 and span > 0 else math.nan


@dataclass(frozen=True)
class StreamResponse:
    """One generated token of a request.

    Attributes:
        token: token id.
        text: the new text it completes ("" while a character or a possible stop string is held back).
        finish_reason: None while generating; "stop" (end-of-sequence or a stop string) or "length"
            (the request's token limit or the context) on the last.
        logprob: the token's log-probability under the model (before temperature, top-p and the
            repetition penalty), when the request asked for logprobs.
        top_logprobs: the most likely (token id, log-probability) pairs at this position, best first.
        from_draft: proposed by a drafter and accepted (speculative decoding).
        time: time.perf_counter() when it was generated.
        usage, timings: on the last response only.
    """

    token: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    from_draft: bool = False
    time: float = 0.0
    usage: Usage | None = None
    timings: Timings | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request as a whole (RequestHandle.result)."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    usage: Usage
    timings: Timings | None
    responses: list[StreamResponse]


@dataclass(frozen=True)
class RequestSettings:
    """What one request asks for, checked on construction.

    Attributes:
        max_new_tokens: most tokens to generate.
        sampling: temperature, top-k, top-p, repetition penalty, seed.
        stop: strings that end generation (not included in the output).
        logprobs: None for none; k >= 0: each token's log-probability and the k most likely.
        ignore_eos: generate past end-of-sequence tokens.
        grammar: structured output (a checked grammar from Engine.grammars.compile), or None.
    """

    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be strings, got {self.stop!r}")
        if self.sampling.seed is not None and self.sampling.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.sampling.seed}")
        k = self.logprobs
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer 0..{MAX_TOP_LOGPROBS}, got {k!r}")


class RequestHandle:
    """A submitted request: iterate it (`for r in handle` or `async for r in handle`) for its
    StreamResponses, `cancel()` it from any thread or task, or `result()` for the whole completion.

    Iteration ends after the response with a finish reason, or at once after a cancel; an error
    in the engine step that ran it is raised from the iteration.
    """

    def __init__(self, wake: Callable[[], None], prompt: list[int], settings: RequestSettings):
        """`wake`: tells the scheduler to look at the request again (it was cancelled)."""
        self.prompt, self.settings = prompt, settings
        # the generator engine.generate gives a single prompt, so seeded sampling matches it
        self._rng = np.random.default_rng(np.random.SeedSequence(settings.sampling.seed).spawn(1)[0])
        self.submitted = time.perf_counter()
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.timings: Timings | None = None
        self._wake = wake
        self._cond = threading.Condition()
        self._events: collections.deque[StreamResponse] = collections.deque()
        self._done = False
        self._error: BaseException | None = None
        self._cancelled = False
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first `async for`
        self._wakeup: asyncio.Event | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop the request; its row is freed before the next step. A no-op once it finished."""
        with self._cond:
            if self._done:
                return
            self._cancelled = True
        self._wake()

    # -- called by the scheduler's thread ------------------------------------------------------
    def _push(self, response: StreamResponse | None, done: bool = False, error: BaseException | None = None,
              reason: str | None = None) -> None:
        with self._cond:
            if response is not None:
                self._events.append(response)
                if response.finish_reason is not None:
                    self.finish_reason, self.usage, self.timings = (response.finish_reason, response.usage,
                                                                    response.timings)
            if done:
                self._done, self._error = True, error
                self.finish_reason = self.finish_reason or reason
            self._cond.notify_all()
            loop, wakeup = self._loop, self._wakeup
        if loop is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the loop was closed: nobody is listening any more
                pass

    # -- consumer side -------------------------------------------------------------------------
    def _pop(self) -> StreamResponse | None:
        """Next response, None when iteration ends; raises the request's error. Caller holds _cond."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            raise self._error
        return None

    def __iter__(self) -> RequestHandle:
        return self

    def __next__(self) -> StreamResponse:
        with self._cond:
            while not self._events and not self._done:
                self._cond.wait()
            response = self._pop()
        if response is None:
            raise StopIteration
        return response

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> StreamResponse:
        while True:
            with self._cond:
                if self._loop is None:
                    self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
                if self._events or self._done:
                    response = self._pop()
                    if response is None:
                        raise StopAsyncIteration
                    return response
                self._wakeup.clear()
            await self._wakeup.wait()

    def result(self) -> Completion:
        """Wait for the end and return the whole completion (the responses not yet iterated)."""
        responses = list(self)
        tokens = [r.token for r in responses]
        usage = self.usage or Usage(len(self.prompt), len(tokens))
        return Completion("".join(r.text for r in responses), tokens, self.finish_reason or "cancelled", usage,
                          self.timings, responses)
