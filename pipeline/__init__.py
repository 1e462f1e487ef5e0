"""Feature-cache transfer learning: a frozen backbone runs once, classical heads train in seconds.

``pipeline.load_head``, ``pipeline.BackboneFeatures`` and ``pipeline.ResNet18Features`` are
imported on first use, so ``import pipeline`` stays cheap (no torch, no scikit-learn).
"""
from . import moved
from .lazy import lazy_exports
from .versions import __version__

moved.install()

__getattr__, __dir__, _exported = lazy_exports(__name__, {
    ".heads.saved": ["load_head"],
    ".heads.sklearn_api": ["BackboneFeatures", "ResNet18Features"],
})
__all__ = ["__version__"] + _exported
