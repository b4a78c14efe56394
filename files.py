"""Writing files whole or not at all: to a temporary name beside the target, renamed when complete,
so a process killed half-way leaves only a `.partial` file, never a report or plot taken for whole."""
from __future__ import annotations

from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` (UTF-8) through `<name>.partial`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def save_figure_atomic(fig, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure to `path` (format from its suffix, png by default) through `<name>.partial`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    tmp.replace(path)
