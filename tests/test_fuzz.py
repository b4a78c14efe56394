"""Fuzzing every reader of hostile input: GGUF files (our reader, and llama.cpp through `edge-run run`),
manifests, tokenizer.json, chat templates and quantization recipes (JSON and TOML).

Each case must end in a clean error (a PackageError / ValueError / jinja2 TemplateError of one line,
or the CLI's one `edge-run: error:` line) or a valid result; never another exception, a warning on
stderr, a crash of the interpreter, a hang past its timeout, or a file written outside its place.
Cases run in worker processes (tests/fuzz_worker.py), so a crash or hang fails the test and names
the case instead of taking pytest down. Mutations are seeded and counts fixed (Hypothesis runs
derandomized), so every failure reproduces; one that once failed stays as an explicit regression
test in tests/test_malformed.py. The README's "Reliability" section gives the count and the time.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fuzz_worker import (
    INTS,
    TEMPLATE_FRAGMENTS,
    gguf_layout,
    mutate_gguf,
    mutate_json,
    mutate_text,
    mutate_toml,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgerun.quant.recipe import GGUF_PRESETS, PRESETS, Recipe
from edgerun.runtime.manifest import Manifest, PackageError

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fuzz_worker.py")
pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("home")]  # a private edge-run cache (conftest)

# cases per input kind (the README's "Reliability" table quotes these)
GGUF_READER_CASES = 200  # seeded mutations; plus a sweep of every metadata value over BOUNDARY_VALUES
BOUNDARY_VALUES = (0, 1, 2**31, 2**32 - 1, 2**64 - 1)
LLAMACPP_CASES = 12
MANIFEST_CASES = 100
TOKENIZER_CASES = 80
TEMPLATE_CASES = 150
RECIPE_CASES = 150
HYPOTHESIS_EXAMPLES = 200
FUZZ = settings(max_examples=HYPOTHESIS_EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# a realistic template (ChatML, as SmolLM2's) besides the tiny package's own
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QUANT_NAMES = ["embed", "lm_head", *(f"layers.{i}.{p}" for i in range(2)
                                     for p in ("q", "k", "v", "o", "gate", "up", "down"))]


# -- running cases in a worker -------------------------------------------------------------------------
def run_worker(kind: str, cases: list[dict], tmp_path: Path, timeout: float = 240) -> list[tuple[str, str]]:
    """Run `cases` in one worker process; returns (outcome, message) per case.

    Fails the test, naming the case, when the worker dies or hangs, or when a case writes into the
    worker's working directory.
    """
    workdir, cwd = tmp_path / f"{kind}-work", tmp_path / f"{kind}-cwd"
    workdir.mkdir()
    cwd.mkdir()
    cases_file = tmp_path / f"{kind}-cases.json"
    cases_file.write_text(json.dumps(cases))
    cmd = [sys.executable, str(WORKER), kind, str(cases_file), str(workdir)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        stdout, stderr, status = result.stdout, result.stderr, f"died (exit {result.returncode})"
    except subprocess.TimeoutExpired as e:
        stdout, stderr, status = _text(e.stdout), _text(e.stderr), f"hung (over {timeout} s)"
    outcomes: dict[int, tuple[str, str]] = {}
    started = None
    for line in stdout.splitlines():
        if line.startswith("start "):
            started = int(line.split()[1])
        elif line.startswith("["):
            n, outcome, message = json.loads(line)
            outcomes[n] = (outcome, message)
    if len(outcomes) < len(cases):
        case = cases[started] if started is not None else None
        pytest.fail(f"the {kind} worker {status} on case {started}: {describe(kind, case)}\n{stderr[-2000:]}")
    assert not any(cwd.iterdir()), f"{kind} cases wrote into the working folder: {list(cwd.iterdir())}"
    return [outcomes[n] for n in range(len(cases))]


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def describe(kind: str, case: dict | None) -> str:
    """What a case did (a GGUF case's mutation is recomputed from its seed)."""
    if case is None:
        return "before the first case"
    if kind == "gguf" and "seed" in case:
        source = Path(case["source"])
        return f"seed {case['seed']}: " + mutate_gguf(source.read_bytes(), gguf_layout(source), case["seed"])[1]
    return case.get("desc") or json.dumps(case)[:300]


def assert_clean(kind: str, cases: list[dict], outcomes: list[tuple[str, str]], names: str | None = None) -> Counter:
    """Every outcome is a valid result or a clean one-line error (naming `names`, when given)."""
    problems = []
    for case, (outcome, message) in zip(cases, outcomes):
        if outcome == "bad":
            problems.append(f"{describe(kind, case)} -> {message}")
        elif outcome == "error" and (not message.strip() or "\n" in message.strip()):
            problems.append(f"{describe(kind, case)} -> not one line: {message!r}")
        elif outcome == "error" and names and names not in message:
            problems.append(f"{describe(kind, case)} -> does not name {names}: {message}")
    assert not problems, f"{len(problems)} of {len(cases)} {kind} cases:\n" + "\n".join(problems[:20])
    counts = Counter(outcome for outcome, _ in outcomes)
    return counts


@pytest.fixture(scope="module")
def tiny_gguf(tiny_fp32) -> Path:
    return tiny_fp32 / "model.gguf"


# -- GGUF ------------------------------------------------------------------------------------------------
def test_gguf_mutations_through_our_reader(tiny_gguf, tmp_path):
    """Header, metadata and tensor-table mutations through export.checkpoint.load_checkpoint (metadata
    only, as a llama.cpp package reads it, then with weights, as an export does)."""
    cases = [{"source": str(tiny_gguf), "seed": seed} for seed in range(GGUF_READER_CASES)]
    for field in gguf_layout(tiny_gguf):
        offset, size, _, name = field[-1]
        cases += [{"source": str(tiny_gguf), "edit": [offset, size, value], "desc": f"{name} set to {value}"}
                  for value in BOUNDARY_VALUES if size >= 4 and not name.startswith(("blk.", "token_embd", "output"))]
    counts = assert_clean("gguf", cases, run_worker("gguf", cases, tmp_path))
    assert counts["error"] > len(cases) / 3 and counts["ok"] > 0, counts  # the mutations reach both ends


def test_gguf_mutations_through_llamacpp(tiny_gguf, tmp_path, home):
    """`edge-run run FILE hi -n 2` on GGUFs whose tensor table or model metadata is mutated (what our
    reader takes on trust and llama.cpp's C code parses): one line of error or a generation, never a
    crash of llama.cpp (a signal), a hang, or a file written beside the GGUF or outside the cache."""
    data, layout = tiny_gguf.read_bytes(), gguf_layout(tiny_gguf)
    cases = []
    for seed in range(LLAMACPP_CASES):
        blob, desc = mutate_gguf(data, layout, seed, kinds=("value", "part"),
                                 fields=("blk.", "token_embd", "output", "llama."))
        folder = tmp_path / f"case{seed}"
        folder.mkdir()
        (folder / "m.gguf").write_bytes(blob)
        cases.append((folder / "m.gguf", f"seed {seed}: {desc}"))

    def run(case: tuple[Path, str]) -> str | None:
        path, desc = case
        cmd = [sys.executable, "-m", "edgerun", "run", str(path), "hi", "-n", "2"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=90, cwd=path.parent)
        except subprocess.TimeoutExpired:
            return f"{desc}: hung"
        lines = result.stderr.splitlines()
        if result.returncode == 0:  # the run's summary lines
            ok = bool(lines) and lines[0].startswith("[prompt ") and all(line.startswith("[") for line in lines)
        else:
            ok = result.returncode == 1 and len(lines) == 1 and lines[0].startswith("edge-run: error: ")
        written = sorted(p.name for p in path.parent.iterdir() if p != path)
        if not ok or written:
            return f"{desc}: exit {result.returncode}, stderr {result.stderr[-600:]!r}, wrote {written}"
        return None

    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(run, cases) if p]
    assert not problems, "\n".join(problems)
    outside = [p for p in home.rglob("*") if p.is_file() and "packages" not in p.relative_to(home).parts]
    assert not outside, outside


# -- manifests --------------------------------------------------------------------------------------------
def test_manifest_mutations_load_or_refuse(tiny_fp32, tmp_path):
    """Mutated manifest.json files (structure and text) through Engine: load, chat template, two tokens."""
    text = (tiny_fp32 / "manifest.json").read_text()
    manifest = json.loads(text)
    cases = []
    for seed in range(MANIFEST_CASES):
        if seed % 4 == 3:
            mutated, desc = mutate_text(text, seed)
        else:
            data, desc = mutate_json(manifest, seed)
            mutated = json.dumps(data)
        cases.append({"package": str(tiny_fp32), "manifest": mutated, "desc": f"seed {seed}: {desc}"})
    counts = assert_clean("package", cases, run_worker("package", cases, tmp_path),
                          names=str(tmp_path / "package-work" / "package"))
    assert counts["error"] > 0 and counts["ok"] > 0, counts


def _set_path(data: dict, path: tuple, value):
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


_MANIFEST_FIELDS = [("model", f) for f in ("architecture", "vocab_size", "hidden_size", "num_layers", "num_heads",
                                           "num_kv_heads", "head_dim", "rms_norm_eps", "rope_theta",
                                           "context_length", "tie_embeddings")] + \
    [(f,) for f in ("stages", "weights", "tokenizer", "bos_token_id", "eos_token_ids", "add_bos_token",
                    "chat_template", "source", "kept_layers", "gguf", "exits", "quantization", "extra")] + \
    [("stages", 0, f) for f in ("file", "first_layer", "end_layer", "embeds", "has_head")]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.sampled_from(INTS) | st.floats()
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=6)


@FUZZ
@given(field=st.sampled_from(_MANIFEST_FIELDS), value=JSON_VALUES)
def test_manifest_fields_take_any_json(tiny_fp32, field, value):
    """Any JSON value in any manifest field: a manifest, or a PackageError naming the file and the field."""
    data = _set_path(json.loads((tiny_fp32 / "manifest.json").read_text()), field, value)
    try:
        Manifest.from_dict(data, "m.json")
    except PackageError as e:
        message = str(e)
        assert message.startswith("m.json: ") and "\n" not in message, message


# -- tokenizer.json and chat templates ----------------------------------------------------------------------
def test_tokenizer_json_mutations(tiny_fp32, tmp_path):
    text = (tiny_fp32 / "tokenizer.json").read_text()
    data = json.loads(text)
    vocab_size = json.loads((tiny_fp32 / "manifest.json").read_text())["model"]["vocab_size"]
    cases = []
    for seed in range(TOKENIZER_CASES):
        mutated, desc = mutate_text(text, seed) if seed % 3 == 2 else \
            (lambda m: (json.dumps(m[0]), m[1]))(mutate_json(data, seed))
        cases.append({"package": str(tiny_fp32), "tokenizer": mutated, "vocab_size": vocab_size,
                      "desc": f"seed {seed}: {desc}"})
    counts = assert_clean("tokenizer", cases, run_worker("tokenizer", cases, tmp_path), names="tokenizer.json")
    assert counts["error"] > 0 and counts["ok"] > 0, counts


def test_chat_template_mutations(tiny_fp32, tmp_path):
    """Edits of real templates (and hostile fragments: memory bombs, recursion, escapes from the sandbox)."""
    templates = [json.loads((tiny_fp32 / "manifest.json").read_text())["chat_template"], CHATML]
    cases = []
    for seed in range(TEMPLATE_CASES):
        template, done = templates[seed % 2], []
        for step in range(1 + seed % 3):
            template, desc = mutate_text(template, seed * 7 + step, TEMPLATE_FRAGMENTS)
            done.append(desc)
        cases.append({"template": template, "desc": f"seed {seed}: {', '.join(done)}"})
    counts = assert_clean("template", cases, run_worker("template", cases, tmp_path, timeout=120))
    assert counts["error"] > 0 and counts["ok"] > 0, counts


# -- quantization recipes ----------------------------------------------------------------------------------
def test_recipe_mutations(tmp_path):
    """Recipe files (the bench's JSON and TOML recipes, the presets written out) mutated, loaded and resolved."""
    jsons = [p.read_text() for p in sorted((REPO / "bench" / "recipes").glob("*.json"))]
    jsons += [json.dumps(r) for r in (*PRESETS.values(), *GGUF_PRESETS.values())]
    tomls = [p.read_text() for p in sorted((REPO / "bench" / "recipes").glob("*.toml"))]
    cases = []
    for seed in range(RECIPE_CASES):
        target = ("onnx", "gguf")[seed % 2]
        if seed % 3 == 0 and tomls:
            text, desc = mutate_toml(tomls[seed % len(tomls)], seed)
            cases.append({"text": text, "suffix": ".toml", "target": target, "names": QUANT_NAMES, "desc": desc})
            continue
        base = jsons[seed % len(jsons)]
        text, desc = mutate_text(base, seed) if seed % 3 == 1 else \
            (lambda m: (json.dumps(m[0]), m[1]))(mutate_json(json.loads(base), seed))
        cases.append({"text": text, "suffix": ".json", "target": target, "names": QUANT_NAMES,
                      "desc": f"seed {seed}: {desc}"})
    counts = assert_clean("recipe", cases, run_worker("recipe", cases, tmp_path, timeout=120), names="recipe")
    assert counts["error"] > 0 and counts["ok"] > 0, counts


RECIPE_KEYS = ["name", "method", "default", "rules", "calibration", "format", "block_size", "scale_dtype",
               "pattern", "fallback", "gguf_type", "sequences", "tokens", "damp", "act_order", "seed", "data"]


@FUZZ
@given(data=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(
    ["int4_asym", "int8_block", "ternary", "float32", "gptq", "rtn", "embed", "layers.*.q", "TQ2_0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(RECIPE_KEYS), inner, max_size=5),
    max_leaves=12))
def test_recipe_dicts_take_any_json(data):
    """Any JSON shape built from recipe keys: a Recipe that resolves, or a one-line ValueError."""
    try:
        recipe = Recipe.from_dict(data)
        for rule in recipe.resolve(QUANT_NAMES).values():
            rule.make_format()
    except ValueError as e:
        assert str(e) and "\n" not in str(e), str(e)


# -- the server: any JSON body a local process may send --------------------------------------------
REQUEST_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n",
                "response_format", "tools", "tool_choice", "role", "content", "type", "json_schema", "schema",
                "pattern", "lark", "function", "name", "parameters", "include_usage", "ignore_eos", "echo"]
SERVER_CASES = 120
_LEAF = (st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=False, allow_infinity=False, width=32)
         | st.sampled_from(["tiny", "user", "assistant", "tool", "the fox", "json_schema", "json_object", "regex",
                            "grammar", "text", "function", "auto", "required", "a(b", "[0-9]+", "start: \"x\"",
                            "object", "integer", ""]))
REQUEST_BODIES = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.sampled_from(REQUEST_KEYS), inner, max_size=6), max_leaves=16)


@pytest.fixture(scope="module")
def fuzz_client(tiny_fp32):
    from fastapi.testclient import TestClient

    import edgerun
    from edgerun.server import ServeOptions, create_app

    engine = edgerun.Engine(tiny_fp32, max_context=64, threads=1)
    app = create_app(lambda: engine, ServeOptions(model_id="tiny", max_batch=2, max_body_bytes=16 << 10))
    with TestClient(app, raise_server_exceptions=False) as client:
        import time

        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        yield client


VALID = {"/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "the fox"}],
                                  "max_tokens": 4},
         "/v1/completions": {"model": "tiny", "prompt": "the fox", "max_tokens": 4}}
FORMATS = st.sampled_from([{"type": "json_object"}, {"type": "regex", "pattern": "[0-9]{2}"},
                           {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
                           {"type": "grammar", "lark": "start: \"x\""}])
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}}}


@settings(max_examples=SERVER_CASES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(sorted(VALID)), anything=st.booleans(), body=REQUEST_BODIES,
       changes=st.dictionaries(st.sampled_from(REQUEST_KEYS), REQUEST_BODIES | FORMATS
                               | st.just([TOOL]) | st.just([{"role": "tool", "content": "1"}]), max_size=3))
def test_server_requests_take_any_json(fuzz_client, route, anything, body, changes):
    """Any JSON body (`anything`), or a valid request with up to three fields replaced by any JSON
    (biased to the API's own keys, values, formats and tools): a result, or a 4xx with OpenAI's
    error body; never a 500 or a traceback."""
    if not anything:
        body = {**VALID[route], **changes}
    r = fuzz_client.post(route, json=body)
    assert r.status_code in (200, 400, 404, 413, 422), (body, r.status_code, r.text)
    assert "Traceback" not in r.text
    if r.status_code != 200:
        error = r.json()["error"]
        assert error["message"] and "\n" not in error["message"], error
    elif not (isinstance(body, dict) and body.get("stream")):
        assert r.json()["choices"], r.text
