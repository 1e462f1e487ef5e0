"""What ``predict`` returns, with either engine (a saved head, or an exported ONNX model):
one class and probability per image, rendered as a table, CSV or JSON."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import List

from ..text import format_table

__all__ = ["PredictResult"]


@dataclass
class PredictResult:
    """Per image: ``{"path", "class", "probability"}`` (probability None when the head has none)."""

    head: str
    classes: List[str]
    pretrained: bool
    predictions: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)  # {"path", "error"}

    def render(self, fmt: str = "table") -> str:
        if fmt == "json":
            return json.dumps({"head": self.head, "classes": self.classes, "pretrained": self.pretrained,
                               "predictions": self.predictions, "skipped": self.skipped}, indent=2)
        if fmt == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["path", "class", "probability", "error"])
            for p in self.predictions:
                writer.writerow([p["path"], p["class"], "" if p["probability"] is None else f"{p['probability']:.6f}", ""])
            for s in self.skipped:
                writer.writerow([s["path"], "", "", s["error"]])
            return buf.getvalue().rstrip("\n")
        return self._table()

    def _table(self) -> str:
        lines = [f"head {self.head}" + ("" if self.pretrained else " (not pretrained: random backbone weights)")]
        rows = [(p["path"], p["class"], "-" if p["probability"] is None else f"{p['probability']:.3f}")
                for p in self.predictions]
        lines.append(format_table(("path", "class", "probability"), rows))
        if self.predictions and self.predictions[0]["probability"] is None:
            lines.append("  (this head gives no probabilities; logistic and sgd_log do)")
        lines.append(f"  {len(self.predictions)} classified, {len(self.skipped)} skipped")
        for s in self.skipped:
            lines.append(f"  skipped {s['path']}: {s['error']}")
        return "\n".join(lines)
