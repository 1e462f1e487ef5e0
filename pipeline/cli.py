"""``python -m pipeline <stage>``: parse options, call one stage function, map errors to exit codes.

Exit codes: 0 success; 2 a user error (one line, no traceback unless ``--debug``); 1 a bug;
130 interrupted (rerun to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
from typing import Callable, Dict, List, Optional

from . import config
from .errors import UserError

__all__ = ["main", "get_args_parser"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


SEED_RANGE = (0, 2 ** 32 - 1)  # what NumPy and scikit-learn accept as a random_state
_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def integer(text: str) -> int:
    """An option's integer: beyond 64 bits it would overflow torch, NumPy or the OS, so it is refused."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not _INT64[0] <= value <= _INT64[1]:
        raise argparse.ArgumentTypeError(f"{text} is out of range (a 64-bit integer)")
    return value


def seed(text: str) -> int:
    value = integer(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range; use {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    return value


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
        p.add_argument("--seed", type=seed, default=defaults.seed,
                       help=f"random seed, {SEED_RANGE[0]} to {SEED_RANGE[1]} (default: %(default)s)")
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
    p.add_argument("--batch-size", type=integer, default=d.batch_size, help="images per forward pass; 0: automatic")
    p.add_argument("--workers", type=integer, default=d.workers, help="data-loading processes; -1: automatic")
    p.add_argument("--views", type=integer, default=d.views, help="augmented passes stored per train image")
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


# OSErrors that the machine causes, not this program, with the user's fix: exit 2 like a user error.
_SPACE = "free some space or pass --cache DIR on another disk, then rerun the same command (finished work is kept)"
_WRITABLE = "pass --cache DIR pointing at a folder you can write (or fix its permissions), then rerun the same command"
_FOLDER = "a part of that path is a file, not a folder; pass --cache DIR naming a folder"
_ENVIRONMENT_ERRORS = {
    errno.ENOSPC: _SPACE, errno.EDQUOT: _SPACE, errno.EFBIG: _SPACE,
    errno.EACCES: _WRITABLE, errno.EPERM: _WRITABLE, errno.EROFS: _WRITABLE,
    errno.ENOTDIR: _FOLDER, errno.EEXIST: _FOLDER, errno.EISDIR: "that path is a folder; name a file",
    errno.ENAMETOOLONG: "use a shorter path", errno.EIO: "check the disk, then rerun the same command",
}


def _environment_error(exc: OSError, args: Optional[argparse.Namespace]) -> Optional[str]:
    """One line for an OSError of the environment (full disk, read-only folder...), else None.

    A disk that fills up mid-write names no file, so the output folder of the stage is named.
    """
    hint = _ENVIRONMENT_ERRORS.get(exc.errno)
    if hint is None:
        return None
    where = exc.filename or (getattr(args, "reports", None) if getattr(args, "stage", "") == "compare"
                             else getattr(args, "cache", None))
    if getattr(args, "stage", "") == "compare":
        hint = hint.replace("--cache DIR", "--reports DIR")
    place = f" ({where!r})" if where else ""
    return f"{os.strerror(exc.errno).lower()}{place}; {hint}"


def _print_error(line: str) -> None:
    """``line`` on stderr, whatever the stream accepts: undecodable bytes of a command line
    (surrogates) and letters the encoding lacks are shown as escapes rather than crash."""
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(f"error: {line}".encode(encoding, "backslashreplace").decode(encoding), file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = None
    try:
        args = get_args_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        args.handler(args)
        return EXIT_OK
    except UserError as exc:
        if debug:
            raise
        _print_error(str(exc))
        return EXIT_USER
    except OSError as exc:
        line = None if debug else _environment_error(exc, args)
        if line is None:
            raise
        _print_error(line)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        return EXIT_INTERRUPTED
