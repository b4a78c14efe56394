"""The app-facing engine: load a package, generate (streamed), chat, batch."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# open_backend imports only the backend a package asks for
from .backend import Backend, InvariantSteps, inexact_verification_types, open_backend, require_staged
from .constraints import Grammar, Grammars, RowConstraint, choose
from .draft_policy import AdaptiveDraftLength, DraftPolicy
from .drafters import Drafter, ModelDrafter
from .early_exit import EarlyExitRunner, ExitGuard, ExitPoint, exit_points
from .manifest import MANIFEST_NAME, PackageError, check_memory, read_manifest
from .memory import KV_ITEMSIZE, MemoryFit, MemoryMeter, MemoryUse, fit_memory, weight_file_bytes
from .requests import RequestHandle, StreamResponse
from .sampling import Sampler, SamplingParams
from .scheduler import Scheduler, scheduler_for
from .speculative import (
    SPECULATIVE_FORMS,
    SpeculativeSpec,
    SpeculativeStats,
    draft_round,
    make_drafter,
    parse_speculative,
    verify,
)
from .text import read_tokenizer, render_chat_template, template_takes_tools
from .textstream import StopMatcher, TextStream, step_text
from .tools import ToolPlan, parse_tool_calls
from .tools import plan as tool_plan

log = logging.getLogger(__name__)
DEFAULT_MAX_CONTEXT = 2048


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token of one sequence.

    Attributes:
        token: token id.
        text: the new text this token completes (may be empty while a character is incomplete).
        index: which prompt of the batch this token belongs to.
        finish_reason: None while generating; "stop" (EOS or stop string) or "length" on the last.
        from_draft: produced by a draft and accepted by the target (speculative decoding).
        exit_layer: layer the token exited at (early exit), None when it ran all layers.
        tool_calls: on the last response of a `chat(..., tools=...)` turn that called a tool, the
            call as the OpenAI API shapes it ([{"id", "type": "function", "function": {"name",
            "arguments" (a JSON string)}}]); None otherwise.
    """

    token: int
    text: str
    index: int = 0
    finish_reason: str | None = None
    from_draft: bool = False
    exit_layer: int | None = None
    tool_calls: list[dict] | None = None


class _Row:
    """Decoding state of one sequence of a batch: context, sampler, text stream, finish rules."""

    def __init__(self, index: int, prompt: list[int], sampler: Sampler, stream: TextStream,
                 matcher: StopMatcher, eos: frozenset[int], max_new_tokens: int,
                 constraint: RowConstraint | None = None):
        self.index, self.tokens, self.sampler = index, list(prompt), sampler
        self.stream, self.matcher, self.eos, self.max_new_tokens = stream, matcher, eos, max_new_tokens
        self.constraint = constraint  # structured output: the row's grammar state
        self.generated, self.active = 0, True
        sampler.observe(prompt)

    def emit(self, token: int, from_draft: bool, max_len: int, last: bool = True) -> GenerationResponse:
        """Record a generated token and decide whether the sequence ends with it (`last`: no later
        token of the same verification follows it, so the grammar's state is this token's)."""
        self.tokens.append(token)
        self.generated += 1
        # out of tokens, or no cache slot left for the next one
        out_of_room = self.generated >= self.max_new_tokens or len(self.tokens) - 1 >= max_len
        done = last and self.constraint is not None and self.constraint.finished
        text, finish = step_text(self.stream, self.matcher, token, self.eos, out_of_room, done)
        self.active = finish is None
        return GenerationResponse(token, text, self.index, finish, from_draft)


def _with_tool_calls(responses: Iterator[GenerationResponse], wrapped: bool) -> Iterator[GenerationResponse]:
    """`responses` with the parsed tool call on the last one."""
    pieces = []
    for r in responses:
        pieces.append(r.text)
        if r.finish_reason is not None:
            r = dataclasses.replace(r, tool_calls=parse_tool_calls("".join(pieces), wrapped))
        yield r


class Engine:
    """A loaded package ready to generate.

    Args:
        package_dir: folder with manifest.json.
        device: "cpu", "cuda", ... or "auto" (see edgerun.devices).
        backend: "onnx", "llamacpp" or "auto" (the package's first).
        threads: intra-op threads (default: physical cores).
        max_context: KV cache length per sequence (default: min(model context, 2048)).
        kv_cache: "f32" (default), or on llama.cpp "f16" for half the KV memory or "q8_0" for
            34/128 of it (needs llama.cpp's flash attention, so not with batch-invariant steps or
            exact speculative decoding of quantized weights).
        batch_invariant: compute every step with at least two tokens per sequence, so logits do
            not depend on the step's shape: any batch size, plain or speculative, then reproduces
            plain batch-1 greedy of such an engine token for token, on every backend and weight
            type. Without it, kernels that differ between one new token and several move quantized
            models' logits enough to change the output where two tokens nearly tie (float
            weights: only at far closer ties). Costs decode speed (see the README).
        max_memory: bytes the engine may use (weights, runtime, KV cache, activations; see
            `memory.fit_memory`): picks the longest context up to `max_context` (and on llama.cpp an
            f16 KV cache when that fits a longer one) and refuses with the smallest fit when nothing
            does: checked on the weights' size before loading and on what loading measured after.
        speculative: this engine will decode speculatively (True, or the mode you will use). A
            backend that chooses its invariant kernels at load (llama.cpp) then loads them when
            the weights are quantized, so speculation can be exact (see `generate`'s `exact`);
            plain decoding on it is then invariant too. onnxruntime needs no hint.
    """

    def __init__(self, package_dir: str | Path, device: str = "cpu", threads: int | None = None,
                 max_context: int | None = None, backend: str = "auto", kv_cache: str = "f32",
                 batch_invariant: bool = False, speculative: bool | str = False, max_memory: int | None = None):
        self._memory = MemoryMeter()  # before anything of the engine is loaded
        self.package_dir = Path(package_dir)
        self.manifest = read_manifest(self.package_dir)
        spec = self.manifest.model
        if max_context is not None and (not isinstance(max_context, int) or max_context < 2):
            raise ValueError(f"max_context must be an integer >= 2, got {max_context!r}")
        if kv_cache not in KV_ITEMSIZE:
            raise ValueError(f"kv_cache must be one of {', '.join(KV_ITEMSIZE)}, got {kv_cache!r}")
        self.max_context = min(max_context or DEFAULT_MAX_CONTEXT, spec.context_length)
        if spec.kv_dtype == "float16" and kv_cache == "f32" and backend != "llamacpp" \
                and "onnx" in (self.manifest.backends or ("onnx",)):
            kv_cache = "f16"  # an ONNX package's KV type is its graphs' (the default means: the package's)
        self.memory_fit: MemoryFit | None = None  # what max_memory chose
        if max_memory is not None:
            backend_name = backend if backend != "auto" else (self.manifest.backends or ("onnx",))[0]
            kv_types = (kv_cache,) if kv_cache != "f32" or backend_name != "llamacpp" else (
                ("f32", "f16") if batch_invariant or speculative else ("f32", "f16", "q8_0"))  # q8_0: not invariant
            self.memory_fit = fit_memory(spec, max_memory, self._weight_bytes(backend_name), kv_types,
                                         max_context or spec.context_length)
            self.max_context, kv_cache = self.memory_fit.max_context, self.memory_fit.kv_cache
        self._kv_itemsize = KV_ITEMSIZE[kv_cache]
        self.check_kv_memory(1)  # before any weights load
        self.tokenizer = read_tokenizer(self.package_dir, self.manifest.tokenizer, spec.vocab_size)
        self.backend = open_backend(backend, self.package_dir, self.manifest, device, threads, kv_cache,
                                    batch_invariant, bool(speculative))
        self._memory.loaded(self.backend.weight_bytes)
        if max_memory is not None:  # again with what loading measured (pre-packed weights, buffers)
            loaded = max(self._memory.after_load - self._memory.before, self.backend.weight_bytes)
            self.memory_fit = fit_memory(spec, max_memory, loaded, (kv_cache,), self.max_context)
            self.max_context = self.memory_fit.max_context
            log.info("--max-memory: %s", self.memory_fit.summary())
        self.batch_invariant = isinstance(self.backend, InvariantSteps)
        self.eos_token_ids = frozenset(self.manifest.eos_token_ids)
        self.grammars = Grammars(self.tokenizer, spec.vocab_size, self.manifest.eos_token_ids)  # structured output
        self._kv = None  # the KV cache of the last generation (see fresh_cache)
        self._drafters: dict[SpeculativeSpec, Drafter] = {}
        self._invariant: InvariantSteps | None = None  # the backend's invariant form, for exact speculation
        self.threads = threads
        self.stats = SpeculativeStats()  # speculative decoding figures of the last generation
        self.exit_layers: list[int] = []  # layers each token of the last early-exit generation used
        # opens the model of a `draft:MODEL` drafter (edgerun.load sets one that also takes
        # checkpoints and known model names; an Engine made directly opens package folders)
        self.open_model: Callable[..., Engine] = Engine

    def _weight_bytes(self, backend: str) -> int:
        """Bytes of the weight files `backend` loads (before loading: the least loading will take)."""
        stages = [] if backend == "llamacpp" else [s.file for s in self.manifest.stages]
        return weight_file_bytes(self.package_dir, stages, self.manifest.gguf_path(self.package_dir))

    # -- text <-> tokens -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def _tokens(self, prompt: str | Sequence[int], add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt, add_special_tokens)
        return [int(t) for t in prompt]

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """Render `messages` (and `tools`, for a template that takes them) with the model's own chat
        template (jinja2, as Hugging Face does)."""
        template = self.manifest.chat_template
        if not template:
            raise PackageError(f"package {self.package_dir} has no chat template; use generate() "
                               f"with a plain prompt (or `edge-run run --raw`)")
        def token(i):
            return self.tokenizer.id_to_token(i) if i is not None else ""

        from jinja2 import TemplateError

        try:
            return render_chat_template(template, messages, token(self.manifest.bos_token_id),
                                        token(next(iter(self.manifest.eos_token_ids), None)), add_generation_prompt,
                                        tools)
        except TemplateError as e:  # name the file the template came from
            raise TemplateError(f"{e} (chat_template of {self.package_dir / MANIFEST_NAME})") from None

    # -- generation ------------------------------------------------------------------------
    def check_kv_memory(self, batch: int) -> None:
        """Refuse a KV cache of `batch` rows that needs more memory than the machine has available.

        Raises:
            ValueError: naming the cache's size, the memory available and the fix.
        """
        spec = self.manifest.model
        check_memory(spec.kv_bytes(batch, self.max_context + 1, self._kv_itemsize),
                     f"a KV cache of {batch} x {self.max_context} positions ({spec.num_layers} layers x "
                     f"{spec.num_kv_heads} KV heads x {spec.head_dim} x {self._kv_itemsize} bytes, K and V)",
                     "lower max_context (--max-context)" + (" or the batch size" if batch > 1 else ""))

    def fresh_cache(self, batch: int):
        """An emptied KV cache for `batch` rows (generation, or a draft model's drafting).

        The engine keeps one: a generation at another batch size drops the previous cache before
        making its own, so caches of several sizes (each max_context positions per row, resident
        once allocated) never add up; a generation at the same batch size reuses it.
        """
        if self._kv is None or self._kv.batch != batch:
            self._kv = None  # freed (once no generation uses it) before the new one is allocated
            self.check_kv_memory(batch)
            self._kv = self.backend.new_cache(batch, self.max_context)
        self._kv.reset()
        return self._kv

    def prefill(self, prompts: Sequence[Sequence[int]], cache, backend: Backend | None = None) -> np.ndarray:
        """Run right-padded prompts through the model (`backend`, default the engine's); returns the
        last position's logits [B, V]."""
        lengths = np.array([len(p) for p in prompts])
        tokens = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        return (backend or self.backend).forward(tokens, cache, lengths, (lengths - 1)[:, None])[:, 0]

    def generate(self, prompt: str | Sequence[str] | Sequence[int], max_new_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Iterable[str] = (), add_special_tokens: bool = True,
                 speculative: str | Drafter | None = None, draft_tokens: int | str | DraftPolicy = "auto",
                 early_exit: float | None = None, exit_threshold: float | None = None,
                 ignore_eos: bool = False, exact: bool = True,
                 response_format: dict | Sequence[dict | None] | None = None) -> Iterator[GenerationResponse]:
        """Generate from one prompt or a batch of 1..8 prompts, streaming one response per token.

        Args:
            prompt: a string or a list of token ids, or a list of those (a batch; each
                response's `index` says which prompt it continues).
            max_new_tokens: most tokens to generate per prompt.
            temperature, top_k, top_p, repetition_penalty: sampling; temperature 0 is greedy.
            seed: makes sampling reproducible.
            stop: strings that end generation (not included in the output).
            add_special_tokens: let the tokenizer add BOS etc. when encoding string prompts.
            speculative: None (plain decoding), "lookup[:MAX_NGRAM[,MIN_NGRAM]]" (prompt lookup),
                "draft:PATH" (a draft model with the same vocabulary), "self:K" (the first K
                layers draft; onnx backend, package exported with --exit-layers K), a
                SpeculativeSpec, or a Drafter subclass instance. Lossless: sampling keeps the
                target distribution, and greedy output is token-identical to plain greedy of a
                batch-invariant engine (with float weights, also of this one; see `exact`).
            draft_tokens: drafts per round, "auto" (0-16 per round, chosen from the observed
                acceptance curve and step costs; see draft_policy.AdaptiveDraftLength), or a
                DraftPolicy object of your own (it keeps its state between calls).
            early_exit: stop tokens at the package's exits when their calibrated top-1 agreement
                with the full model is at least this level (e.g. 0.95); batch 1, onnx backend only.
                Exits stay on only while they are measured to pay (early_exit.ExitGuard).
            exit_threshold: a raw confidence threshold for every exit instead of a quality level
                (tried on every token, unguarded).
            ignore_eos: keep generating past end-of-sequence tokens until max_new_tokens or a
                stop string (benchmarks that need equal token counts).
            exact: with speculative decoding on quantized weights, run this generation's steps
                (prefill included) in the batch-invariant form, so the verified logits do not
                depend on how many drafts a step carries. False: the fast one-token kernels
                where a step has one token, as plain decoding uses; greedy output can then leave
                every plain reference where two tokens nearly tie (README, "Exactness").
                Plain decoding always uses the fast kernels of a default engine.
            response_format: structured output (llguidance): {"type": "json_schema", "json_schema":
                {"schema": {...}}}, {"type": "json_object"}, {"type": "regex", "pattern": ...},
                {"type": "grammar", "lark": ...} or None / {"type": "text"}; or one per prompt of a
                batch. Every token is chosen among those the grammar allows, tokens the grammar
                forces are taken without sampling (several per step), and the sequence ends
                ("stop") when the grammar is complete. Combines with every drafter (greedy output
                unchanged), not with early exit.
        Yields:
            GenerationResponse per token; the last one of each prompt carries finish_reason.
        Raises:
            ValueError: a bad argument, a bad speculative mode, early exit / self-speculation
                on a backend that runs the whole model in one call (llama.cpp), or exact
                speculation on a quantized llama.cpp engine not loaded for it.
        """
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        eos = frozenset() if ignore_eos else self.eos_token_ids
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        one = isinstance(prompt, str) or all(isinstance(t, (int, np.integer)) for t in prompt)
        prompts = [self._tokens(p, add_special_tokens) for p in ([prompt] if one else prompt)]
        if not 1 <= len(prompts) <= 8:
            raise ValueError(f"batch size must be 1..8 prompts, got {len(prompts)}")
        for row, tokens in enumerate(prompts):
            if not tokens:
                raise ValueError(f"prompt {row} is empty; give at least one token")
            if len(tokens) >= self.max_context:
                raise ValueError(f"prompt {row} has {len(tokens)} tokens but the context holds "
                                 f"{self.max_context}; shorten it or raise max_context")
        if isinstance(draft_tokens, DraftPolicy):
            policy = draft_tokens
        elif draft_tokens == "auto" or (isinstance(draft_tokens, int) and not isinstance(draft_tokens, bool)
                                        and draft_tokens >= 1):
            policy = AdaptiveDraftLength(fixed=None if draft_tokens == "auto" else draft_tokens)
        else:
            raise ValueError(f"draft_tokens must be an integer >= 1, 'auto' or a DraftPolicy, got {draft_tokens!r}")
        grammars = self._grammars(response_format, len(prompts))
        if early_exit is not None or exit_threshold is not None:
            if any(grammars):
                raise ValueError("early exit does not combine with response_format; drop one of them")
            if speculative is not None or len(prompts) != 1:
                raise ValueError("early exit runs one prompt without speculative decoding")
            require_staged(self.backend, "early exit")
            points = exit_points(self.package_dir, self.manifest, early_exit, exit_threshold)
            return self._generate_early_exit(prompts[0], params, max_new_tokens, list(stop), points, eos,
                                             guarded=early_exit is not None)
        if isinstance(speculative, str):
            speculative = parse_speculative(speculative)  # a bad mode is named before the exactness check
        steps = self._step_backend(speculative is not None, exact)
        drafter = self._drafter(speculative)
        if drafter is not None and drafter.cannot_pay and isinstance(policy, AdaptiveDraftLength) \
                and policy.fixed is None:
            # a draft that reads as many weight bytes per token as this engine loses on every
            # round, and its prefill and probe rounds cost before the policy could turn it off
            log.info("decoding plainly: the draft model cannot pay (%s)", drafter.cannot_pay)
            drafter, steps = None, self.backend
        return self._generate(prompts, params, max_new_tokens, list(stop), drafter, policy, eos, steps, grammars)

    def _grammars(self, response_format, batch: int) -> list[Grammar | None]:
        """One checked grammar (or None) per prompt; a ValueError before anything runs."""
        if isinstance(response_format, (list, tuple)):
            if len(response_format) != batch:
                raise ValueError(f"response_format has {len(response_format)} entries for {batch} prompts; "
                                 f"give one per prompt (None for unconstrained) or a single one for all")
            return [self.grammars.compile(f) for f in response_format]
        return [self.grammars.compile(response_format)] * batch

    def _step_backend(self, speculating: bool, exact: bool) -> Backend:
        """The backend a generation's steps run on: the engine's, or for exact speculation on
        quantized weights its invariant form over the same sessions (no second model load)."""
        if not speculating or not exact or self.batch_invariant:
            return self.backend
        inexact = inexact_verification_types(self.manifest.weights)
        if not inexact:
            return self.backend
        if getattr(self.backend, "invariant_at_load", False):
            raise ValueError(f"exact speculative decoding of {'/'.join(inexact)} weights on {self.backend.library} "
                             f"needs its batch-invariant kernels, chosen at load: load with speculative=True "
                             f"(edgerun.load(..., speculative=True); the CLI does it for --speculative), or pass "
                             f"exact=False to accept output that can differ from plain greedy")
        if self._invariant is None:
            self._invariant = InvariantSteps(self.backend)
        return self._invariant

    def _drafter(self, speculative: str | SpeculativeSpec | Drafter | None) -> Drafter | None:
        if speculative is None:
            return None
        if isinstance(speculative, str):
            speculative = parse_speculative(speculative)
        if not isinstance(speculative, (SpeculativeSpec, Drafter)):
            raise TypeError(f"speculative must be None, a mode string ({SPECULATIVE_FORMS}), a SpeculativeSpec "
                            f"or a Drafter subclass instance, got {type(speculative).__name__}")
        if isinstance(speculative, Drafter):
            return speculative
        if speculative not in self._drafters:  # draft models load once per engine
            self._drafters[speculative] = make_drafter(speculative, self, max_context=self.max_context,
                                                       threads=self.threads)
        return self._drafters[speculative]

    def _generate(self, prompts: list[list[int]], params: SamplingParams, max_new_tokens: int,
                  stops: list[str], drafter: Drafter | None, policy: DraftPolicy,
                  eos: frozenset[int], backend: Backend | None = None,
                  grammars: Sequence[Grammar | None] = ()) -> Iterator[GenerationResponse]:
        backend = backend or self.backend  # this generation's steps (see _step_backend)
        seeds = np.random.SeedSequence(params.seed).spawn(len(prompts))
        grammars = list(grammars) or [None] * len(prompts)
        rows = [_Row(i, p, Sampler(params, self.manifest.model.vocab_size, np.random.default_rng(seed)),
                     TextStream(self.tokenizer), StopMatcher(stops), eos, max_new_tokens,
                     self.grammars.matcher(g) if g is not None else None)
                for i, (p, seed, g) in enumerate(zip(prompts, seeds, grammars))]
        constrained = any(row.constraint is not None for row in rows)
        self.stats = stats = SpeculativeStats()
        cache = self.fresh_cache(len(rows))
        logits = self.prefill(prompts, cache, backend)
        if drafter is not None:
            drafter.use_backend(backend)
            drafter.start(prompts, params, cache)  # a draft model's prefill is part of the prompt's cost
        for row in rows:
            yield row.emit(choose(row.sampler, logits[row.index], row.constraint), False, cache.max_len)
        if drafter is None and not constrained:
            yield from self._decode_plain(rows, cache)
            return
        # speculative rounds; under a grammar the tokens it forces lead each row's draft (free drafts)
        while any(row.active for row in rows):
            # each active row feeds its pending token (the last one, not yet cached) + its drafts
            start = np.array([len(row.tokens) - 1 if row.active else 0 for row in rows], dtype=np.int32)
            cache.rollback(start)
            active = [row for row in rows if row.active]
            t0 = time.perf_counter()  # sorting rows into classes is part of drafting
            room = [min(max_new_tokens - row.generated - 1, cache.max_len - int(start[row.index]) - 1)
                    if row.active else 0 for row in rows]
            ks: dict[int, int] = {}
            classes: list[int] = []
            if drafter is not None:
                classes = drafter.classes([row.tokens for row in active])
                ks = dict(zip((row.index for row in active), policy.lengths(classes)))
            # a self-speculative drafter runs its layers on its own drafts only: forced tokens are not
            # put in front of them (verification still takes them, as the rule at every position)
            forced, drafts = draft_round(drafter, [row.tokens for row in rows], [row.constraint for row in rows],
                                         room, [ks.get(row.index, 0) for row in rows],
                                         lead_forced=drafter is None or drafter.target_forward is None)
            t1 = time.perf_counter()
            width = 1 + max(len(d.tokens) for d in drafts)
            tokens = np.zeros((len(rows), width), dtype=np.int64)
            counts = np.zeros(len(rows), dtype=np.int32)
            for row, draft in zip(rows, drafts):
                if row.active:
                    counts[row.index] = 1 + len(draft.tokens)
                    tokens[row.index, :counts[row.index]] = [row.tokens[-1], *draft.tokens]
            # a self-speculative drafter verifies with the layers it did not run itself
            forward = (drafter.target_forward if width > 1 and drafter is not None else None) or backend.forward
            logits = forward(tokens, cache, counts, np.tile(np.arange(width), (len(rows), 1)))
            t2 = time.perf_counter()
            outcomes = []  # (proposed, accepted) per active row
            for row, draft in zip(rows, drafts):
                if not row.active:
                    continue
                out = verify(row.sampler, draft, logits[row.index, :counts[row.index]], row.constraint)
                proposed = len(draft.tokens) - len(forced[row.index])  # the drafter's, not the grammar's
                accepted = max(0, len(out) - 1 - len(forced[row.index]))
                stats.record(proposed, accepted)
                outcomes.append((proposed, accepted))
                for j, token in enumerate(out):
                    yield row.emit(token, j < len(out) - 1, cache.max_len, last=j == len(out) - 1)
                    if not row.active:
                        break
            if drafter is not None:
                policy.update(outcomes, t1 - t0, t2 - t1, classes)

    def _decode_plain(self, rows: list[_Row], cache) -> Iterator[GenerationResponse]:
        """Plain decoding: each active row feeds its last token and samples the next one.

        This runs once per generated token, so it reuses its input arrays and does no draft
        bookkeeping; a finished row takes no more tokens and its cache is emptied (as the
        speculative loop does), so its padding slot never runs past the cache.
        """
        tokens = np.zeros((len(rows), 1), dtype=np.int64)
        counts = np.zeros(len(rows), dtype=np.int64)
        positions = np.zeros((len(rows), 1), dtype=np.int64)  # the logits of the one new token
        forward, max_len = self.backend.forward, cache.max_len
        active = [row for row in rows if row.active]
        while active:
            for row in active:
                tokens[row.index, 0], counts[row.index] = row.tokens[-1], 1
            logits = forward(tokens, cache, counts, positions)
            for row in active:
                yield row.emit(row.sampler(logits[row.index, 0]), False, max_len)
                if not row.active:
                    counts[row.index] = 0
                    cache.rollback(np.where(np.arange(len(rows)) == row.index, 0, cache.lengths))
            active = [row for row in active if row.active]

    def _generate_early_exit(self, prompt: list[int], params: SamplingParams, max_new_tokens: int,
                             stops: list[str], points: list[ExitPoint],
                             eos: frozenset[int], guarded: bool = False) -> Iterator[GenerationResponse]:
        row = _Row(0, prompt, Sampler(params, self.manifest.model.vocab_size), TextStream(self.tokenizer),
                   StopMatcher(stops), eos, max_new_tokens)
        cache = self.fresh_cache(1)
        logits = self.prefill([prompt], cache)[0]
        # a quality level keeps exits only while they pay (ExitGuard); a raw threshold always tries them
        runner = EarlyExitRunner(self.backend, cache, points, ExitGuard() if guarded else None)
        self.exit_layers = []
        exit_layer = None
        while row.active:
            response = row.emit(row.sampler(logits), False, cache.max_len)
            self.exit_layers.append(exit_layer or self.manifest.model.num_layers)
            yield dataclasses.replace(response, exit_layer=exit_layer)
            if row.active:
                logits, exit_layer = runner.step(row.tokens[-1], len(row.tokens) - 1)

    def chat(self, messages: list[dict], tools: list[dict] | None = None, tool_choice: str | dict = "auto",
             **kwargs) -> Iterator[GenerationResponse]:
        """Generate the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...]).

        Args:
            tools: OpenAI-style function tools ([{"type": "function", "function": {"name",
                "description", "parameters": JSON schema}}]); the reply is then either a call,
                decoded under a grammar of the tools' schemas and handed back parsed in the last
                response's `tool_calls`, or plain text (see runtime/tools.py for the formats).
            tool_choice: "auto", "required", "none" or {"type": "function", "function": {"name": ...}}.
            kwargs: as generate() (not response_format together with tools).
        Raises:
            ValueError: bad tools or tool_choice, or tools with a response_format.
        """
        if tools is None:
            return self.generate(self.encode(self.apply_chat_template(messages), add_special_tokens=False), **kwargs)
        if kwargs.get("response_format") is not None:
            raise ValueError("tools and response_format do not combine: a tool call has its own format")
        prompt, turn = self.tool_turn(messages, tools, tool_choice)
        responses = self.generate(prompt, response_format=turn.response_format, **kwargs)
        return _with_tool_calls(responses, turn.wrapped)

    def tool_turn(self, messages: list[dict], tools: list[dict], tool_choice: str | dict = "auto"
                  ) -> tuple[list[int], ToolPlan]:
        """The prompt tokens and the plan (grammar as response_format, call format) of a chat turn
        with tools; parse its answer with `edgerun.runtime.tools.parse_tool_calls(text, plan.wrapped)`.

        Raises:
            ValueError: bad tools or tool_choice, naming the field.
        """
        template = self.manifest.chat_template or ""
        turn = tool_plan(messages, tools, tool_choice, template_takes_tools(template), "<tool_call>" in template)
        text = self.apply_chat_template(turn.messages, tools=turn.template_tools)
        return self.encode(text, add_special_tokens=False), turn

    def complete(self, prompt: str, **kwargs) -> str:
        """Convenience: the whole generated text for one prompt."""
        return "".join(r.text for r in self.generate(prompt, **kwargs))

    def memory(self) -> MemoryUse:
        """Resident memory now, split into weights, KV cache, runtime, activations, draft models
        (their loading and KV caches) and the process."""
        drafts = sum(e._memory.loaded_bytes + e._kv_bytes for e in self._draft_engines())
        return self._memory.use(self._kv_bytes, drafts)

    @property
    def _kv_bytes(self) -> int:
        """Bytes of the KV cache allocated now (0 before the first generation)."""
        return self._kv.nbytes if self._kv is not None else 0

    def _draft_engines(self) -> list[Engine]:
        """The draft models this engine opened for `draft:` and `auto:` modes."""
        models = [getattr(d, "model", d) for d in self._drafters.values()]  # auto wraps its model drafter
        return [m.engine for m in models if isinstance(m, ModelDrafter) and m.engine is not self]

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] of a whole sequence in one pass (fresh cache)."""
        cache = self.backend.new_cache(1, len(tokens) + 1)
        tokens = np.asarray(tokens, dtype=np.int64)[None]
        positions = np.arange(tokens.shape[1], dtype=np.int64)[None]
        return self.backend.forward(tokens, cache, np.array([tokens.shape[1]]), positions)[0]

    # -- concurrent requests: continuous batching (scheduler.py) -------------------------------
    def scheduler(self, **settings) -> Scheduler:
        """The engine's scheduler for concurrent requests, started on first use.

        Args:
            settings: Scheduler arguments (max_batch=8, prefill_chunk, max_queue, prompt_cache_bytes,
                speculative="lookup", ...) when starting it; none: the running one, else the defaults.
        Raises:
            ValueError: other settings while one runs (close() it first).
        """
        return scheduler_for(self, **settings)

    def submit(self, prompt: str | Sequence[int], **kwargs) -> RequestHandle:
        """Queue one request for the scheduler (thread-safe); returns its handle at once.

        Keyword arguments as Scheduler.submit (max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop, logprobs, ...). Iterate the handle (`for` or `async for`)
        for StreamResponses, `cancel()` it from any thread, or `result()` it. While the scheduler
        runs it owns the backend: do not call generate() at the same time.
        """
        return scheduler_for(self).submit(prompt, **kwargs)

    async def agenerate(self, prompt: str | Sequence[int], **kwargs) -> AsyncIterator[StreamResponse]:
        """`async for r in engine.agenerate(prompt, ...)`: submit() as an async generator; closing
        it or cancelling its task cancels the request (its row is freed before the next step)."""
        handle = self.submit(prompt, **kwargs)
        try:
            async for response in handle:
                yield response
        finally:
            handle.cancel()
