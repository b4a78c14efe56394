"""The OpenAI API as edge-run serves it: request schemas (pydantic), error bodies, response objects."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..runtime.requests import MAX_TOP_LOGPROBS, RequestHandle, StreamResponse, Usage

MAX_STOP_STRINGS = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's /v1/completions; chat defaults to the rest of the context


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field and what it should be, and the field's dotted path."""
    first = error.errors(include_url=False)[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    count = error.error_count()
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    where = f"'{param}'" if param else "the request body"
    return f"invalid value for {where}: {first['msg']}{more}", param


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields edge-run has no use for (user, metadata)


class StreamOptions(_Model):
    include_usage: bool = False


class _Request(_Model):
    """Fields both endpoints share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=0)  # extension (as llama.cpp's and vLLM's servers)
    repetition_penalty: float = Field(1.0, gt=0)  # extension
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever the model says (benchmarks)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)

    def check_supported(self) -> None:
        """Raise ApiError(400) for valid requests that ask for something edge-run does not do."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n} is not supported: edge-run returns one choice per request; send n "
                                f"requests (they share batch steps)", "invalid_request_error", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported; use repetition_penalty (1 = off, e.g. 1.1)",
                               "invalid_request_error", param=name)
        if len(self.stops()) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stops())}",
                           "invalid_request_error", param="stop")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", "invalid_request_error",
                           param="stream_options")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self) -> dict:
        """Scheduler.submit's sampling arguments."""
        # top_p 0 (allowed by OpenAI) keeps only the most likely token, as the smallest positive value does
        return dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p or 1e-9,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stops(),
                    ignore_eos=self.ignore_eos)


class ContentPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str = "{}"  # a JSON string, as OpenAI sends it


class ToolCall(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call
    name: str | None = None

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: str | dict = "auto"
    parallel_tool_calls: bool = True  # accepted; a turn makes one call (see runtime/tools.py)
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools and self.response_format and self.response_format.get("type", "text") != "text":
            raise ApiError(400, "tools and response_format do not combine: a tool call has its own format",
                           "invalid_request_error", param="response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_request_error", param="top_logprobs")

    def plain_messages(self) -> list[dict]:
        return [m.plain() for m in self.messages]


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    response_format: dict | None = None  # extension (as vLLM's): structured output for completions too
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, unsupported in (("echo", self.echo), ("suffix", self.suffix), ("best_of", (self.best_of or 1) > 1)):
            if unsupported:
                raise ApiError(400, f"{name} is not supported by edge-run serve", "invalid_request_error", param=name)

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a string or token ids); a batch of several is a 400."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, f"one prompt per request, got {len(prompt)}; send one request each (they share "
                                    f"batch steps)", "invalid_request_error", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty", "invalid_request_error", param="prompt")
        return prompt


# -- responses -------------------------------------------------------------------------------------
def usage_dict(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


TokenText = Callable[[int], str]


def chat_logprobs(responses: Sequence[StreamResponse], token_text: TokenText, offset: int = 0) -> dict:
    """The `logprobs` object of a chat choice or chunk: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top_logprobs]}
                        for r in responses]}


def completion_logprobs(responses: Sequence[StreamResponse], token_text: TokenText, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets = []
    for r in responses:
        offsets.append(offset)
        offset += len(r.text)
    return {"tokens": [token_text(r.token) for r in responses], "token_logprobs": [r.logprob for r in responses],
            "top_logprobs": [{token_text(t): lp for t, lp in r.top_logprobs} for r in responses],
            "text_offset": offsets}


def _logprobs(responses, builder) -> dict | None:
    if builder is None:
        return None
    make, token_text = builder
    return make(responses, token_text)


def chat_response(completion_id: str, created: int, model: str, responses: list[StreamResponse],
                  handle: RequestHandle, logprobs=None, tool_calls: list[dict] | None = None) -> dict:
    text = "".join(r.text for r in responses)
    message = {"role": "assistant", "content": None if tool_calls else text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": _logprobs(responses, logprobs),
                         "finish_reason": "tool_calls" if tool_calls else handle.finish_reason}],
            "usage": usage_dict(handle.usage)}


def completion_response(completion_id: str, created: int, model: str, responses: list[StreamResponse],
                        handle: RequestHandle, logprobs=None) -> dict:
    text = "".join(r.text for r in responses)
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": _logprobs(responses, logprobs),
                         "finish_reason": handle.finish_reason}],
            "usage": usage_dict(handle.usage)}


def chat_chunk(completion_id: str, created: int, model: str, delta: dict, logprobs: dict | None,
               finish_reason: str | None, extra: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}], **extra}


def completion_chunk(completion_id: str, created: int, model: str, text: str, logprobs: dict | None,
                     finish_reason: str | None, extra: dict) -> dict:
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}], **extra}
