"""Tool calls: the tools rendered into the prompt, the call constrained to their schemas, parsed back.

A chat template that knows tools (it reads a `tools` variable, as Qwen2.5's does) renders them
itself, and a template that wraps calls in `<tool_call>` tags (the Hermes / Qwen convention) gets
its calls in those tags. A template without tools gets the fallback: a system message that lists
the tools as JSON and asks for a bare JSON object `{"name": ..., "arguments": {...}}`; earlier
calls and tool results in `messages` are rewritten as plain assistant / user turns for it.

Whatever the format, the call is decoded under a grammar: the name is one of the tools' and the
arguments match that tool's parameter schema (with no undeclared arguments unless the schema sets
`additionalProperties`). One call per turn.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

# blanks in a call's JSON: a few (a call is read by a program; a small model can loop on blanks)
CALL_JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x09]{0,8}"}

HERMES_OPEN, HERMES_CLOSE = "<tool_call>\n", "\n</tool_call>"
FALLBACK_SYSTEM = ("You can call functions. The functions are, as JSON:\n{tools}\nTo call one, reply with only a "
                   "JSON object {{\"name\": <function name>, \"arguments\": <its arguments object>}}; otherwise "
                   "answer in plain text.")


@dataclass(frozen=True)
class ToolPlan:
    """How one chat turn with tools is prompted, constrained and parsed.

    Attributes:
        messages: the messages to render (rewritten for a template without tools).
        template_tools: the tools to pass to the chat template (None: the template does not take them).
        response_format: the grammar of the answer (a Lark grammar embedding the call's JSON schema),
            or None when tool_choice is "none".
        wrapped: calls come in <tool_call> tags.
    """

    messages: list[dict]
    template_tools: list[dict] | None
    response_format: dict | None
    wrapped: bool


def _functions(tools: Any) -> list[dict]:
    """The function definitions of OpenAI-style `tools`, checked.

    Raises:
        ValueError: naming the tool and the field that is wrong.
    """
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    functions = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict):
            raise ValueError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                             f"\"parameters\": {{...}}}}}}")
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append({**function, "parameters": parameters})
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return functions


def _arguments(parameters: dict) -> dict:
    """A tool's parameter schema as its call is constrained: no arguments it does not declare (unless
    the schema says otherwise), since the function could not take them."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def _call_schema(functions: list[dict]) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": _arguments(f["parameters"])},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def plan(messages: list[dict], tools: Any, tool_choice: Any, template_takes_tools: bool,
         template_wraps_calls: bool) -> ToolPlan:
    """The prompt, grammar and call format of a chat turn with `tools`.

    Args:
        tool_choice: "auto" (a call or a plain answer), "required" (a call), "none" (no call), or
            {"type": "function", "function": {"name": NAME}} (a call of that tool).
    Raises:
        ValueError: bad tools or tool_choice, naming the field.
    """
    functions = _functions(tools)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools "
                             f"{[f['name'] for f in functions]}")
        functions, mode = chosen, "required"
    elif tool_choice in ("auto", "required", "none"):
        mode = tool_choice
    else:
        raise ValueError(f"tool_choice must be \"auto\", \"required\", \"none\" or {{\"type\": \"function\", "
                         f"\"function\": {{\"name\": ...}}}}, got {tool_choice!r}")
    wrapped = template_takes_tools and template_wraps_calls
    if template_takes_tools:
        rendered, template_tools = list(messages), [{"type": "function", "function": f} for f in functions]
    else:
        rendered, template_tools = _fallback_messages(messages, functions), None
    if mode == "none":
        return ToolPlan(rendered, template_tools, None, wrapped)
    call = f"%json {json.dumps({**_call_schema(functions), 'x-guidance': CALL_JSON_OPTIONS})}"
    if wrapped:
        call_rule = f'call: "{_lark_escape(HERMES_OPEN)}" json "{_lark_escape(HERMES_CLOSE)}"\njson: {call}'
        text_rule = "TEXT: /[^<{](.|\\n)*/"  # a plain answer does not begin like a call
    else:
        call_rule = f"call: {call}"
        text_rule = "TEXT: /[^{](.|\\n)*/"
    start = "start: call" if mode == "required" else f"start: call | TEXT\n{text_rule}"
    return ToolPlan(rendered, template_tools, {"type": "grammar", "lark": f"{start}\n{call_rule}\n"}, wrapped)


def _lark_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _fallback_messages(messages: list[dict], functions: list[dict]) -> list[dict]:
    """`messages` for a template without tools: the tools in the system message, earlier calls as
    JSON assistant turns, tool results as user turns."""
    listing = json.dumps([{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in functions])
    system = FALLBACK_SYSTEM.format(tools=listing)
    out: list[dict] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(json.dumps(c) for c in calls)})
        elif role == "tool":
            out.append({"role": "user", "content": f"Function result: {content}"})
        else:
            out.append({"role": role, "content": content})
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def parse_tool_calls(text: str, wrapped: bool) -> list[dict] | None:
    """OpenAI-shaped tool_calls of a constrained answer ([{"id", "type": "function", "function":
    {"name", "arguments": JSON string}}]), or None when the answer is plain text."""
    body = text.strip()
    if wrapped:  # the tags may be special tokens, which decoding drops
        body = body.removeprefix(HERMES_OPEN.strip()).strip()
        body = body.removesuffix(HERMES_CLOSE.strip()).strip()
    if not body.startswith("{"):
        return None
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None  # cut short (max tokens): no call to hand back
    if not isinstance(call, dict) or "name" not in call:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}))}}]
