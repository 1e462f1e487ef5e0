"""Where every result lives: the one description of the cache folder's layout.

::

    <cache>/features/<data>-<key12>.h5          a feature cache (its inside: store.py)
    <cache>/features/<data>-<key12>.h5.parts/   resume parts of an unfinished extraction
    <cache>/features/<data>-<key12>.h5.shards/  rank<r>-of-<w>-<tag>.h5 of a distributed run
    <cache>/features/uptodate.json              the stamp of the last extraction (uptodate.py)
    <cache>/features/index.json                 which cache file holds which settings (features
                                                writes it, heads reads it)
    <cache>/features/onnx/<backbone>-<sha16>-<crop>.onnx  the extractor for --engine onnxruntime
    <cache>/heads/<name>.joblib | .skops        a fitted head, and <name>.json its sidecar
                                                (<name>: <head>, or <backbone>-<head> for a
                                                backbone other than resnet18)
    <cache>/runs/<run name>/                    an end-to-end run: model.pt, last.pt,
                                                history.json, metrics.json (finetune.py)
    <cache>/export/<kind>-<name>.onnx           an exported classifier (+ .json sidecar)
    <reports>/compare/compare.md | .csv | .json the comparison report (+ figures/), one published set

Folder and file names only: nothing here touches the disk. The defaults of ``<cache>``
and ``<reports>`` are in config.py.
"""
from __future__ import annotations

import os
from typing import Dict

from .config import DEFAULT_BACKBONE

__all__ = [
    "features_dir",
    "cache_file",
    "features_index",
    "parts_dir",
    "shards_dir",
    "shard_file",
    "stamp_file",
    "onnx_backbone_file",
    "backbone_slug",
    "for_backbone",
    "heads_dir",
    "head_sidecar",
    "runs_dir",
    "run_dir",
    "RUN_METRICS",
    "RUN_MODEL",
    "RUN_LAST",
    "RUN_HISTORY",
    "export_dir",
    "report_dir",
    "report_files",
]


def features_dir(cache: str) -> str:
    return os.path.join(cache, "features")


def features_index(cache: str) -> str:
    """The features stage's index: settings (without weights or images) -> cache file name."""
    return os.path.join(features_dir(cache), "index.json")


def cache_file(cache: str, data_root: str, key: str) -> str:
    """The feature cache of the data folder ``data_root`` for the settings whose key is ``key``."""
    name = os.path.basename(os.path.normpath(data_root)) or "data"
    return os.path.join(features_dir(cache), f"{name}-{key[:12]}.h5")


def parts_dir(path: str) -> str:
    """Resume parts of the feature cache ``path`` while it is being extracted."""
    return path + ".parts"


def shards_dir(path: str) -> str:
    return path + ".shards"


def shard_file(path: str, rank: int, world_size: int, tag: str) -> str:
    """Where rank ``rank`` of ``world_size`` writes its shard of the cache ``path``."""
    return os.path.join(shards_dir(path), f"rank{rank}-of-{world_size}-{tag}.h5")


def stamp_file(cache: str) -> str:
    """What the last extraction was asked and found: a rerun of the same command checks it first."""
    return os.path.join(features_dir(cache), "uptodate.json")


def onnx_backbone_file(cache: str, backbone_slug: str, weights_sha256: str, crop: int) -> str:
    """The extractor exported to ONNX for ``--engine onnxruntime``, once per backbone, weights and crop."""
    return os.path.join(features_dir(cache), "onnx", f"{backbone_slug}-{weights_sha256[:16]}-{crop}.onnx")


def backbone_slug(backbone: str) -> str:
    """File-name safe form of a ``--backbone`` value (``timm:resnet10t`` -> ``timm-resnet10t``)."""
    return backbone.replace(":", "-").replace("/", "-")


def for_backbone(backbone: str, stem: str) -> str:
    """``stem`` for the default backbone (names as before backbones had a registry), else
    ``<backbone>-<stem>``: heads and runs of several backbones share one folder."""
    return stem if not backbone or backbone == DEFAULT_BACKBONE else f"{backbone_slug(backbone)}-{stem}"


def heads_dir(cache: str) -> str:
    return os.path.join(cache, "heads")


def head_sidecar(directory: str, name: str) -> str:
    """The JSON sidecar of the head ``name`` saved in ``directory`` (usually :func:`heads_dir`)."""
    return os.path.join(directory, f"{name}.json")


def runs_dir(cache: str) -> str:
    return os.path.join(cache, "runs")


def run_dir(cache: str, name: str) -> str:
    """The folder of the run named ``name`` (``finetune.run_name`` makes the names)."""
    return os.path.join(runs_dir(cache), name)


# The files of a run folder (finetune.py and checkpoints.py write them). metrics.json is written
# last, so a run without it is unfinished.
RUN_METRICS = "metrics.json"  # the run's record (records.RunRecord)
RUN_MODEL = "model.pt"  # the reported model: the final epoch's, or the epoch chosen on held-out train images
RUN_LAST = "last.pt"  # the state after the last finished epoch: what an interrupted run resumes from
RUN_HISTORY = "history.json"  # one entry per epoch


def export_dir(cache: str) -> str:
    return os.path.join(cache, "export")


def report_dir(reports: str) -> str:
    """The comparison report's folder: a link to its latest complete set (``files.publish_folder``)."""
    return os.path.join(reports, "compare")


def report_files(reports: str) -> Dict[str, str]:
    """``{"md", "csv", "json"}`` -> the comparison report in that format."""
    return {ext: os.path.join(report_dir(reports), f"compare.{ext}") for ext in ("md", "csv", "json")}
