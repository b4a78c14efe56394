"""Structured output (llguidance): every answer follows its schema, regex or grammar; speculation and
batching leave greedy constrained output unchanged; bad formats fail before any token."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from conftest import build_tiny_llama
from structured_cases import SCHEMAS

import edgerun
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.constraints import check_response_format
from edgerun.runtime.drafters import Draft
from edgerun.runtime.sampling import Sampler, SamplingParams
from edgerun.runtime.speculative import verify


def schema_format(schema: dict, compact: bool = False) -> dict:
    if compact:  # no blanks between JSON tokens (a schema's own llguidance options)
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None}}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Llama (a hostile generator: it knows nothing of JSON) and a draft for it."""
    root = tmp_path_factory.mktemp("structured")
    export(build_tiny_llama(root / "hf", seed=3, initializer_range=0.2), root / "target")
    export(build_tiny_llama(root / "hf_draft", seed=4, num_hidden_layers=2, initializer_range=0.2), root / "draft")
    return edgerun.Engine(root / "target", max_context=256), root / "draft"


def _answer(engine, prompt, fmt, **kw):
    responses = list(engine.generate(prompt, max_new_tokens=160, response_format=fmt, **kw))
    return "".join(r.text for r in responses), responses


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_every_schema_validates_on_a_random_model(tiny, sampled):
    engine, _ = tiny
    assert len(SCHEMAS) >= 30
    kw = dict(temperature=0.9, seed=7) if sampled else {}
    for i, (what, schema) in enumerate(SCHEMAS):
        # a random model spends its budget on every blank it may: compact JSON bounds the length
        text, responses = _answer(engine, f"the fox {i}", schema_format(schema, compact=True), **kw)
        assert responses[-1].finish_reason == "stop", (what, text)
        jsonschema.validate(json.loads(text), schema)


def test_regex_and_lark_grammars(tiny):
    engine, _ = tiny
    for seed in range(4):
        text, _ = _answer(engine, "the date", {"type": "regex", "pattern": r"20[0-9]{2}-(0[1-9]|1[0-2])"},
                          temperature=1.0, seed=seed)
        assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])", text), text
    lark = 'start: "call " NAME "(" NUMBER ("," NUMBER)? ")"\nNAME: /[a-z]{1,6}/\nNUMBER: /[0-9]{1,3}/\n'
    for seed in range(4):
        text, responses = _answer(engine, "the call", {"type": "grammar", "lark": lark}, temperature=1.0, seed=seed)
        assert re.fullmatch(r"call [a-z]{1,6}\([0-9]{1,3}(,[0-9]{1,3})?\)", text), text
        assert responses[-1].finish_reason == "stop"


@pytest.mark.parametrize("mode", ["lookup", "draft"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_constrained_speculation_equals_constrained(tiny, mode, batch):
    """Lossless: the same tokens with and without a drafter, rows of a batch with different schemas."""
    engine, draft = tiny
    speculative = "lookup" if mode == "lookup" else f"draft:{draft}"
    cases = SCHEMAS[:batch] if batch == 1 else [SCHEMAS[0], SCHEMAS[6], SCHEMAS[19]]
    prompts = [f"the quick brown fox {i} the quick brown fox" for i in range(batch)]
    formats = [schema_format(schema, compact=True) for _, schema in cases]

    def run(**kw):
        responses = list(engine.generate(prompts, max_new_tokens=120, response_format=formats, **kw))
        return [[r.token for r in responses if r.index == i] for i in range(batch)], responses

    plain, _ = run()
    spec, responses = run(speculative=speculative, draft_tokens=4)
    assert spec == plain
    for i, (_, schema) in enumerate(cases):
        jsonschema.validate(json.loads(engine.decode(spec[i])), schema)
    if mode == "draft":
        assert engine.stats.proposed > 0


def test_rows_without_a_format_stay_free(tiny):
    engine, _ = tiny
    prompts = ["the fox", "the dog"]
    free = list(engine.generate(prompts[1], max_new_tokens=20, ignore_eos=True))
    mixed = list(engine.generate(prompts, max_new_tokens=20, ignore_eos=True,
                                 response_format=[{"type": "regex", "pattern": "[a-z]{3}"}, None]))
    assert re.fullmatch("[a-z]{3}", "".join(r.text for r in mixed if r.index == 0))
    assert [r.token for r in mixed if r.index == 1] == [r.token for r in free]


def test_forced_tokens_take_fewer_steps(tiny, monkeypatch):
    """A schema's boilerplate (field names, punctuation) enters a step as free drafts."""
    engine, _ = tiny
    schema = {"type": "object", "properties": {"a_rather_long_field_name": {"enum": ["the fox", "the dog"]},
                                                     "another_long_field_name": {"type": "boolean"}},
                    "required": ["a_rather_long_field_name", "another_long_field_name"],
                    "additionalProperties": False}
    calls = []
    forward = engine.backend.forward
    monkeypatch.setattr(engine.backend, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    text, responses = _answer(engine, "the fox", schema_format(schema, compact=True))
    jsonschema.validate(json.loads(text), schema)
    assert len(calls) < len(responses) / 2, (len(calls), len(responses))


def test_sampled_verification_masks_and_keeps_the_distribution():
    """Against a fixed masked target p, a draft q verified many times leaves p: the first output's
    frequencies match p restricted to the allowed tokens."""
    import llguidance  # noqa: F401  (the constraint below is a stand-in with the same interface)

    class Allow:
        def __init__(self, allowed):
            self._allowed = allowed

        def forced(self):
            return []

        def mask(self, logits):
            return np.where(self._allowed, logits, -np.inf)

        def consume(self, token):
            assert self._allowed[token], token

        finished = False

    rng = np.random.default_rng(0)
    vocab = 6
    logits = rng.normal(size=(2, vocab)).astype(np.float32)
    allowed = np.array([True, False, True, True, False, True])
    p = np.exp(logits[0]) * allowed
    p /= p.sum()
    q = np.full(vocab, 1 / vocab)
    counts = np.zeros(vocab)
    params = SamplingParams(temperature=1.0)
    sampler = Sampler(params, vocab, np.random.default_rng(1))
    for _ in range(20000):
        token = int(rng.choice(vocab, p=q))
        draft = Draft([token], [q]) if allowed[token] else Draft([], [], cut=q)  # cut: the grammar forbade it
        counts[verify(sampler, draft, logits, Allow(allowed))[0]] += 1
    assert np.abs(counts / counts.sum() - p).max() < 0.015


@pytest.mark.parametrize("fmt, message", [
    ({"type": "regex", "pattern": "a(b"}, "unclosed group"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "objectx"}}}, "objectx"),
    ({"type": "grammar", "lark": "start: foo"}, "unknown name"),
    ({"type": "xml"}, "unknown response_format type"),
    ({"type": "regex"}, "pattern"),
    ("json", "must be an object"),
])
def test_bad_formats_fail_before_generation(tiny, fmt, message):
    engine, _ = tiny
    with pytest.raises(ValueError, match=message):
        engine.generate("the fox", response_format=fmt)  # raised at the call, before any token
    with pytest.raises(ValueError, match=message):
        check_response_format(fmt)


def test_format_count_must_match_the_batch(tiny):
    engine, _ = tiny
    with pytest.raises(ValueError, match="one per prompt"):
        engine.generate(["a", "b"], response_format=[{"type": "json_object"}])


def test_cli_structured_flags(tiny, tmp_path):
    engine, _ = tiny
    schema = SCHEMAS[0][1]
    (tmp_path / "s.json").write_text(json.dumps(schema))
    run = [sys.executable, "-m", "edgerun", "run", str(engine.package_dir), "the fox", "--raw", "-n", "100"]
    out = subprocess.run(run + ["--json-schema", str(tmp_path / "s.json")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)
    out = subprocess.run(run + ["--regex", "[0-9]{4}"], capture_output=True, text=True)
    assert out.returncode == 0 and re.fullmatch("[0-9]{4}", out.stdout.strip()), out
    bad = subprocess.run(run + ["--regex", "a(b"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "invalid response_format" in bad.stderr
    (tmp_path / "bad.json").write_text("{not json")
    bad = subprocess.run(run + ["--json-schema", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert bad.returncode == 1 and "not valid JSON" in bad.stderr


@pytest.mark.slow
def test_real_model_schemas_greedy_and_sampled(smollm2_engine):
    """The real SmolLM2 through its chat template: every answer parses and validates."""
    engine = smollm2_engine
    for sampled in (False, True):
        kw = dict(temperature=0.7, seed=3) if sampled else {}
        for what, schema in SCHEMAS:
            messages = [{"role": "user", "content": f"Reply in JSON: {what}."}]
            responses = list(engine.chat(messages, max_new_tokens=200, response_format=schema_format(schema), **kw))
            text = "".join(r.text for r in responses)
            assert responses[-1].finish_reason == "stop", (what, text)
            jsonschema.validate(json.loads(text), schema)
    messages = [{"role": "user", "content": "Give a small JSON object with a cat's name and age."}]
    text = "".join(r.text for r in engine.chat(messages, max_new_tokens=200, response_format={"type": "json_object"}))
    assert isinstance(json.loads(text), dict)


@pytest.mark.slow
def test_real_model_constrained_lookup_is_lossless(smollm2_engine):
    engine = smollm2_engine
    schema = {"type": "object", "properties": {"summary": {"type": "string", "maxLength": 200},
                                               "keywords": {"type": "array", "items": {"type": "string"},
                                                            "maxItems": 4}},
              "required": ["summary", "keywords"], "additionalProperties": False}
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    messages = [{"role": "user", "content": f"Summarize as JSON with keywords:\n{text}"}]
    plain = [r.token for r in engine.chat(messages, max_new_tokens=160, response_format=schema_format(schema))]
    spec = [r.token for r in engine.chat(messages, max_new_tokens=160, response_format=schema_format(schema),
                                         speculative="lookup")]
    assert spec == plain
    jsonschema.validate(json.loads(engine.decode(plain)), schema)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
]
HERMES_TEMPLATE = (
    "{% if tools %}<s>system: tools {% for t in tools %}{{ t.function.name }} {% endfor %}"
    "answer in <tool_call> tags</s>{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _call(responses) -> dict:
    (call,) = responses[-1].tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    return {"name": call["function"]["name"], "arguments": json.loads(call["function"]["arguments"])}


def _check_call(call: dict, names=("get_weather", "add")) -> None:
    assert call["name"] in names
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["name"])
    jsonschema.validate(call["arguments"], schema)


@pytest.fixture(scope="module")
def tool_engine(tmp_path_factory):
    """A random tiny model with room for the fallback tool prompt."""
    root = tmp_path_factory.mktemp("tools")
    export(build_tiny_llama(root / "hf", seed=3, initializer_range=0.2, max_position_embeddings=1024), root / "pkg")
    return edgerun.Engine(root / "pkg", max_context=1024)


@pytest.mark.parametrize("sampled", [False, True])
def test_tool_call_fallback_prompt(tool_engine, sampled):
    """A template without tools: the tools go into a system message and the call is bare JSON."""
    engine = tool_engine
    kw = dict(temperature=1.0, seed=5) if sampled else {}
    messages = [{"role": "user", "content": "weather in Oslo?"}]
    prompt, turn = engine.tool_turn(messages, TOOLS, "required")
    assert not turn.wrapped and "get_weather" in engine.decode(prompt) and turn.template_tools is None
    responses = list(engine.chat(messages, tools=TOOLS, tool_choice="required", max_new_tokens=200, **kw))
    assert responses[-1].finish_reason == "stop"
    _check_call(_call(responses))
    named = {"type": "function", "function": {"name": "add"}}
    responses = list(engine.chat(messages, tools=TOOLS, tool_choice=named, max_new_tokens=200, **kw))
    _check_call(_call(responses), names=("add",))
    responses = list(engine.chat(messages, tools=TOOLS, tool_choice="none", max_new_tokens=8, **kw))
    assert responses[-1].tool_calls is None
    # "auto": a call (then parsed and valid) or a plain answer that does not begin like one
    responses = list(engine.chat(messages, tools=TOOLS, max_new_tokens=200, **kw))
    text = "".join(r.text for r in responses)
    if responses[-1].tool_calls:
        _check_call(_call(responses))
    else:
        assert not text.lstrip().startswith("{")


def test_tool_call_through_a_template_with_tools(tool_engine):
    """A template that reads `tools` renders them itself; `<tool_call>` tags wrap the call."""
    import dataclasses

    engine = tool_engine
    plain = engine.manifest
    engine.manifest = dataclasses.replace(plain, chat_template=HERMES_TEMPLATE)
    try:
        messages = [{"role": "user", "content": "add 2 and 3"}]
        prompt, turn = engine.tool_turn(messages, TOOLS, "required")
        assert turn.wrapped and engine.decode(prompt).startswith("system: tools get_weather add")
        responses = list(engine.chat(messages, tools=TOOLS, tool_choice="required", max_new_tokens=200))
        text = "".join(r.text for r in responses)
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
        _check_call(_call(responses))
    finally:
        engine.manifest = plain


@pytest.mark.parametrize("tools, choice, message", [
    ([], "auto", "non-empty list"),
    ([{"type": "function", "function": {"parameters": {}}}], "auto", "function.name must be"),
    (TOOLS + TOOLS[:1], "auto", "unique"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "nope"),
])
def test_bad_tools(tool_engine, tools, choice, message):
    with pytest.raises(ValueError, match=message):
        tool_engine.chat([{"role": "user", "content": "x"}], tools=tools, tool_choice=choice)


@pytest.mark.slow
def test_real_model_tool_call(smollm2_engine):
    responses = list(smollm2_engine.chat([{"role": "user", "content": "What is 2 plus 3?"}], tools=TOOLS,
                                         tool_choice="required", max_new_tokens=100))
    call = _call(responses)
    _check_call(call)
    assert call == {"name": "add", "arguments": {"a": 2, "b": 3}}


@pytest.mark.parametrize("text, wrapped, call", [
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', True, ("add", {"a": 1, "b": 2})),
    # tags that are special tokens (Qwen2.5's) are dropped by decoding: the bare call still parses
    ('{"name": "add", "arguments": {"a": 1, "b": 2}}', True, ("add", {"a": 1, "b": 2})),
    ('{"name": "f", "arguments": {}}', False, ("f", {})),
    ("The answer is 3.", False, None),
    ('{"name": "add", "argum', False, None),  # cut short by max tokens
])
def test_parse_tool_calls(text, wrapped, call):
    from edgerun.runtime.tools import parse_tool_calls

    calls = parse_tool_calls(text, wrapped)
    if call is None:
        assert calls is None
    else:
        (got,) = calls
        assert (got["function"]["name"], json.loads(got["function"]["arguments"])) == call


def test_llamacpp_backend_constrained_and_speculative(tiny_fp32):
    """The same constraint on llama.cpp: answers validate, and lookup leaves greedy output unchanged."""
    engine = edgerun.Engine(tiny_fp32, max_context=128, backend="llamacpp")
    for _, schema in SCHEMAS[:6]:
        fmt = schema_format(schema, compact=True)
        plain = list(engine.generate("the quick brown fox", max_new_tokens=100, response_format=fmt))
        jsonschema.validate(json.loads("".join(r.text for r in plain)), schema)
        spec = list(engine.generate("the quick brown fox", max_new_tokens=100, response_format=fmt,
                                    speculative="lookup"))
        assert [r.token for r in spec] == [r.token for r in plain]


def test_structured_bench_runs(tool_engine, tmp_path):
    """bench/structured.py end to end on a tiny model: its report has every figure it prints."""
    from edgerun.bench import structured

    report = structured.main([str(tool_engine.package_dir), "--prompts", "2", "--rounds", "1", "--max-tokens", "24",
                              "--threads", "1", "--tokenizer", str(tool_engine.package_dir / "tokenizer.json"),
                              "--json", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["prompts"] and len(saved["grammar_cost"]) == 2
    for row in report["prompts"]:
        assert row["plain"]["tokens"] == row["constrained"]["tokens"]
    assert all(g["us_per_token"] > 0 for g in report["grammar_cost"])


def test_self_speculation_under_a_grammar_is_lossless(tmp_path):
    """self:K drafts with the target's first layers; under a grammar its drafts are cut where the
    grammar forbids them and forced tokens are taken at verification: the same tokens as without."""
    export(build_tiny_llama(tmp_path / "hf", seed=3, initializer_range=0.2), tmp_path / "pkg",
           ExportOptions(stage_boundaries=(2,), separate_head=True))
    engine = edgerun.Engine(tmp_path / "pkg", max_context=256)
    for _, schema in SCHEMAS[:8]:
        fmt = schema_format(schema, compact=True)
        plain = [r.token for r in engine.generate("the quick brown fox", max_new_tokens=100, response_format=fmt)]
        spec = [r.token for r in engine.generate("the quick brown fox", max_new_tokens=100, response_format=fmt,
                                                 speculative="self:2", draft_tokens=3)]
        assert spec == plain
        jsonschema.validate(json.loads(engine.decode(plain)), schema)


def test_quantized_constrained_speculation_equals_the_invariant_reference(tmp_path):
    """int4 weights: constrained lookup speculation (exact by default) equals constrained decoding on a
    batch-invariant engine."""
    export(build_tiny_llama(tmp_path / "hf", seed=3, initializer_range=0.2), tmp_path / "int4",
           ExportOptions(quant="int4"))
    engine = edgerun.Engine(tmp_path / "int4", max_context=256)
    reference = edgerun.Engine(tmp_path / "int4", max_context=256, batch_invariant=True)
    for _, schema in SCHEMAS[:6]:
        fmt = schema_format(schema, compact=True)
        expected = [r.token for r in reference.generate("the quick brown fox", max_new_tokens=100,
                                                        response_format=fmt)]
        got = [r.token for r in engine.generate("the quick brown fox", max_new_tokens=100, response_format=fmt,
                                                speculative="lookup")]
        assert got == expected
