"""Stage 4: every method side by side, the decision, the data-size curve, the report.

``run(cfg)`` is the stage; ``results`` loads heads and runs, ``report`` writes the
tables, ``plots`` the figures, ``curve`` the data-size curve."""
from ..lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    ".stage": ["NOT_PRETRAINED", "Result", "Row", "CurveReport", "CompareResult", "load_results", "run"],
})
