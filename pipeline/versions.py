"""The package's version, and the versions of the libraries a saved result was made with.

A leaf module (standard library only): any module may import it without a cycle.
"""
from __future__ import annotations

import importlib
import platform
from typing import Dict

__all__ = ["__version__", "TORCH_STACK", "library_versions"]

__version__ = "0.1.0"

# The libraries behind a feature cache or a trained network, in the order records list them.
TORCH_STACK = ("torch", "torchvision", "timm", "numpy", "h5py", "sklearn")


def library_versions(*names: str) -> Dict[str, str]:
    """``{name: version}`` in the order given: ``python``, ``pipeline`` or an importable module.

    A module that is not installed (an optional extra) is left out.
    """
    out: Dict[str, str] = {}
    for name in names:
        if name == "python":
            out[name] = platform.python_version()
        elif name == "pipeline":
            out[name] = __version__
        else:
            try:
                out[name] = importlib.import_module(name).__version__
            except ImportError:
                continue
    return out
