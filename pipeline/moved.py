"""Module paths of the flat layout (before the stage packages), kept importable.

Pickles name the module of every class they hold: a user's pipeline pickled with
``pipeline.sklearn_api.ResNet18Features`` in it, or code that imports ``pipeline.store``,
keeps working. The old name is an alias of the new module (the same module object).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED", "install"]

# old module -> new module (modules that became packages, e.g. pipeline.heads, need no alias)
MOVED = {
    "pipeline.images": "pipeline.data.images",
    "pipeline.splits": "pipeline.data.splits",
    "pipeline.backbone": "pipeline.backbones.network",
    "pipeline.extraction": "pipeline.features.extraction",
    "pipeline.store": "pipeline.features.store",
    "pipeline.uptodate": "pipeline.features.uptodate",
    "pipeline.onnx_engine": "pipeline.features.onnx_engine",
    "pipeline.heads_cv": "pipeline.heads.cv",
    "pipeline.heads_io": "pipeline.heads.saved",
    "pipeline.heads_stream": "pipeline.heads.stream",
    "pipeline.sklearn_api": "pipeline.heads.sklearn_api",
    "pipeline.finetune_data": "pipeline.finetune.loaders",
    "pipeline.checkpoints": "pipeline.finetune.checkpoints",
    "pipeline.finetune_result": "pipeline.finetune.result",
    "pipeline.compare_data": "pipeline.compare.results",
    "pipeline.compare_report": "pipeline.compare.report",
    "pipeline.curve": "pipeline.compare.curve",
    "pipeline.plots": "pipeline.compare.plots",
    "pipeline.predict": "pipeline.export.predict",
    "pipeline.onnx_client": "pipeline.export.client",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def __init__(self):
        self._specs = {}

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        self._specs[spec.name] = module.__spec__  # the import system overwrites it with ``spec``
        return module

    def exec_module(self, module):
        # The new module is already executed: bind the old name to it, and give it back its own spec.
        old = module.__spec__.name
        module.__spec__ = self._specs.pop(old)
        sys.modules[old] = module


_FINDER = _Alias()


def install() -> None:
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
