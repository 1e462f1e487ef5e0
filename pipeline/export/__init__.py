"""Export any result as one ONNX image classifier; predict with a saved head or model.

``run(cfg)`` is the export; ``predict`` the predict stage, ``client`` the ONNX Runtime
classifier."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".stage": ["Folded", "fold_head", "exportable_heads", "ExportResult", "run", "export_dir", "FORMAT"],
})
