"""Stage 2: scikit-learn heads fitted on cached features.

``run(cfg)`` is the stage; ``cv`` the fast cross-validation, ``saved`` saved heads and
``load_head``, ``stream`` out-of-core heads, ``sklearn_api`` the scikit-learn transformer."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".stage": ["HeadSpec", "REGISTRY", "HeadRow", "HeadsResult", "HeadsRun", "Head", "run", "load_head",
               "heads_dir", "parse_head_names", "features_path", "FORMATS"],
    ".sklearn_api": ["BackboneFeatures", "ResNet18Features"],
})
