"""``python -m pipeline predict --head NAME IMAGE_OR_DIR…``: classify new images with a saved head."""
from __future__ import annotations

import argparse
import sys

from . import config

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from . import cli

    d = config.PredictConfig()
    p = sub.add_parser("predict", help="classify images with a saved head",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Class and probability per image; folders are searched recursively. "
                                   "Files that cannot be decoded are reported and skipped.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--head", required=True, metavar="NAME",
                   help="a head name under <cache>/heads/ (e.g. logistic), or the path of its .json or model file")
    p.add_argument("--cache", default=d.cache, metavar="DIR", help="cache folder holding heads/")
    p.add_argument("--weights", default=d.weights,
                   help="backbone weights (imagenet | random | PATH); default: those the head was fitted on")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=cli.integer, default=d.batch_size, help="images per forward pass; 0: automatic")
    p.add_argument("--format", choices=("table", "csv", "json"), default=d.format, help="output format")
    p.set_defaults(handler=_run)


def _run(args) -> None:
    from . import cli, predict
    from .errors import UserError

    args.inputs = tuple(args.inputs)
    result = predict.run(cli._config(config.PredictConfig, args))
    print(result.render(args.format))
    if result.skipped and args.format != "table":
        print(f"{len(result.skipped)} file(s) could not be decoded and were skipped (listed in the output)",
              file=sys.stderr)
    if not result.predictions:
        raise UserError(f"none of the {len(result.skipped)} image file(s) could be decoded; nothing was classified")
