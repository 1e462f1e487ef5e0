"""``python -m pipeline <stage>``: parse options, call one stage function, map errors to exit codes.

Exit codes: 0 success; 2 a user error (one line, no traceback unless ``--debug``); 1 a bug;
130 interrupted (rerun to resume).

Each stage's module is imported by its handler, not at the top: the stages pull in torch or
scikit-learn (seconds), which ``--help``, a bad option and an up-to-date rerun never need.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import sys
import warnings
from typing import Callable, Dict, List, Optional

from . import config
from .features import uptodate
from .config import SEED_RANGE
from .errors import ParameterError, UserError

__all__ = ["main", "get_args_parser"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

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
    """argparse that reports bad options as a UserError (exit 2, one line) like every other input.

    ``flags`` maps each option's config field to the option users type (``batch_size`` ->
    ``--batch-size``), so errors that name a field can name the option instead.
    """

    def __init__(self, *args, **kwargs):
        self.flags: Dict[str, str] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags[action.dest] = action.option_strings[-1] if action.option_strings else action.metavar
        return action

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; see --help")


def _common(p: argparse.ArgumentParser, defaults, *, device: bool = True, weights: bool = True) -> None:
    p.add_argument("--data", default=defaults.data, metavar="DIR",
                   help="image folder with train/<class>/ and val/<class>/ (default: %(default)s)")
    p.add_argument("--cache", default=defaults.cache, metavar="DIR", help="cache folder (default: %(default)s)")
    if weights:
        p.add_argument("--backbone", default=defaults.backbone,
                       help="resnet18 | efficientnet_lite0 (ImageNet weights installed from the package index) | "
                            "torchvision:NAME | timm:NAME (default: %(default)s)")
        p.add_argument("--weights", default=defaults.weights,
                       help="imagenet | random | PATH of a state_dict (default: %(default)s)")
        p.add_argument("--seed", type=seed, default=defaults.seed,
                       help=f"random seed, {SEED_RANGE[0]} to {SEED_RANGE[1]} (default: %(default)s)")
    if device:
        p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N (default: %(default)s)")
        p.add_argument("--precision", default=defaults.precision,
                       help=f"{' | '.join(config.PRECISIONS)}; auto is bf16 where the device computes it "
                            "natively (CUDA compute capability >= 8.0, a CPU with AVX512-BF16 or AMX-BF16), else fp16 on CUDA "
                            "and fp32 on CPU (default: %(default)s)")
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
    p.add_argument("--decode", choices=config.DECODES, default=d.decode,
                   help="who decodes JPEGs: gpu (torchvision.io.decode_jpeg on the CUDA device, nvJPEG), pil, or "
                        "auto (gpu where extraction runs on CUDA, else pil); other formats and what the GPU "
                        "cannot decode always go through PIL")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--engine", default=d.engine, choices=config.ENGINES,
                   help="what runs the forward pass: torch, or onnxruntime (CPU, fp32; pip install -e '.[onnx]')")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a rank waits for the others before giving up")
    p.set_defaults(handler=_run_features)


def _run_features(args) -> None:
    cfg = _config(config.FeaturesConfig, args)
    summary = uptodate.check(cfg)  # an unchanged rerun: answered without torch
    if summary is not None:
        print(summary)
        return
    before = uptodate.snapshot(cfg)
    from . import features

    result = features.run(cfg)
    uptodate.record(cfg, result, before)
    if result.primary:  # under torchrun, rank 0 alone reports
        print(result.summary())


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print what a feature cache holds")
    p.add_argument("path", metavar="CACHE", help="a cache/features/*.h5 file")
    p.set_defaults(handler=_run_info)


def _run_info(args) -> None:
    from .features import store

    print(store.describe(args.path))


def _add_heads(sub) -> None:
    d = config.HeadsConfig()
    p = sub.add_parser(
        "heads", help="fit scikit-learn heads (CV on train, metrics on val) on the cached features",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fit each head as Pipeline(StandardScaler, estimator) on the train features, choose its "
                    "hyper-parameter by stratified k-fold CV on train, report val metrics, and save "
                    "<cache>/heads/<name>.joblib plus a JSON sidecar.")
    _common(p, d)
    p.add_argument("--views", type=integer, default=d.views,
                   help="augmented views per train image of the cache to read (as given to `features`)")
    p.add_argument("--features", default=d.features, metavar="FILE",
                   help="an explicit feature cache file; default: the one `features` makes for these options")
    p.add_argument("--heads", nargs="+", default=list(d.heads), metavar="NAME",
                   help="heads to fit, comma- or space-separated: logistic, linear_svm, ridge (the default "
                        "suite), sgd_log, sgd_hinge (--out-of-core's default), knn, nearest_centroid, or all")
    p.add_argument("--use-views", action="store_true", help="train on the cached augmented views too")
    p.add_argument("--cv-folds", type=integer, default=d.cv_folds, help="stratified CV folds on train")
    p.add_argument("--out-of-core", action="store_true",
                   help="train the SGD heads by streaming HDF5 chunks into partial_fit")
    p.add_argument("--chunk-rows", type=integer, default=d.chunk_rows,
                   help="rows per partial_fit step (out-of-core)")
    p.add_argument("--epochs", type=integer, default=d.epochs, help="passes over train (out-of-core)")
    p.add_argument("--jobs", type=integer, default=d.jobs, help="CV folds fitted in parallel threads")
    p.add_argument("--format", choices=config.HEAD_FORMATS, default=d.format,
                   help="model file format; skops loads without running arbitrary code (needs skops)")
    p.set_defaults(handler=_run_heads)


def _run_heads(args) -> None:
    from . import heads

    args.heads = heads.parse_head_names(args.heads)
    result = heads.run(_config(config.HeadsConfig, args))
    print(result.summary())


def _seeds(text: str) -> tuple:
    """``--seeds 0,1,2``: one or more seeds, each in :data:`SEED_RANGE`."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed, e.g. 0,1,2")
    return tuple(seed(str(s)) for s in seeds)


def _add_finetune(sub) -> None:
    d = config.FinetuneConfig()
    p = sub.add_parser(
        "finetune", help=f"train ResNet18 end to end: {' | '.join(config.MODES)}",
        description="End-to-end training with the reference protocol's defaults; outputs in "
                    "CACHE/runs/<run>/ (model.pt: the reported model; last.pt, history.json, metrics.json). "
                    "An interrupted run resumes from last.pt when rerun with the same settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common(p, d)
    p.add_argument("--mode", default=d.mode,
                   help="finetune: all layers from --weights; scratch: all layers from a seeded random "
                        "init (ignores --weights); fixed: frozen backbone, fc only; partial: freeze the "
                        "layers before --trainable-from")
    p.add_argument("--trainable-from", default=d.trainable_from, metavar="LAYER",
                   help=f"partial mode: first trainable stage, {' | '.join(config.TRAINABLE_FROM)}")
    p.add_argument("--bn", default=d.bn,
                   help="frozen-eval: frozen layers' BatchNorm stays in eval mode (running statistics "
                        "fixed); train: the tutorial's model.train() everywhere (statistics drift)")
    p.add_argument("--epochs", type=integer, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=integer, default=d.batch_size, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")
    p.add_argument("--step-size", type=integer, default=d.step_size, help="StepLR: epochs between lr drops")
    p.add_argument("--gamma", type=float, default=d.gamma, help="StepLR: lr factor at each drop")
    p.add_argument("--seeds", type=_seeds, default=d.seeds, metavar="S1,S2,...",
                   help="run once per seed (directories <mode>-<seed>) and report mean ± std; overrides --seed")
    p.add_argument("--select", default=d.select, metavar="RULE",
                   help="which epoch's model is the result, never chosen on val: final (the fixed schedule's "
                        "last epoch) or holdout:F (best epoch on a stratified, seeded fraction F of train, "
                        "held out from training), e.g. holdout:0.2")
    p.add_argument("--train-per-class", type=integer, default=d.train_per_class, metavar="K",
                   help="train on K seeded images per class (a point of the data-size curve; seed S trains on "
                        "the curve's subset S of that K); 0: all")
    p.add_argument("--eval-every", type=integer, default=d.eval_every, metavar="N",
                   help="val pass every N epochs during training, for the learning curves and the best-val "
                        "column (timed apart, not charged as training); 0: the final epoch only")
    p.add_argument("--workers", type=integer, default=d.workers, help="data-loading processes; -1: automatic")
    p.add_argument("--eval-batch-size", type=integer, default=d.eval_batch_size,
                   help="images per pass without gradients (val, holdout, the frozen prefix of fixed/partial "
                        "modes); 0: max(--batch-size, 32 on CPU, 256 on CUDA)")
    p.add_argument("--threads", type=integer, default=d.threads,
                   help="CPU threads for the network; 0: torch's default, one per physical core "
                        "(fewer leaves cores to others on a shared machine)")
    p.add_argument("--strict", action="store_true", help="an undecodable image is fatal instead of skipped")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory format")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar or epoch lines")
    p.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                   help="under torchrun: seconds a rank waits for the others before giving up")
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args) -> None:
    from . import finetune

    result = finetune.run(_config(config.FinetuneConfig, args))
    if result.primary:  # under torchrun, rank 0 alone reports
        print(result.summary())


def _add_compare(sub) -> None:
    d = config.CompareConfig()
    p = sub.add_parser(
        "compare", help="put every head and end-to-end run side by side (table, figures, significance)",
        description="Read cache/heads/*.json and cache/runs/*/metrics.json, write reports/compare/compare.md "
                    "(table + figures), compare.csv and compare.json, and print the table.")
    p.add_argument("--cache", default=d.cache, metavar="DIR",
                   help="cache folder holding heads/ and runs/ (default: %(default)s)")
    p.add_argument("--reports", default=d.reports, metavar="DIR",
                   help="where the report and its figures go (default: %(default)s)")
    p.add_argument("--data", default=d.data, metavar="DIR",
                   help="compare only results measured on this data folder; results from any other "
                        "are listed apart (default: the data folder most results share)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help="family-wise significance level of the exact McNemar tests between every pair of "
                        "methods, Holm-corrected (default: %(default)s)")
    p.add_argument("--margin", type=float, default=d.margin,
                   help="non-inferiority margin in accuracy (0.03 = 3 points): the answer is the cheapest method "
                        "whose paired difference to the most accurate has a 95%% CI above -margin "
                        "(default: %(default)s)")
    p.add_argument("--no-curve", dest="curve", action="store_false",
                   help="skip the heads' data-size curve (val accuracy vs labelled images per class)")
    p.add_argument("--no-figures", dest="figures", action="store_false", help="write the report without figures")
    p.add_argument("--backbone", dest="backbones", type=lambda v: tuple(x for x in v.split(",") if x), default=(),
                   metavar="NAME[,NAME…]", help="compare only results of these backbones (default: every backbone "
                                                 "found, side by side)")
    p.set_defaults(handler=_run_compare)


def _run_compare(args) -> None:
    from . import compare

    with warnings.catch_warnings():
        # Skipped or excluded results are news for the user: one plain line each on stderr.
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _show_warning
        result = compare.run(_config(config.CompareConfig, args))
    print(result.summary())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _add_predict(sub) -> None:
    d = config.PredictConfig()
    p = sub.add_parser("predict", help="classify images with a saved head",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Class and probability per image; folders are searched recursively. "
                                   "Files that cannot be decoded are reported and skipped.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--head", metavar="NAME",
                       help="a head name under <cache>/heads/ (e.g. logistic), or the path of its .json or model file")
    which.add_argument("--model", metavar="FILE.onnx",
                       help="a file written by `export`, run with ONNX Runtime (no torch needed)")
    p.add_argument("--cache", default=d.cache, metavar="DIR", help="cache folder holding heads/")
    p.add_argument("--backbone", default=d.backbone,
                   help="the backbone whose head --head names (resnet18, efficientnet_lite0, torchvision:NAME, "
                        "timm:NAME); default: resnet18's head, else the only backbone with that head")
    p.add_argument("--weights", default=d.weights,
                   help="backbone weights (imagenet | random | PATH); default: those the head was fitted on")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=integer, default=d.batch_size, help="images per forward pass; 0: automatic")
    p.add_argument("--format", choices=config.PREDICT_FORMATS, default=d.format, help="output format")
    p.set_defaults(handler=_run_predict)


def _run_predict(args) -> None:
    from .export import predict

    args.inputs = tuple(args.inputs)
    result = predict.run(_config(config.PredictConfig, args))
    print(result.render(args.format))
    if result.skipped and args.format != "table":
        print(f"{len(result.skipped)} file(s) could not be decoded and were skipped (listed in the output)",
              file=sys.stderr)
    if not result.predictions:
        raise UserError(f"none of the {len(result.skipped)} image file(s) could be decoded; nothing was classified")


def _add_export(sub) -> None:
    d = config.ExportConfig()
    p = sub.add_parser("export", help="write a head or a run as one ONNX image classifier",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="One .onnx file (plus a .json sidecar), checked with ONNX Runtime on val images "
                                   "against the source before it gets its name.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--head", metavar="NAME", help="a saved head under <cache>/heads/ (a linear one)")
    which.add_argument("--run", metavar="MODE[-SEED]", help="a finished run under <cache>/runs/")
    which.add_argument("--recommended", action="store_true", help="the method the last `compare` recommends")
    p.add_argument("--reports", default=d.reports, metavar="DIR", help="where `compare` wrote its report")
    p.add_argument("--cache", default=d.cache, metavar="DIR", help="cache folder holding heads/ and runs/")
    p.add_argument("--out", default=d.out, metavar="PATH", help="the .onnx file or a folder; default: <cache>/export/")
    p.add_argument("--backbone", default=d.backbone,
                   help="the backbone whose head or run --head/--run names; default: resnet18's, else the only one")
    p.add_argument("--weights", default=d.weights,
                   help="a head's backbone weights (imagenet | random | PATH); default: those it was fitted on")
    p.add_argument("--sample", type=integer, default=d.sample, help="val images the written file is checked on")
    p.set_defaults(handler=_run_export)


def _run_export(args) -> None:
    from . import export

    print(export.run(_config(config.ExportConfig, args)).summary())


def _config(cls, args):
    """Build a stage config from the parsed options whose names match its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


# Every stage, in the order ``--help`` lists them; each adds its own sub-parser (``add(sub)``).
STAGES: Dict[str, Callable] = {
    "features": _add_features,
    "info": _add_info,
    "heads": _add_heads,
    "finetune": _add_finetune,
    "compare": _add_compare,
    "predict": _add_predict,
    "export": _add_export,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", parser_class=_Parser)
    sub.required = True
    for add in STAGES.values():
        add(sub)
    parser.stages = sub.choices  # stage name -> its parser
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


def _worded_for_the_command_line(exc: UserError, parser: _Parser, args: Optional[argparse.Namespace]) -> str:
    """The error's line; config fields it names become the stage's options (``--batch-size``)."""
    if not isinstance(exc, ParameterError):
        return str(exc)
    flags = parser.stages[args.stage].flags if args is not None else {}
    return exc.render(lambda name: flags.get(name) or "--" + name.replace("_", "-"))


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    args = None
    parser = get_args_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        args.handler(args)
        return EXIT_OK
    except UserError as exc:
        if debug:
            raise
        _print_error(_worded_for_the_command_line(exc, parser, args))
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
