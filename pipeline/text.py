"""How results are written for people: one table formatter, one duration formatter."""
from __future__ import annotations

from typing import Sequence

__all__ = ["format_table", "format_duration"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, markdown: bool = False,
                 rule: bool = False, indent: str = "  ") -> str:
    """Columns aligned to their widest cell.

    ``markdown``: ``| a | b |`` rows under a ``|---|`` rule, valid Markdown and readable as plain
    text. Otherwise each row is ``indent`` plus cells two spaces apart (no trailing blanks), with
    a dashed rule under the header when ``rule``.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    if markdown:
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        under = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        line = lambda r: (indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip()  # noqa: E731
        under = indent + "  ".join("-" * w for w in widths) if rule else None
    lines = [line(cells[0])] + ([under] if under is not None else []) + [line(r) for r in cells[1:]]
    return "\n".join(lines)


# (unit, seconds per unit, shown up to this many seconds)
_UNITS = (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 2 * 86400), ("d", 86400, float("inf")))


def format_duration(seconds: float, compact: bool = False) -> str:
    """``830 ms``, ``12.3 s``, ``4.5 min``, ``2.0 h``, ``3.0 d``: the unit that keeps the number small.

    ``compact`` drops a trailing ``.0`` (axis labels: ``2 s``, ``30 min``).
    """
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    unit, size = next((u, s) for u, s, upto in _UNITS if seconds < upto)
    number = f"{seconds / size:.1f}"
    if compact and number.endswith(".0"):
        number = number[:-2]
    return f"{number} {unit}"
