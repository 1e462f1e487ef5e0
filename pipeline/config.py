"""Every default of the project, in one place.

Each stage takes one frozen dataclass below; the CLI builds it from its options and
``--help`` shows these defaults. Each dataclass checks its values when it is made
(``__post_init__``): a bad one raises :class:`~pipeline.errors.ParameterError` naming the
field, which the CLI words as its option. ``PREPROCESS`` holds the preprocessing facts that
both feature extraction and end-to-end training read.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import ParameterError

__all__ = [
    "PREPROCESS",
    "DEFAULT_DATA_DIR",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_DATA_URL",
    "PRECISIONS",
    "ENGINES",
    "HEAD_FORMATS",
    "MODES",
    "BN_CHOICES",
    "TRAINABLE_FROM",
    "PREDICT_FORMATS",
    "FeaturesConfig",
    "HeadsConfig",
    "FinetuneConfig",
    "CompareConfig",
    "PredictConfig",
    "ParameterError",
    "ExportConfig",
    "ONNX_OPSET",
]

# The reference protocol's preprocessing (PyTorch transfer-learning tutorial): one dict,
# read by data.py's transforms, so the cache and fine-tuning can never disagree.
PREPROCESS = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "resize": 256,
    "crop": 224,
    "interpolation": "bilinear",
    # Training augmentation of the protocol (also used for cached augmented views).
    "train_scale": (0.08, 1.0),
    "train_ratio": (3 / 4, 4 / 3),
    "hflip": 0.5,
}

DEFAULT_DATA_DIR = os.path.join("data", "hymenoptera_data")
DEFAULT_DATA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DEFAULT_CACHE_DIR = "cache"
DEFAULT_BACKBONE = "resnet18"  # the reference protocol's network (pipeline.backbones.registry)
SPLITS = ("train", "val")
# Upper bounds of options that size a resource: beyond them a run only exhausts the machine.
MAX_PARALLEL = 256  # loader processes (--workers), threads (--threads, --jobs)
MAX_VIEWS = 100  # augmented views per train image (--views)
SEED_RANGE = (0, 2 ** 32 - 1)  # what NumPy and scikit-learn accept as a random_state
FLOAT32_MAX = 3.4028234663852886e38  # the optimiser's scalars become float32 tensors

# The accepted values of the options with a fixed set of choices (the CLI's ``choices`` and
# the stages' checks read these).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Who decodes JPEGs for the features stage: auto (torchvision's nvJPEG decode on the GPU when
# extraction runs on CUDA, else PIL), pil, gpu (torchvision.io.decode_jpeg on the CUDA device).
DECODES = ("auto", "pil", "gpu")
ENGINES = ("torch", "onnxruntime")  # what runs the features stage's forward pass (onnxruntime: CPU, fp32)
HEAD_FORMATS = ("joblib", "skops")  # model files of a head
MODES = ("finetune", "scratch", "fixed", "partial")  # end-to-end training modes
BN_CHOICES = ("frozen-eval", "train")
TRAINABLE_FROM = ("layer1", "layer2", "layer3", "layer4")
PREDICT_FORMATS = ("table", "csv", "json")
# The ONNX opset of exported models: the newest that torch.onnx writes and ONNX Runtime runs.
ONNX_OPSET = 23


# --------------------------------------------------------------------------- checks


def _shown(value) -> str:
    """``value`` as text inside a :class:`ParameterError` template (braces escaped)."""
    return str(value).replace("{", "{{").replace("}", "}}")


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _interval(cfg, name: str, low: Optional[float] = None, high: Optional[float] = None, *,
              open_low: bool = False, open_high: bool = False, rule: str = "") -> None:
    """Refuse ``cfg.<name>`` outside ``low``..``high`` (an end excluded when open; NaN is outside).

    The message says the rule broken (``>= 0``, ``at most 100``) unless ``rule`` words both ends.
    """
    value = getattr(cfg, name)
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    if above and below:
        return
    if not rule:
        rule = (f"{'>' if open_low else '>='} {_number(low)}" if not above
                else f"{'below' if open_high else 'at most'} {_number(high)}")
    raise ParameterError(f"{{{name}}} {_shown(value)} must be {_shown(rule)}", name)


def _one_of(cfg, name: str, choices: Sequence[str], hint: str = "", *others: str) -> None:
    """Refuse ``cfg.<name>`` unless it is one of ``choices``; ``hint`` is a template naming ``others``."""
    value = getattr(cfg, name)
    if value not in choices:
        raise ParameterError(f"{{{name}}} {_shown(repr(value))} is not recognised. "
                             f"Only {', '.join(choices)} are supported{hint}.", name, *others)


def _seed(cfg, name: str = "seed") -> None:
    _interval(cfg, name, *SEED_RANGE)


def parse_select(text: str):
    """``"final"`` -> ``("final", 0.0)``; ``"holdout:0.2"`` -> ``("holdout", 0.2)``: which epoch of an
    end-to-end run is its result (never one chosen on val).

    Raises
    ------
    ValueError
        Any other form, or a fraction outside (0, 1).
    """
    if text == "final":
        return "final", 0.0
    rule, _, value = str(text).partition(":")
    if rule == "holdout":
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if 0 < fraction < 1:
            return "holdout", fraction
    raise ValueError(f"{text!r} is not a selection rule. Only final or holdout:F with 0 < F < 1 "
                     "(e.g. holdout:0.2) are supported.")


def _workers(cfg) -> None:
    _interval(cfg, "workers", -1, MAX_PARALLEL, rule=f"between 0 and {MAX_PARALLEL} (or -1 for automatic)")


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class FeaturesConfig:
    """Stage 1: extract frozen ResNet18 features into the HDF5 cache."""

    data: str = DEFAULT_DATA_DIR
    cache: str = DEFAULT_CACHE_DIR
    backbone: str = DEFAULT_BACKBONE  # resnet18 | efficientnet_lite0 | torchvision:NAME | timm:NAME
    weights: str = "imagenet"
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 0  # 0: automatic (32 on CPU, 256 on CUDA)
    workers: int = -1  # -1: automatic (fits the machine's cores)
    views: int = 0  # augmented passes of each train image stored beside the plain features
    seed: int = 0
    strict: bool = False  # an undecodable image is fatal instead of skipped
    draft: bool = True  # decode large JPEGs at reduced scale (DCT draft) when it is safe
    channels_last: bool = True
    engine: str = "torch"  # torch | onnxruntime (CPU, fp32; the [onnx] extra)
    decode: str = "auto"  # auto | pil | gpu: who decodes JPEGs (see DECODES)
    rebuild: bool = False  # discard any existing cache for these settings first
    progress: bool = True
    # Under torchrun: the longest any rank waits for the others at a meeting point (seconds).
    dist_timeout: float = 1800.0

    def __post_init__(self):
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "engine", ENGINES)
        _one_of(self, "decode", DECODES)
        _interval(self, "batch_size", 0)
        _interval(self, "views", 0, MAX_VIEWS)
        _workers(self)
        _interval(self, "dist_timeout", 0, math.inf, open_low=True, open_high=True, rule="> 0 seconds and finite")
        _seed(self)


@dataclass(frozen=True)
class HeadsConfig:
    """Stage 2: fit scikit-learn heads on cached features."""

    data: str = DEFAULT_DATA_DIR
    cache: str = DEFAULT_CACHE_DIR
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    precision: str = "auto"
    device: str = "auto"
    views: int = 0
    features: str = ""  # explicit feature cache file; default: the one `features` makes
    # The default suite: the exact solvers. Optional: sgd_log, sgd_hinge (the same losses by SGD;
    # the heads --out-of-core trains, and its default there), knn, nearest_centroid; "all": every head.
    heads: tuple = ("logistic", "linear_svm", "ridge")
    use_views: bool = False  # train on the cached augmented views too (grouped CV by image)
    cv_folds: int = 5  # stratified k-fold on train only; val is never used for a choice
    seed: int = 0
    out_of_core: bool = False  # SGD heads stream HDF5 chunks into partial_fit
    chunk_rows: int = 4096  # rows per partial_fit step (out-of-core)
    epochs: int = 5  # passes over the train split (out-of-core SGD)
    jobs: int = 1  # cross-validation folds fitted in parallel (threads)
    format: str = "joblib"  # joblib | skops
    rebuild: bool = False

    def __post_init__(self):
        _one_of(self, "precision", PRECISIONS)
        _interval(self, "views", 0, MAX_VIEWS)
        _interval(self, "cv_folds", 2)
        _one_of(self, "format", HEAD_FORMATS)
        _interval(self, "chunk_rows", 1)
        _interval(self, "epochs", 1)
        _interval(self, "jobs", 1, MAX_PARALLEL)
        _seed(self)
        if self.out_of_core and self.use_views:
            raise ParameterError("{out_of_core} streams plain features only; drop {use_views} or {out_of_core}",
                                 "out_of_core", "use_views")


@dataclass(frozen=True)
class FinetuneConfig:
    """Stage 3: end-to-end training (reference protocol defaults)."""

    data: str = DEFAULT_DATA_DIR
    cache: str = DEFAULT_CACHE_DIR
    backbone: str = DEFAULT_BACKBONE
    weights: str = "imagenet"
    device: str = "auto"
    precision: str = "auto"
    mode: str = "finetune"  # finetune | scratch | fixed | partial
    trainable_from: str = "layer4"
    bn: str = "frozen-eval"  # frozen-eval | train
    epochs: int = 25
    batch_size: int = 4
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    step_size: int = 7
    gamma: float = 0.1
    seed: int = 0
    seeds: tuple = ()  # several seeds: one run each, then mean ± std (overrides seed)
    # Which epoch's model is the result: "final" (the fixed schedule's last epoch) or
    # "holdout:F" (the best epoch on a stratified, seeded fraction F of train). Never val.
    select: str = "final"
    train_per_class: int = 0  # >0: train on K seeded images per class (a data-size curve point)
    # Val pass every N epochs during training (learning curves, the best-val column: diagnostics,
    # timed apart from training); 0: the final epoch only. The result is scored on val either way.
    eval_every: int = 1
    workers: int = -1  # -1: automatic; results do not depend on it
    # Images per pass without gradients (val, holdout, the frozen prefix): 0 is
    # max(batch_size, 32 on CPU / 256 on CUDA).
    eval_batch_size: int = 0
    threads: int = 0  # CPU threads for the network; 0: torch's default (one per physical core)
    channels_last: bool = True
    strict: bool = False  # an undecodable image is fatal instead of skipped
    rebuild: bool = False
    progress: bool = True
    # Under torchrun: the longest any rank waits for the others at a meeting point (seconds).
    dist_timeout: float = 1800.0

    def __post_init__(self):
        _one_of(self, "mode", MODES)
        _one_of(self, "trainable_from", TRAINABLE_FROM, " ({mode} fixed trains fc alone)", "mode")
        _one_of(self, "bn", BN_CHOICES)
        _one_of(self, "precision", PRECISIONS)
        _interval(self, "epochs", 1)
        _interval(self, "batch_size", 1)
        _interval(self, "eval_batch_size", 0)
        f32 = f"{FLOAT32_MAX:.4g} (float32)"
        _interval(self, "lr", 0, FLOAT32_MAX, open_low=True, rule=f"> 0 and at most {f32}")
        _interval(self, "momentum", 0, 1, open_high=True, rule="in [0, 1)")
        _interval(self, "weight_decay", 0, FLOAT32_MAX, rule=f">= 0 and at most {f32}")
        _interval(self, "step_size", 1)
        _interval(self, "gamma", 0, math.inf, open_low=True, open_high=True, rule="> 0 and finite")
        _workers(self)
        _interval(self, "threads", 0, MAX_PARALLEL, rule=f"between 0 and {MAX_PARALLEL} (0 for torch's default)")
        _seed(self)
        drops = (self.epochs - 1) // self.step_size  # StepLR multiplies the lr by gamma this often
        if math.log(self.lr) + drops * math.log(max(1.0, self.gamma)) > math.log(FLOAT32_MAX):
            raise ParameterError(
                f"{{lr}} {self.lr} times {{gamma}} {self.gamma} every {self.step_size} epoch(s) exceeds float32's "
                f"largest value {f32.split()[0]} within {self.epochs} epochs; use a smaller {{lr}} or {{gamma}}",
                "lr", "gamma")
        _interval(self, "train_per_class", 0, rule=">= 0 (0: every train image)")
        _interval(self, "eval_every", 0, rule=">= 0 (0: the final epoch only)")
        _interval(self, "dist_timeout", 0, math.inf, open_low=True, open_high=True, rule="> 0 seconds and finite")
        try:
            parse_select(self.select)
        except ValueError as exc:
            raise ParameterError("{select} " + _shown(str(exc)), "select") from None
        seeds = self.seeds
        if (any(not isinstance(s, int) or not SEED_RANGE[0] <= s <= SEED_RANGE[1] for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise ParameterError(f"{{seeds}} {_shown(','.join(map(str, seeds)))}: give distinct integers >= 0, "
                                 "e.g. {seeds} 0,1,2", "seeds")


@dataclass(frozen=True)
class CompareConfig:
    """Stage 4: put every method side by side."""

    cache: str = DEFAULT_CACHE_DIR
    reports: str = "reports"
    # The data root the results must come from; "": the one most results share. Results from
    # any other root, class list or val set are listed apart, never mixed into the table.
    data: str = ""
    alpha: float = 0.05  # family-wise level of the all-pairs McNemar tests (Holm-corrected)
    # Non-inferiority margin in accuracy (0.03: 3 points): a cheaper method is recommended when the
    # 95% CI of its paired difference to the most accurate row lies above -margin. 3 points is
    # smaller than the gaps that separate transfer strategies in practice (the tutorial's random init
    # trails by about 20 points) and still certifiable with some hundreds of val images.
    margin: float = 0.03
    curve: bool = True  # the heads' data-size curve (seconds on the tutorial's data)
    figures: bool = True
    backbones: tuple = ()  # only results of these backbones; (): every backbone found

    def __post_init__(self):
        if not 0 < self.alpha < 1:
            raise ParameterError(f"{{alpha}} {self.alpha!r} is out of range; use a level between 0 and 1 such as 0.05",
                                 "alpha")
        if not 0 < self.margin < 1:
            raise ParameterError(f"{{margin}} {self.margin!r} is out of range; give accuracy points as a fraction "
                                 "strictly between 0 and 1, such as 0.03 (3 points)", "margin")


@dataclass(frozen=True)
class PredictConfig:
    """Classify new images with a saved head."""

    head: str = ""  # a head name under <cache>/heads/, or the path of its .json / model file
    inputs: tuple = field(default_factory=tuple)
    cache: str = DEFAULT_CACHE_DIR
    device: str = "auto"
    batch_size: int = 0
    format: str = "table"  # table | csv | json
    weights: str = ""  # backbone weights; default: those the head's features were made with
    backbone: str = ""  # which backbone's head --head names; default: resnet18's, else the only one
    model: str = ""  # an exported .onnx file instead of --head (ONNX Runtime, no torch)

    def __post_init__(self):
        _one_of(self, "format", PREDICT_FORMATS)
        _interval(self, "batch_size", 0, rule=">= 0 (0: automatic)")


@dataclass(frozen=True)
class ExportConfig:
    """Write a head or a run as one ONNX image classifier."""

    head: str = ""  # a head name under <cache>/heads/ (or its sidecar path); or:
    run: str = ""  # a run name under <cache>/runs/: MODE or MODE-SEED
    recommended: bool = False  # or: the method `compare` recommends (its compare.json under reports)
    reports: str = "reports"  # where `compare` wrote its report (with recommended)
    cache: str = DEFAULT_CACHE_DIR
    out: str = ""  # the .onnx file (or a folder for it); default: <cache>/export/
    weights: str = ""  # a head's backbone weights; default: those its features were made with
    backbone: str = ""  # which backbone's head or run --head/--run names; default: resnet18's
    sample: int = 64  # val images the written file is checked on (at most)
    tolerance: float = 1e-4  # largest accepted difference of probabilities from the source

    def __post_init__(self):
        _interval(self, "sample", 1, rule=">= 1 (val images the exported file is checked on)")
        _interval(self, "tolerance", 0, math.inf, open_low=True, open_high=True, rule="> 0 and finite")
