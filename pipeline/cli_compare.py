"""``python -m pipeline compare``: the results table, figures and significance marks."""
from __future__ import annotations

import sys
import warnings

from . import config

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    d = config.CompareConfig()
    p = sub.add_parser(
        "compare", help="put every head and end-to-end run side by side (table, figures, significance)",
        description="Read cache/heads/*.json and cache/runs/*/metrics.json, write reports/compare.md "
                    "(table + figures), compare.csv and compare.json, and print the table.")
    p.add_argument("--cache", default=d.cache, metavar="DIR",
                   help="cache folder holding heads/ and runs/ (default: %(default)s)")
    p.add_argument("--reports", default=d.reports, metavar="DIR",
                   help="where the report and its figures go (default: %(default)s)")
    p.add_argument("--data", default=d.data, metavar="DIR",
                   help="compare only results measured on this data folder; results from any other "
                        "are listed apart (default: the data folder most results share)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="significance level of the exact McNemar test against the best method "
                        "(default: %(default)s)")
    p.set_defaults(handler=_run)


def _run(args) -> None:
    from . import cli, compare

    with warnings.catch_warnings():
        # Skipped or excluded results are news for the user: one plain line each on stderr.
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show
        result = compare.run(cli._config(config.CompareConfig, args))
    print(result.summary())


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
