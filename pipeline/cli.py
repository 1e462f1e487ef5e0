"""``python -m pipeline <stage>``: parse options, call one stage function, map errors to exit codes.

Exit codes: 0 success; 2 a user error (one line, no traceback unless ``--debug``); 1 a bug;
130 interrupted (rerun to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable, Dict, List, Optional

from . import config
from .errors import UserError

__all__ = ["main", "get_args_parser"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as a UserError (exit 2, one line) like every other input."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see --help")


def _common(p: argparse.ArgumentParser, defaults, *, device: bool = True, weights: bool = True) -> None:
    p.add_argument("--data", default=defaults.data, metavar="DIR",
                   help="image folder with train/<class>/ and val/<class>/ (default: %(default)s)")
    p.add_argument("--cache", default=defaults.cache, metavar="DIR", help="cache folder (default: %(default)s)")
    if weights:
        p.add_argument("--weights", default=defaults.weights,
                       help="imagenet | random | PATH of a state_dict (default: %(default)s)")
        p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    if device:
        p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N (default: %(default)s)")
        p.add_argument("--precision", default=defaults.precision,
                       help="auto | fp32 | bf16 | fp16; auto is fp32 on CPU, bf16 on CUDA (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="discard existing results for these settings first")


def _add_features(sub) -> None:
    d = config.FeaturesConfig()
    p = sub.add_parser("features", help="extract frozen ResNet18 features into the HDF5 cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p, d)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per forward pass; 0: automatic")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes; -1: automatic")
    p.add_argument("--views", type=int, default=d.views, help="augmented passes stored per train image")
    p.add_argument("--strict", action="store_true", help="an undecodable image is fatal instead of skipped")
    p.add_argument("--no-draft", dest="draft", action="store_false", help="decode large JPEGs at full resolution")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a rank waits for the others before giving up")
    p.set_defaults(handler=_run_features)


def _run_features(args) -> None:
    from . import features

    result = features.run(_config(config.FeaturesConfig, args))
    if result.primary:  # under torchrun, rank 0 alone reports
        print(result.summary())


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what a feature cache holds")
    p.add_argument("path", metavar="CACHE", help="a cache/features/*.h5 file")
    p.set_defaults(handler=_run_info)


def _run_info(args) -> None:
    from . import store

    print(store.describe(args.path))


def _config(cls, args):
    """Build a stage config from the parsed options whose names match its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# Stages register here; each adds its own sub-parser (``add(sub)``).
STAGES: Dict[str, Callable] = {"features": _add_features, "info": _add_info}


def _register_optional_stages() -> None:
    """Stages living in their own cli_* modules add themselves when present."""
    import importlib

    for module in ("heads", "finetune", "compare", "predict"):
        try:
            mod = importlib.import_module(f".cli_{module}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.cli_{module}":
                raise
            continue
        STAGES[module] = mod.add_parser


def get_args_parser() -> argparse.ArgumentParser:
    _register_optional_stages()
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", parser_class=_Parser)
    sub.required = True
    for add in STAGES.values():
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = get_args_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        args.handler(args)
        return EXIT_OK
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
