"""Classify images with an exported model: ``python -m pipeline predict --model FILE.onnx IMAGE_OR_DIR…``.

Needs ONNX Runtime, NumPy and Pillow, not torch (``pip install 'pipeline[onnx]'`` or just
``pip install onnxruntime``). The file says how to prepare its input (its metadata, written by
``python -m pipeline export``): images are decoded and cropped here as the feature cache did,
the network normalises them itself. Output and formats are those of ``predict --head``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..data import images
from ..config import PredictConfig
from ..errors import UserError
from .predictions import PredictResult

__all__ = ["OnnxClassifier", "execution_providers", "run", "FORMAT"]

FORMAT = "pipeline.export"  # the "format" entry of an exported file's metadata
DEFAULT_BATCH = 32


def execution_providers(device: str, available: Sequence[str]) -> list:
    """ONNX Runtime providers for ``--device``: the CUDA provider on GPU ``N`` of ``cuda:N`` (``device_id``;
    without it ONNX Runtime runs on GPU 0), then the CPU provider."""
    providers: list = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in available:
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise UserError(f"--device {device!r} is not recognised; use auto, cpu, cuda or cuda:N")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index or 0)}))
    return providers


class OnnxClassifier:
    """An exported ``.onnx`` classifier and the preprocessing its metadata prescribes.

    ``classify(paths)`` returns class indices, the probability of each predicted class (None
    for models without probabilities) and the files that could not be decoded.
    """

    def __init__(self, path: str, device: str = "cpu", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("predict --model needs ONNX Runtime: pip install onnxruntime "
                            "(or the project's extra: pip install 'pipeline[onnx]')") from None
        if not os.path.isfile(path):
            raise UserError(f"--model {path!r}: no such file; give an .onnx file written by "
                            "`python -m pipeline export`")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        providers = execution_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(path, options, providers=providers)
        except Exception as exc:  # ONNX Runtime's errors have no common base class
            raise UserError(f"--model {path!r} is not a readable ONNX model ({(str(exc).splitlines() or [type(exc).__name__])[0][:160]}); "
                            "export it again with `python -m pipeline export`") from None
        raw = self.session.get_modelmeta().custom_metadata_map
        try:
            self.meta: Dict[str, object] = {k: json.loads(v) for k, v in raw.items()}
        except ValueError:
            self.meta = {}
        if self.meta.get("format") != FORMAT:
            raise UserError(f"--model {path!r} was not written by `python -m pipeline export` (its metadata lacks "
                            "the classes and preprocessing); export the head or run with this project")
        self.path = path
        self.classes: List[str] = list(self.meta["classes"])
        self.preprocessing: dict = dict(self.meta["preprocessing"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_proba = "probabilities" in self.output_names

    @property
    def name(self) -> str:
        return str(self.meta["source"]["name"])

    @property
    def pretrained(self) -> bool:
        return bool(self.meta["weights"]["pretrained"])

    def load(self, path: str) -> np.ndarray:
        """One image file as the network's input row: float32 (3, crop, crop) in [0, 1]."""
        p = self.preprocessing
        image = images.load_image(path, p.get("draft_jpeg_min_side"))
        return images.eval_array(image, int(p["resize"]), int(p["crop"]), str(p["interpolation"]))

    def forward(self, batch: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """``(logits, probabilities or None)`` for a float32 batch of shape (N, 3, crop, crop)."""
        out = dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))
        return out["logits"], out.get("probabilities")

    def classify(self, paths: Sequence[str], batch_size: int = 0
                 ) -> Tuple[List[int], np.ndarray, Optional[np.ndarray], List[Tuple[int, str]]]:
        """``(indices of the decoded paths, logits, probabilities or None, [(index, error)])``."""
        batch_size = batch_size or DEFAULT_BATCH
        ok: List[int] = []
        errors: List[Tuple[int, str]] = []
        logits, proba = [], []
        rows: List[np.ndarray] = []

        def flush():
            if rows:
                lg, pr = self.forward(np.stack(rows))
                logits.append(lg)
                proba.append(pr)
                rows.clear()

        for i, path in enumerate(paths):
            try:
                rows.append(self.load(path))
            except Exception as exc:  # a bad image is data, not a crash (as in predict --head)
                errors.append((i, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
                continue
            ok.append(i)
            if len(rows) >= batch_size:
                flush()
        flush()
        n_out = len(self.classes)
        all_logits = np.concatenate(logits) if logits else np.zeros((0, n_out), np.float32)
        all_proba = None
        if self.has_proba:
            all_proba = np.concatenate(proba) if proba else np.zeros((0, n_out), np.float32)
        return ok, all_logits, all_proba, errors


def run(cfg: PredictConfig):
    """``predict --model`` (called by :func:`pipeline.export.predict.run`, which checks the options): the
    same :class:`pipeline.export.predictions.PredictResult` as ``predict --head``."""

    model = OnnxClassifier(cfg.model, device=cfg.device)
    paths = images.collect_images(cfg.inputs)
    if not paths:
        raise UserError(f"no image files found in {list(cfg.inputs)}; give image files or folders that hold them")
    ok, logits, proba, errors = model.classify(paths, cfg.batch_size)
    result = PredictResult(model.name, model.classes, model.pretrained,
                           skipped=[{"path": paths[i], "error": e} for i, e in errors])
    pred = logits.argmax(axis=1)
    for row, i in enumerate(ok):
        p = None if proba is None else float(proba[row, pred[row]])
        result.predictions.append({"path": paths[i], "class": model.classes[int(pred[row])], "probability": p})
    return result
