"""``python -m pipeline heads``: fit classical scikit-learn heads on the cached features."""
from __future__ import annotations

import argparse

from . import config

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from . import cli

    d = config.HeadsConfig()
    p = sub.add_parser(
        "heads", help="fit scikit-learn heads (CV on train, metrics on val) on the cached features",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fit each head as Pipeline(StandardScaler, estimator) on the train features, choose its "
                    "hyper-parameter by stratified k-fold CV on train, report val metrics, and save "
                    "<cache>/heads/<name>.joblib plus a JSON sidecar.")
    cli._common(p, d)
    p.add_argument("--views", type=cli.integer, default=d.views,
                   help="augmented views per train image of the cache to read (as given to `features`)")
    p.add_argument("--features", default=d.features, metavar="FILE",
                   help="an explicit feature cache file; default: the one `features` makes for these options")
    p.add_argument("--heads", nargs="+", default=list(d.heads), metavar="NAME",
                   help="heads to fit, comma- or space-separated: logistic, sgd_log, sgd_hinge, linear_svm, "
                        "ridge, knn, nearest_centroid, or all")
    p.add_argument("--use-views", action="store_true", help="train on the cached augmented views too")
    p.add_argument("--cv-folds", type=cli.integer, default=d.cv_folds, help="stratified CV folds on train")
    p.add_argument("--out-of-core", action="store_true",
                   help="train the SGD heads by streaming HDF5 chunks into partial_fit")
    p.add_argument("--chunk-rows", type=cli.integer, default=d.chunk_rows,
                   help="rows per partial_fit step (out-of-core)")
    p.add_argument("--epochs", type=cli.integer, default=d.epochs, help="passes over train (out-of-core)")
    p.add_argument("--jobs", type=cli.integer, default=d.jobs, help="CV folds fitted in parallel threads")
    p.add_argument("--format", choices=("joblib", "skops"), default=d.format,
                   help="model file format; skops loads without running arbitrary code (needs skops)")
    p.set_defaults(handler=_run)


def _run(args) -> None:
    from . import cli, heads

    args.heads = heads.parse_head_names(args.heads)
    result = heads.run(cli._config(config.HeadsConfig, args))
    print(result.summary())
