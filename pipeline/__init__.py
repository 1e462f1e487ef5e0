"""Feature-cache transfer learning: a frozen ResNet18 runs once, classical heads train in seconds.

``pipeline.load_head`` and ``pipeline.ResNet18Features`` are imported on first use, so
``import pipeline`` stays cheap (no torch, no scikit-learn).
"""
from . import moved
from .versions import __version__

moved.install()

__all__ = ["__version__", "load_head", "ResNet18Features"]


def __getattr__(name):
    if name == "load_head":
        from .heads.stage import load_head

        return load_head
    if name == "ResNet18Features":
        from .heads.sklearn_api import ResNet18Features

        return ResNet18Features
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + ["load_head", "ResNet18Features"])
