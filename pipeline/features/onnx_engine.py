"""ONNX Runtime as the features stage's CPU engine (``--engine onnxruntime``, extra ``[onnx]``).

The frozen extractor is exported to ONNX once per weights (content hash) and crop size, into
``<cache>/features/onnx/`` (atomic, under a lock), and run by ONNX Runtime's CPU provider in
fp32 with torch's thread count. Its features agree with torch's fp32 ones to about 1e-5, so
they fill the same fp32 cache; the cache's ``extract_engine`` says which engine computed it.
Not the default: `make bench` measures it against torch, and it is adopted only at 1.2x
torch end to end.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
import torch
from filelock import FileLock

from .. import backbones, files, paths
from ..errors import UserError
from .extraction import Extractor, default_batch_size

__all__ = ["OnnxExtractor", "export_backbone"]


def _runtime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("--engine onnxruntime needs ONNX Runtime: pip install -e '.[onnx]' "
                        "(or use --engine torch)") from None
    return onnxruntime


def export_backbone(weights: backbones.Weights, cache: str) -> str:
    """The extractor of ``weights`` as an ONNX file (batch dimension dynamic), exported once."""
    crop = weights.backbone.preprocess()["crop"]
    path = paths.onnx_backbone_file(cache, weights.backbone.slug, weights.sha256, crop)
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.isfile(path):  # another process exported it meanwhile
            return path
        model = backbones.feature_extractor(weights, torch.device("cpu"), channels_last=False)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (torch.zeros(2, 3, crop, crop),), input_names=["image"],
                                        output_names=["feature"], dynamo=True,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
        files.atomic_write(path, lambda fh: fh.write(program.model_proto.SerializeToString()))
    return path


class OnnxExtractor(Extractor):
    """:class:`extraction.Extractor` whose forward pass runs under ONNX Runtime (CPU, fp32)."""

    def __init__(self, weights: backbones.Weights, cache: str, batch_size: int = 0, workers: int = -1,
                 processes: int = 1):
        ort = _runtime()
        cpu = torch.device("cpu")
        # The loader and batching of the torch engine; the torch model itself is not built.
        self.device, self.precision, self.channels_last, self.processes = cpu, "fp32", False, processes
        self.batch_size = batch_size or default_batch_size(cpu)
        self.workers = workers
        self.model = None
        self.preprocess = weights.backbone.preprocess()
        self.dim = backbones.feature_dim(weights.backbone.name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(export_backbone(weights, cache), options,
                                            providers=["CPUExecutionProvider"])

    def forward(self, images) -> np.ndarray:
        if isinstance(images, (list, tuple)):  # the loader batches of one forward batch
            images = torch.cat(list(images)) if images else torch.zeros(0, 3, 1, 1)
        out = [self.session.run(None, {"image": images[i:i + self.batch_size].contiguous().numpy()})[0]
               for i in range(0, len(images), self.batch_size)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, self.dim), np.float32)
