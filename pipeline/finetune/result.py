"""What a ``finetune`` call returns and prints: one :class:`RunResult` per run (its record, the
content of ``metrics.json``) and the :class:`FinetuneResult` of all seeds."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Tuple

import numpy as np

from ..records import RunRecord

__all__ = ["RunResult", "FinetuneResult", "BEST_VAL_NOTE"]

BEST_VAL_NOTE = "best epoch on val: chosen on val, optimistic"


@dataclass
class RunResult:
    """One finished run (one mode, one seed) and its record, the content of metrics.json."""

    name: str
    path: str
    record: RunRecord
    resumed_from: int = 0  # epochs taken over from an interrupted or shorter run
    up_to_date: bool = False  # nothing trained: a complete run with these settings existed

    @property
    def metrics(self) -> dict:
        """metrics.json as JSON (``record.to_json()``)."""
        return self.record.to_json()

    @property
    def accuracy(self) -> float:
        return self.metrics["metrics"]["accuracy"]

    def summary(self) -> str:
        m = self.metrics
        acc = m["metrics"]
        low, high = acc["accuracy_ci95"]
        label = "" if m["pretrained"] else " (not pretrained)"
        sel = m["selection"]
        chosen = (f"final epoch {sel['selected_epoch']} of {m['epochs']}" if sel["rule"] == "final" else
                  f"epoch {sel['selected_epoch']} of {m['epochs']}, chosen on {sel['holdout_n']} held-out "
                  f"train images ({sel['fraction']:g})")
        subset = f", {m['train_per_class']} train images per class" if m.get("train_per_class") else ""
        lines = [f"run {m['name']:<14} {self.path}",
                 f"  mode           {m['mode']}, seed {m['seed']}, weights {m['weights_id']}{label}{subset}",
                 f"  val acc        {acc['accuracy']:.4f} [95% CI {low:.3f}-{high:.3f}] ({chosen}); "
                 f"balanced {acc['balanced_accuracy']:.4f}",
                 f"  best val epoch {m['best_val_epoch']}: {m['best_val_acc']:.4f} ({BEST_VAL_NOTE}; not the result)"]
        if self.up_to_date:
            lines.append("  up to date     a complete run with these settings exists: nothing trained")
        else:
            per_epoch = sum(m["epoch_seconds"]) / max(1, len(m["epoch_seconds"]))
            resumed = f"; resumed after epoch {self.resumed_from}" if self.resumed_from else ""
            n = m["config"].get("threads")
            threads = f" ({n} thread{'s' if n != 1 else ''})" if m["device"] == "cpu" and n else ""
            lines.append(f"  time           {m['total_seconds']:.1f} s ({per_epoch:.2f} s/epoch, "
                         f"{m['images_per_s']:.1f} train images/s) on {m['device']}{threads}, {m['precision']}{resumed}")
        lines.append(f"  parameters     {m['trainable_parameters']:,} trainable of {m['total_parameters']:,}")
        if not m["pretrained"]:
            lines.append("  NOTE           not pretrained (random init): not a transfer-learning result")
        return "\n".join(lines)


@dataclass
class FinetuneResult:
    """Every run of one ``finetune`` call (several with ``--seeds``) and the skipped images."""

    runs: List[RunResult]
    skipped: List[dict] = field(default_factory=list)
    primary: bool = True  # False on the ranks other than 0 of a torchrun launch, which report nothing

    def accuracy_mean_std(self) -> Tuple[float, float]:
        accs = np.array([r.accuracy for r in self.runs])
        return float(accs.mean()), float(accs.std(ddof=1)) if len(accs) > 1 else 0.0

    def summary(self) -> str:
        lines = [r.summary() for r in self.runs]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} undecodable image(s):")
            lines.extend(f"  {s['path']}: {s['reason']}" for s in self.skipped)
        if len(self.runs) > 1:
            mean, std = self.accuracy_mean_std()
            mode = self.runs[0].metrics["mode"]
            lines.append(f"{mode}: val accuracy {mean:.4f} ± {std:.4f} "
                         f"(mean ± std over seeds {', '.join(str(r.metrics['seed']) for r in self.runs)})")
        return "\n".join(lines)
