"""Imports go one way, down: cli -> bench / server -> hub -> export -> quant -> runtime -> devices -> base.

A module may import its own layer and those below it, never one above, not even inside a function."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# top-level name under edgerun -> rank; higher ranks may import lower ones
LAYERS = {"version": 0, "console": 0, "data": 0, "files": 0, "devices": 1, "runtime": 2, "quant": 3, "export": 4,
          "hub": 5, "bench": 6, "server": 6, "build": 6, "build_recipe": 6, "cli": 7, "__main__": 7, "__init__": 7}
SHIPPED = ("*.py", "devices/**/*.py", "runtime/**/*.py", "quant/**/*.py", "export/**/*.py", "bench/*.py",
           "data/*.py", "server/*.py")


def _module_parts(path: Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def _imported(path: Path) -> set[tuple[str, ...]]:
    """Absolute edgerun module paths (as tuples below `edgerun`) that `path` imports anywhere."""
    here = _module_parts(path)
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[tuple[str, ...]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {tuple(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "edgerun"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = tuple(base) + tuple(node.module.split(".") if node.module else ())
            elif node.module and node.module.split(".")[0] == "edgerun":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            if target:
                found.add(target)
            else:  # `from . import x` / `from edgerun import x`: the modules named
                found |= {(a.name,) for a in node.names}
    return found


def _layer(parts) -> int:
    return LAYERS[parts[0]] if parts else LAYERS["__init__"]


def test_every_shipped_module_has_a_layer():
    names = {_module_parts(p)[0] for pattern in SHIPPED for p in ROOT.glob(pattern)}
    assert names <= set(LAYERS), f"modules without a layer: {names - set(LAYERS)}"


def test_imports_go_one_way_down():
    upward = []
    for pattern in SHIPPED:
        for path in ROOT.glob(pattern):
            if ".venv" in path.parts or "build" in path.parts:
                continue
            mine = _layer(_module_parts(path))
            for target in _imported(path):
                if _layer(target) > mine:
                    upward.append(f"{path.relative_to(ROOT)} imports edgerun.{'.'.join(target)}")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))
