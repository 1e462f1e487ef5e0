"""The package layout holds: imports point one way, no import circles, no private name crosses a module.

Layers, bottom to top (docs/architecture.md): the shared modules in ``pipeline/``; ``data``;
``backbones``; ``features``; ``heads`` and ``finetune`` side by side (neither imports the
other); ``compare``; ``export``; the entry points (``cli``, ``__main__``, ``__init__``,
``moved``). A module imports only from its own package or from a lower layer. Every import
counts, function-level ones too: a function-level import hides a circle, it does not remove it.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pipeline

ROOT = Path(pipeline.__file__).parent
LAYERS = {"data": 1, "backbones": 2, "features": 3, "heads": 4, "finetune": 4, "compare": 5, "export": 6}
ENTRY = {"pipeline", "pipeline.cli", "pipeline.__main__", "pipeline.moved"}
TOP = 7


def _modules() -> Dict[str, Path]:
    found = {"pipeline": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="pipeline."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


MODULES = _modules()


def _package(module: str) -> str:
    return module if (MODULES[module].name == "__init__.py") else module.rsplit(".", 1)[0]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module
    base = _package(module).split(".")
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import statement of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("pipeline")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] == "pipeline":
                out += [(target, a.name, node.lineno) for a in node.names]
    return out


def _target(target: str, name: str) -> str:
    """The module an import really reaches: a submodule, the module defining a lazily exported name, or the module."""
    if name and f"{target}.{name}" in MODULES:
        return f"{target}.{name}"
    if name and MODULES[target].name == "__init__.py" and target != "pipeline":
        value = getattr(importlib.import_module(target), name)
        defined = getattr(value, "__module__", None)
        if isinstance(value, types.ModuleType):
            return value.__name__
        if defined in MODULES:
            return defined
    return target


def _graph() -> Dict[str, Set[str]]:
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        for target, name, _ in _imports(module):
            graph[module].add(_target(target, name))
    return graph


def _layer(module: str) -> Tuple[int, str]:
    """(layer, group): imports inside one group are free; across groups they must point down."""
    if module in ENTRY:
        return TOP, "entry points"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS[parts[1]], parts[1]
    return 0, "shared"


def _upward(graph: Dict[str, Set[str]]) -> List[str]:
    wrong = []
    for module, targets in graph.items():
        here, group = _layer(module)
        for target in targets:
            there, other = _layer(target)
            if other != group and not there < here:
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


def _circles(graph: Dict[str, Set[str]]) -> List[str]:
    circles, state = [], {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return circles


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(module: str, source: str) -> List[str]:
    """``from X import _name`` and ``X._name`` (X a project module) in ``source``."""
    tree, used, bound = ast.parse(source), [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("pipeline"):
            target = _resolve(module, node)
            for alias in node.names:
                if _private(alias.name):
                    used.append(f"{module}:{node.lineno} imports {target}.{alias.name}")
                if f"{target}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pipeline") and alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr)):
            used.append(f"{module}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return used


def test_every_import_points_down_the_layers():
    wrong = _upward(_graph())
    assert not wrong, "imports that do not point down the layers:\n" + "\n".join(wrong)


def test_no_import_circles():
    circles = _circles(_graph())
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_private_name_is_used_outside_its_module():
    used = [u for module, path in MODULES.items() for u in _private_uses(module, path.read_text())]
    assert not used, "private names used outside their module:\n" + "\n".join(sorted(used))


def test_the_checks_find_what_they_look_for():
    """Planted faults are found: the checks above are not vacuous."""
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert _upward({"pipeline.data.images": {"pipeline.features.store"},
                    "pipeline.heads.cv": {"pipeline.finetune.loaders"}}) == [
        "pipeline.data.images imports pipeline.features.store", "pipeline.heads.cv imports pipeline.finetune.loaders"]
    planted = "from .images import _walk\nfrom . import images\nimages._hidden()\n"
    assert _private_uses("pipeline.data.imagefolder", planted) == [
        "pipeline.data.imagefolder:1 imports pipeline.data.images._walk",
        "pipeline.data.imagefolder:3 uses pipeline.data.images._hidden"]
