"""Seeded mutations of hostile input for tests/test_fuzz.py, and the worker process that feeds them to edge-run.

    python tests/fuzz_worker.py KIND CASES.json WORKDIR

runs every case of one kind and prints `start N` before case N and a JSON line `[N, outcome, message]`
after it: outcome "ok" (a valid result), "error" (a clean error: PackageError, ValueError or
jinja2.TemplateError) or "bad" (anything else, with the last line of its traceback). A crash or a
hang of the process leaves a `start N` without its result, which names the case. Everything a case
writes goes under WORKDIR. Mutations are functions of (input, seed), so each case reproduces.
"""
from __future__ import annotations

import copy
import json
import random
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# -- mutations ---------------------------------------------------------------------------------------
INTS = (0, 1, 2, 3, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1)
FLOATS = (float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e30)
HOSTILE_JSON = (None, True, False, 0, -1, 1, 7, 2**31, 2**40, 2**64, -2**63, 1e308, 0.5, -0.0, "", "x", "abc",
                "../../../../etc/passwd", "/etc/passwd", "stage0.onnx", [], {}, [1, 2], [-1], {"a": 1},
                "ä€😀", "x" * 5000, [[[[[[[[[[]]]]]]]]]])
TOML_VALUES = ("-1", "0", "1", "32", "3.5", "1e400", "nan", "inf", '"x"', '""', "[]", "{}", "true",
               "99999999999999999999999", '"../../etc/passwd"', '"int3"', '"float32"', '[1, "a"]', "{ a = 1 }")
TEMPLATE_FRAGMENTS = ("{{", "}}", "{%", "%}", "{% endfor %}", "{% endif %}", "{% if %}", "{{ messages }}",
                      "{{ messages[0]['content'] * 100000000 }}", "{{ raise_exception('no') }}",
                      "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ 1 / 0 }}", "{{ 10 ** 10 ** 10 }}",
                      "{{ range(10 ** 9) | list }}", "{% for m in messages %}", "{{ m['role'] + 1 }}",
                      "{{ bos_token * 999999999 }}", "{% set x = x %}",
                      "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                      "{{ messages | map(attribute='__class__') | list }}", "{{ undefined.attr.attr }}", "\x00", "\n")


def gguf_layout(path: Path) -> list[list[tuple[int, int, str, str]]]:
    """The numeric parts of every metadata field and tensor-table entry of a GGUF: for each field a
    list of (offset, size, numpy dtype, field name); a field's last part is its value."""
    import gguf

    reader = gguf.GGUFReader(path)
    base = reader.data.ctypes.data
    fields = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        parts = [(int(p.ctypes.data - base), int(p.nbytes), p.dtype.str, field.name)
                 for p in field.parts[:12] if p.dtype.kind in "uifb" and p.nbytes in (1, 2, 4, 8)]
        if parts:
            fields.append(parts)
    return fields


def mutate_gguf(data: bytes, layout: list, seed: int, kinds: tuple[str, ...] = (),
                fields: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """One seeded mutation of a GGUF file: a value, a length, type or count, header bytes, random
    bytes, or a truncation; `fields` limits value and part mutations to fields whose names start so.
    Returns (mutated bytes, what was done)."""
    rng = random.Random(seed)
    out = bytearray(data)
    kind = rng.choice(kinds or ("value", "value", "value", "part", "part", "header", "flip", "truncate"))
    if kind in ("value", "part", "header"):
        chosen = [f for f in layout if f[0][3].startswith(fields)] if fields else layout
        parts = layout[rng.randrange(3)] if kind == "header" else rng.choice(chosen)
        offset, size, dtype, name = parts[-1] if kind == "value" else rng.choice(parts)
        if dtype[1] == "f":
            value = rng.choice(FLOATS)
            out[offset:offset + size] = np.array(value, dtype=dtype).tobytes()
        else:
            current = int.from_bytes(out[offset:offset + size], "little")
            value = rng.choice((*INTS, current + 1, max(current - 1, 0), current * 2, len(data))) % (1 << 8 * size)
            out[offset:offset + size] = value.to_bytes(size, "little")
        return bytes(out), f"{name}: {size}-byte {kind} at {offset} set to {value}"
    if kind == "flip":
        spots = sorted(rng.randrange(min(len(out), 16384)) for _ in range(rng.randint(1, 16)))
        for spot in spots:
            out[spot] = rng.randrange(256)
        return bytes(out), f"random bytes at {spots}"
    cut = rng.randrange(len(out))
    return bytes(out[:cut]), f"truncated to {cut} bytes"


def set_part(data: bytes, offset: int, size: int, value: int) -> bytes:
    """`data` with the unsigned integer of `size` bytes at `offset` set to `value`."""
    return data[:offset] + (value % (1 << 8 * size)).to_bytes(size, "little") + data[offset + size:]


def mutate_json(value: Any, seed: int, steps: int | None = None) -> tuple[Any, str]:
    """Seeded structural mutations of a JSON document: a field replaced by a hostile value, deleted,
    retyped, or an unknown one added. Shallow fields are the likeliest (a random descent that
    stops at each level with probability 0.35)."""
    rng = random.Random(seed)
    root = {"": copy.deepcopy(value)}
    done = []
    for _ in range(steps or rng.choice((1, 1, 1, 2, 3))):
        parent, key = root, ""
        while isinstance(parent[key], (dict, list)) and parent[key] and (key == "" or rng.random() > 0.35):
            node = parent[key]
            parent, key = node, rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        op = rng.choice(("replace", "replace", "replace", "delete", "add", "retype"))
        if op == "delete" and key != "":
            del parent[key]
        elif op == "add" and isinstance(parent[key], dict):
            parent[key]["unexpected_key"] = rng.choice(HOSTILE_JSON)
        elif op == "add" and isinstance(parent[key], list):
            parent[key].append(rng.choice(HOSTILE_JSON))
        elif op == "retype":
            old = parent[key]
            parent[key] = str(old) if not isinstance(old, str) else (int(old) if old.isdigit() else [old])
        else:
            parent[key] = copy.deepcopy(rng.choice(HOSTILE_JSON))
        done.append(f"{op} {key!r}")
    return root[""], ", ".join(done)


def mutate_text(text: str, seed: int, fragments: tuple[str, ...] = ()) -> tuple[str, str]:
    """Seeded edits of a text: a truncation, a span deleted or repeated, a fragment inserted, a character changed."""
    rng = random.Random(seed)
    op = rng.choice(("truncate", "delete", "repeat", "insert", "insert", "char") if fragments else
                    ("truncate", "delete", "repeat", "char", "char"))
    at = rng.randrange(len(text) + 1)
    span = rng.randint(1, 40)
    if op == "truncate":
        return text[:at], f"truncated at {at}"
    if op == "delete":
        return text[:at] + text[at + span:], f"deleted {span} at {at}"
    if op == "repeat":
        return text[:at + span] + text[at:at + span] * rng.randint(2, 4) + text[at + span:], f"repeated {span} at {at}"
    if op == "insert":
        piece = rng.choice(fragments)
        return text[:at] + piece + text[at:], f"inserted {piece!r} at {at}"
    char = rng.choice('{}[]",:\\0-9eE\x00\n ') if rng.random() < 0.8 else chr(rng.randrange(0x20, 0x2000))
    return text[:at] + char + text[at + 1:], f"set {char!r} at {at}"


def mutate_toml(text: str, seed: int) -> tuple[str, str]:
    """Seeded edits of a TOML file: a value replaced by a hostile literal, a line deleted or
    repeated (a duplicate key), or a text edit."""
    rng = random.Random(seed)
    lines = text.splitlines()
    assigned = [k for k, line in enumerate(lines) if re.match(r"\s*[\w.-]+\s*=", line)]
    op = rng.choice(("value", "value", "value", "delete", "repeat", "text"))
    if op == "text" or not assigned:
        return mutate_text(text, seed)
    k = rng.choice(assigned)
    if op == "value":
        literal = rng.choice(TOML_VALUES)
        lines[k] = re.sub(r"=.*", f"= {literal}", lines[k], count=1)
        return "\n".join(lines) + "\n", f"line {k + 1} set to {literal}"
    if op == "delete":
        return "\n".join(lines[:k] + lines[k + 1:]) + "\n", f"line {k + 1} deleted"
    return "\n".join(lines[:k + 1] + lines[k:]) + "\n", f"line {k + 1} repeated"


# -- the worker ----------------------------------------------------------------------------------------
def _clean_errors() -> tuple[type[BaseException], ...]:
    from jinja2 import TemplateError

    from edgerun.runtime.manifest import PackageError

    return PackageError, ValueError, TemplateError


def _run_gguf(case: dict, workdir: Path) -> None:
    from edgerun.export.checkpoint import load_checkpoint

    path = workdir / "case.gguf"
    source = case["source"]
    if source not in _LAYOUTS:
        _SOURCE[source], _LAYOUTS[source] = Path(source).read_bytes(), gguf_layout(Path(source))
    data, layout = _SOURCE[source], _LAYOUTS[source]
    path.write_bytes(set_part(data, *case["edit"]) if "edit" in case else mutate_gguf(data, layout, case["seed"])[0])
    load_checkpoint(path, weights=False)
    load_checkpoint(path, weights=True)


def _package(workdir: Path, source: str) -> Path:
    """A private copy of the package `source` under workdir (made once)."""
    folder = workdir / "package"
    if not folder.exists():
        shutil.copytree(source, folder)
    return folder


def _run_package(case: dict, workdir: Path) -> None:
    from edgerun.runtime.engine import Engine

    folder = _package(workdir, case["package"])
    (folder / "manifest.json").write_text(case["manifest"])
    engine = Engine(folder, max_context=64, threads=1)
    if engine.manifest.chat_template:
        engine.apply_chat_template([{"role": "user", "content": "hi"}])
    for _ in engine.generate("hi", max_new_tokens=2):
        pass


def _run_tokenizer(case: dict, workdir: Path) -> None:
    from edgerun.runtime.text import read_tokenizer
    from edgerun.runtime.textstream import TextStream

    folder = _package(workdir, case["package"])
    (folder / "tokenizer.json").write_text(case["tokenizer"])
    tokenizer = read_tokenizer(folder, "tokenizer.json", case["vocab_size"])
    ids = tokenizer.encode("hello wörld, the quick brown fox 123").ids
    stream = TextStream(tokenizer)
    "".join(stream.push(i) for i in ids)
    tokenizer.decode(ids)


def _run_template(case: dict, workdir: Path) -> None:
    from edgerun.runtime.text import render_chat_template

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    render_chat_template(case["template"], messages, "<s>", "</s>")


def _run_recipe(case: dict, workdir: Path) -> None:
    from edgerun.quant.recipe import load_recipe

    path = workdir / f"recipe{case['suffix']}"
    path.write_text(case["text"])
    recipe = load_recipe(path, case["target"])
    for rule in recipe.resolve(case["names"]).values():
        rule.make_format()


RUNNERS = {"gguf": _run_gguf, "package": _run_package, "tokenizer": _run_tokenizer, "template": _run_template,
           "recipe": _run_recipe}
_SOURCE: dict[str, bytes] = {}  # GGUF path -> its bytes and layout, read once per worker
_LAYOUTS: dict[str, list] = {}
# warnings Python hides by default; any other one would print on stderr next to a one-line error
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def main(kind: str, cases_file: str, workdir: str) -> None:
    import logging
    import warnings

    logging.disable(logging.WARNING)  # logged warnings go where the app sends its log, not to the terminal
    clean = _clean_errors()
    cases = json.loads(Path(cases_file).read_text())
    for n, case in enumerate(cases):
        print(f"start {n}", flush=True)
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")
            try:
                RUNNERS[kind](case, Path(workdir))
                outcome, message = "ok", ""
            except clean as e:
                outcome, message = "error", str(e)
            except BaseException as e:  # noqa: BLE001  (whatever else escapes is what the fuzzing looks for)
                outcome, message = "bad", traceback.format_exception_only(type(e), e)[-1].strip()
        printed = [w for w in shown if not issubclass(w.category, _HIDDEN)]
        if printed:
            outcome, message = "bad", f"printed a warning: {printed[0].category.__name__}: {printed[0].message}"
        print(json.dumps([n, outcome, message]), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
