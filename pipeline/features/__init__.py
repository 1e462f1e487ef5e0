"""Stage 1: the frozen backbone runs once; features are cached in HDF5.

``run(cfg)`` is the stage; ``extraction`` the engine, ``store`` the HDF5 layout,
``uptodate`` the rerun stamp, ``onnx_engine`` the ONNX Runtime engine."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".stage": ["FeaturesResult", "Plan", "run", "resolve", "prepare", "find_cache", "share"],
})
