"""The text side of a package, read with care: its tokenizer file and its chat template.

Both come with the package, from anyone: a tokenizer that cannot work is refused at load with the
file named, and a template runs sandboxed, bounded, and fails only with a `jinja2.TemplateError`.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .manifest import PackageError, package_file

MAX_TEMPLATE_VALUE = 1 << 22  # items a chat template may make with `*`, bits a power may hold


def render_chat_template(template: str, messages: list[dict], bos_token: str, eos_token: str,
                         add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
    """Render a Hugging Face chat template (jinja2 sandbox, with `raise_exception`, as HF does).

    A template comes with the package, from anyone: the sandbox keeps it from Python's internals,
    `*` and `**` are bounded (`MAX_TEMPLATE_VALUE`) so it cannot exhaust memory, and whatever it
    raises becomes a `jinja2.TemplateError`. `tools` (OpenAI-style function tools) reach templates
    that read a `tools` variable.
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # only chat needs jinja2

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            _check_template_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        extra = {"tools": tools} if tools is not None else {}
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError:
        raise
    except Exception as e:  # noqa: BLE001  (a template evaluates arbitrary expressions: any error is its own)
        raise TemplateError(f"{type(e).__name__}: {e}") from None


def template_takes_tools(template: str) -> bool:
    """Whether a chat template reads a `tools` variable (renders tool definitions itself)."""
    from jinja2 import TemplateSyntaxError, meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        return "tools" in meta.find_undeclared_variables(ImmutableSandboxedEnvironment().parse(template))
    except TemplateSyntaxError:
        return False  # rendering it will report the error


def _check_template_binop(operator: str, left, right) -> None:
    """Refuse `sequence * n` and `a ** b` whose result would be huge (a template's memory bomb)."""
    from jinja2.exceptions import SecurityError

    if operator == "*":
        sizes = [len(x) for x in (left, right) if isinstance(x, (str, list, tuple))]
        counts = [x for x in (left, right) if isinstance(x, int)]
        if sizes and counts and sizes[0] * max(counts[0], 0) > MAX_TEMPLATE_VALUE:
            raise SecurityError(f"the template repeats a sequence of {sizes[0]} items {counts[0]} times")
    elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
            right * max(abs(left).bit_length(), 1) > MAX_TEMPLATE_VALUE:
        raise SecurityError(f"the template raises {left} to the power {right}")


_TOKENIZER_PROBE = "Hello wörld 123, the quick brown fox!\n\t 😀 <s></s>"


def read_tokenizer(package_dir: Path, name: str, vocab_size: int) -> Tokenizer:
    """The package's tokenizer file (checked to lie inside the package, its ids to fit the model's
    vocabulary), or a PackageError naming it."""
    path = package_file(package_dir, name, "tokenizer")
    if not path.is_file():
        raise PackageError(f"package {package_dir} lacks {name}; re-export it")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        # a model section that loads but cannot work (e.g. a subword prefix longer than its tokens)
        # fails on the first text; found here, not in the middle of a generation
        tokenizer.decode(tokenizer.encode(_TOKENIZER_PROBE).ids)
    except BaseException as e:  # noqa: B036  (tokenizers raises bare Exceptions, and a Rust panic: a BaseException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise PackageError(f"{path} is not a valid tokenizer file ({reason}); re-export the package") from None
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
    if top >= vocab_size:  # the model would be asked for a row its embedding lacks
        raise PackageError(f"{path} holds token id {top}, past the model's {vocab_size} tokens; re-export the package")
    return tokenizer


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
