"""The package's layers only point down: every import of a maskdit_fast module (at module level or
inside a function) goes to a module of the same or a lower layer, and no modules import each other
in a circle. A new module must be given a layer here (the README's Layout section and docs/layout.md draw them)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "maskdit_fast"

# Lowest first; a module belongs to the longest prefix listed.
LAYERS: list[tuple[str, ...]] = [
    ("maskdit_fast._version", "maskdit_fast.config", "maskdit_fast.files", "maskdit_fast.errors",
     "maskdit_fast.integrity", "maskdit_fast.safe_pickle"),
    ("maskdit_fast.dist", "maskdit_fast.models", "maskdit_fast.data"),
    ("maskdit_fast.storage", "maskdit_fast.diffusion"),
    ("maskdit_fast.checkpoint", "maskdit_fast.generate"),
    ("maskdit_fast.train", "maskdit_fast.convert", "maskdit_fast.plan"),
    ("maskdit_fast.dydit",),
    ("maskdit_fast.eval",),
    ("maskdit_fast.dydit.__main__", "maskdit_fast.eval.__main__"),
    ("maskdit_fast", "maskdit_fast.cli"),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), rank) for rank, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} has no layer in tests/test_layers.py: give it one")
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = PACKAGE.parent / Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The maskdit_fast modules ``path`` imports (``from a import b`` counts b when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "maskdit_fast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "maskdit_fast":
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")}
    return found - {name}


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward(graph: dict[str, set[str]], module: str) -> list[str]:
    return sorted(t for t in graph[module] if layer_of(t) > layer_of(module))


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target, path + [target])):
                return circle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module, [module])):
            return circle
    return None


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    assert not upward(GRAPH, module), f"{module} (layer {layer_of(module)}) imports from higher layers"


def test_no_import_circle():
    assert find_circle(GRAPH) is None


def test_the_checks_catch_an_upward_import_and_a_circle():
    bad = {"maskdit_fast.checkpoint": {"maskdit_fast.train.trainer", "maskdit_fast.config"},
           "maskdit_fast.train.trainer": {"maskdit_fast.checkpoint"}}
    assert upward(bad, "maskdit_fast.checkpoint") == ["maskdit_fast.train.trainer"]
    assert find_circle(bad) == ["maskdit_fast.checkpoint", "maskdit_fast.train.trainer", "maskdit_fast.checkpoint"]
    assert "maskdit_fast.storage" in GRAPH["maskdit_fast.checkpoint"]  # imports are read, relative ones too
    with pytest.raises(AssertionError, match="has no layer"):
        layer_of("maskdit_fastx.something")
