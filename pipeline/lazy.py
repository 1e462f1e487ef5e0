"""Package attributes imported on first use (PEP 562).

A stage package names its public API in its ``__init__`` without importing it, so that
``import pipeline.features.uptodate`` or ``python -m pipeline --help`` never pays for torch.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Dict, Iterable, Tuple

__all__ = ["lazy_exports"]


def lazy_exports(package: str, modules: Dict[str, Iterable[str]]) -> Tuple[Callable, Callable, list]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for ``package``, exporting ``names`` of each
    submodule in ``modules`` (``{".stage": ["run", ...]}``) on first access."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        module = where.get(name)
        if module is not None:
            return getattr(importlib.import_module(module, package), name)
        if importlib.util.find_spec(f"{package}.{name}") is not None:  # a submodule not imported yet
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(where)

    return __getattr__, __dir__, sorted(where)
