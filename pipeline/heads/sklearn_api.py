"""``BackboneFeatures``: a scikit-learn transformer from image paths to frozen backbone features
(``ResNet18Features``: the same with the default ResNet18).

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.linear_model import LogisticRegression
>>> model = make_pipeline(BackboneFeatures("efficientnet_lite0", memory="cache/joblib"),
...                       LogisticRegression())                                   # doctest: +SKIP
>>> model.fit(train_paths, train_labels).predict(new_paths)                       # doctest: +SKIP

The estimator's state is its parameters plus a few fitted strings (``weights_sha256_``...):
no module-level caches. ``memory=`` (as in scikit-learn's ``Pipeline``) remembers features
per image content and settings, so cross-validation over paths runs the network once per
image; a matching feature cache (``cache=``) is read instead of recomputing. The network is
rebuilt from ``weights`` when needed (resolved and checked once per process by
:func:`pipeline.features.extraction.load_weights`) and is never pickled.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted, check_memory

from .. import backbones, data, paths
from ..features import extraction, store
from ..config import DEFAULT_BACKBONE
from ..errors import UserError
from ..files import file_digest

__all__ = ["BackboneFeatures", "ResNet18Features"]

_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # noise in PIL's messages
_RUNTIME = ("_network", "_cache_indexes")  # rebuilt where the transformer runs; never pickled


def _remembered(key: str, feature: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
    """The feature stored under ``key`` (``memory.cache`` ignores ``feature`` when it looks up)."""
    return feature


class BackboneFeatures(TransformerMixin, BaseEstimator):
    """Frozen penultimate features (pooled pre-logits) of image files, as a scikit-learn transformer.

    Parameters
    ----------
    backbone : str, default="resnet18"
        ``"resnet18"``, ``"efficientnet_lite0"`` (ImageNet weights from the installed package),
        ``"torchvision:NAME"`` or ``"timm:NAME"``.
    weights : str, default="imagenet"
        ``"imagenet"`` (the backbone's ImageNet weights), ``"random"`` (seeded random init, not
        pretrained) or the path of a state_dict file.
    seed : int, default=0
        Seed of ``weights="random"``.
    device : str, default="auto"
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    precision : str, default="auto"
        ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    batch_size : int, default=0
        Images per forward pass; 0 chooses (32 on CPU, 256 on CUDA).
    cache : str or None, default=None
        A feature cache file (``.h5``) or a cache folder (its ``features/*.h5`` are searched).
        Images whose content (sha1) is in a cache made with the same weights, precision and
        transform are read from it instead of recomputed.
    root : str or None, default=None
        Folder that relative image paths are relative to (default: the working directory).
    draft : bool, default=True
        Decode large JPEGs at reduced scale when it is safe (as ``features`` does by default).
    memory : None, str or object with the joblib.Memory interface, default=None
        Where features are remembered, keyed by each file's content (sha1) and the settings
        that shape a feature (weights sha256, precision, transform): a folder path or a
        ``joblib.Memory``. Clones share it, so cross-validation and grid searches over image
        paths run the network once per image. ``None``: nothing is remembered between calls.

    Attributes
    ----------
    backbone_ : str
        The canonical backbone name.
    n_features_out_ : int
        Size of a feature (512 for ResNet18, 1280 for EfficientNet-Lite0).
    weights_id_ : str
        Resolved weights (``imagenet``, ``random-seed0``, ``file:<name>``).
    weights_sha256_ : str
        Content hash of the weights; checked whenever the network is rebuilt.
    pretrained_ : bool
        False for random weights: features then carry no transfer learning.
    device_ : str
        Where ``fit`` resolved ``device``. ``transform`` resolves ``device`` (and ``precision``)
        again on the machine it runs on, so a transformer fitted with ``device="auto"`` on a GPU
        and unpickled on a CPU-only machine runs on the CPU.
    precision_ : str
        Where ``fit`` resolved ``precision``.

    Notes
    -----
    ``X`` is a 1-D sequence of image paths (or an array of shape (n_samples, 1)), and
    ``transform`` returns ``ndarray of shape (n_samples, n_features_out_)``. An image that cannot be
    decoded makes ``transform`` raise ``ValueError`` naming it.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, weights: str = "imagenet", seed: int = 0,
                 device: str = "auto", precision: str = "auto", batch_size: int = 0, cache: Optional[str] = None,
                 root: Optional[str] = None, draft: bool = True, memory=None):
        self.backbone = backbone
        self.weights = weights
        self.seed = seed
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.cache = cache
        self.root = root
        self.draft = draft
        self.memory = memory

    # ------------------------------------------------------------------ scikit-learn API

    def fit(self, X, y=None):
        """Validate ``X`` and resolve the weights, device and precision. Learns nothing else.

        Parameters
        ----------
        X : sequence of str of shape (n_samples,)
            Image paths.
        y : ignored

        Returns
        -------
        self : BackboneFeatures
        """
        self._paths(X)
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 0:
            raise ValueError(f"batch_size={self.batch_size!r}. Only integers >= 0 are supported (0: automatic).")
        self._cache_files()  # validates ``cache``
        check_memory(self.memory)  # validates ``memory``
        weights = self._weights()
        device, precision = self._device_precision()
        self.backbone_ = weights.backbone.name
        self.n_features_out_ = backbones.feature_dim(weights.backbone.name)
        self.weights_id_ = weights.id
        self.weights_sha256_ = weights.sha256
        self.pretrained_ = bool(weights.pretrained)
        self.device_ = str(device)
        self.precision_ = precision
        for name in _RUNTIME:
            self.__dict__.pop(name, None)
        return self

    def transform(self, X) -> np.ndarray:
        """Features of each image.

        Parameters
        ----------
        X : sequence of str of shape (n_samples,)
            Image paths.

        Returns
        -------
        ndarray of shape (n_samples, n_features_out_), float32
        """
        check_is_fitted(self, "weights_sha256_")
        features, ok, errors = self.extract(self._paths(X))
        if errors:
            path, reason = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ValueError(f"cannot decode image {path!r}: {reason}{more}; remove or fix it before transform")
        return features

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``<backbone>_0`` … (``resnet18_0`` … ``resnet18_511``)."""
        check_is_fitted(self, "weights_sha256_")
        prefix = paths.backbone_slug(self.backbone_)
        return np.asarray([f"{prefix}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags

    # ------------------------------------------------------------------ extraction

    def extract(self, paths: Sequence[str]) -> Tuple[np.ndarray, np.ndarray, List[Tuple[str, str]]]:
        """Features of the decodable images, without raising on bad files.

        Returns
        -------
        features : ndarray of shape (n_ok, 512)
        ok : ndarray of shape (n_ok,)
            Index into ``paths`` of each row of ``features``.
        errors : list of (path, reason)
        """
        check_is_fitted(self, "weights_sha256_")
        device, precision = self._device_precision()
        settings = self._settings_key(precision)
        full = [self._full(p) for p in paths]
        out: List[Optional[np.ndarray]] = [None] * len(full)
        errors: Dict[int, str] = {}
        sha1 = {}
        for i, path in enumerate(full):
            try:
                sha1[i] = file_digest(path)
            except OSError as exc:
                errors[i] = f"{type(exc).__name__}: {exc.strerror or exc}"
        remembered = check_memory(self.memory).cache(_remembered, ignore=["feature"])
        index = self._cache_index(precision)
        todo = []
        for i, digest in sha1.items():
            key = f"{settings}:{digest}"
            if remembered.check_call_in_cache(key):
                out[i] = remembered(key)
            elif digest in index:
                out[i] = index[digest]
            else:
                todo.append(i)
        if todo:
            engine = self._extractor(device, precision)
            for batch in engine.batches("", [full[i] for i in todo], draft=self.draft):
                for j, k in enumerate(batch.index):
                    i = todo[k]
                    if batch.error[j]:
                        errors[i] = _BUFFER_REPR.sub("", batch.error[j])
                    else:
                        out[i] = batch.features[j].copy()
                        remembered(f"{settings}:{batch.sha1[j]}", feature=out[i])
        ok = np.asarray([i for i in range(len(full)) if out[i] is not None], dtype=np.int64)
        feats = np.stack([out[i] for i in ok]).astype(np.float32) if len(ok) else np.zeros((0, self.n_features_out_), np.float32)
        return feats, ok, [(full[i], errors[i]) for i in sorted(errors)]

    # ------------------------------------------------------------------ pickling

    def __getstate__(self):
        state = super().__getstate__()
        for name in _RUNTIME:
            state.pop(name, None)
        return state

    # ------------------------------------------------------------------ helpers

    def _paths(self, X) -> List[str]:
        if isinstance(X, (str, bytes, os.PathLike)):
            raise ValueError(f"X={X!r} is a single path. Only a sequence of image paths is supported; "
                             "wrap it in a list.")
        arr = np.asarray(X, dtype=object)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise ValueError(f"X has shape {arr.shape}. Only a 1-D sequence of image paths (or shape "
                             "(n_samples, 1)) is supported.")
        if arr.size == 0:
            raise ValueError("X is empty. Only a non-empty sequence of image paths is supported.")
        bad = [p for p in arr if not isinstance(p, (str, os.PathLike))]
        if bad:
            raise ValueError(f"X holds {type(bad[0]).__name__} {bad[0]!r}. Only image paths (str or "
                             "os.PathLike) are supported.")
        return [os.fspath(p) for p in arr]

    def _full(self, path: str) -> str:
        return path if os.path.isabs(path) or not self.root else os.path.join(self.root, path)

    def _weights(self) -> backbones.Weights:
        try:
            return extraction.load_weights(self.weights, self.seed, self.backbone)
        except UserError as exc:
            raise ValueError(f"weights={self.weights!r}: {exc}") from None

    def _device_precision(self) -> Tuple["object", str]:
        """``device`` and ``precision`` resolved here and now ("auto": what this machine has)."""
        try:
            device = backbones.choose_device(self.device)
            return device, backbones.choose_precision(self.precision, device)
        except UserError as exc:
            raise ValueError(f"device={self.device!r}, precision={self.precision!r}: {exc}") from None

    def _settings_key(self, precision: str) -> str:
        """Everything besides the image that shapes a feature, as a short digest."""
        settings = {"backbone": self.backbone_, "weights_sha256": self.weights_sha256_, "precision": precision,
                    "transform": data.describe_transforms(0, bool(self.draft), self._preprocess())}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:32]

    def _extractor(self, device, precision: str) -> extraction.Extractor:
        """The network on ``device``, built once per instance (and never pickled)."""
        key = (self.weights_sha256_, str(device), precision, int(self.batch_size))
        cached = self.__dict__.get("_network")
        if cached is not None and cached[0] == key:
            return cached[1]
        weights = self._weights()
        if weights.sha256 != self.weights_sha256_:
            raise ValueError(
                f"weights={self.weights!r} now resolve to sha256 {weights.sha256[:12]}…, but this transformer "
                f"was fitted with {self.weights_sha256_[:12]}… ({self.weights_id_}); refit it or restore the weights")
        engine = extraction.Extractor(weights, device, precision, int(self.batch_size))
        self.__dict__["_network"] = (key, engine)
        return engine

    def _cache_files(self) -> List[str]:
        if not self.cache:
            return []
        if os.path.isdir(self.cache):
            return sorted(glob.glob(os.path.join(paths.features_dir(self.cache), "*.h5")) +
                          glob.glob(os.path.join(self.cache, "*.h5")))
        if os.path.isfile(self.cache):
            return [self.cache]
        raise ValueError(f"cache={self.cache!r} does not exist. Only a feature cache file (.h5), a cache folder "
                         "or None is supported.")

    def _preprocess(self) -> dict:
        return backbones.get_backbone(self.backbone_).preprocess()

    def _cache_index(self, precision: str) -> Dict[str, np.ndarray]:
        """sha1 -> feature over every cache file made with these weights, precision and transform.

        Read once per file version per instance (kept with the network, never pickled).
        """
        indexes = self.__dict__.setdefault("_cache_indexes", {})
        index: Dict[str, np.ndarray] = {}
        want = data.describe_transforms(0, self.draft, self._preprocess())
        for path in self._cache_files():
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, self.weights_sha256_, precision,
                   bool(self.draft))
            if key not in indexes:
                found: Dict[str, np.ndarray] = {}
                try:
                    meta = store.read_meta(path)
                    transform = meta.get("transform") or {}
                    if (meta.get("weights_sha256") == self.weights_sha256_ and meta.get("precision") == precision
                            and transform.get("eval") == want["eval"]
                            and transform.get("draft_jpeg_min_side") == want["draft_jpeg_min_side"]):
                        found = {row.sha1: row.feature for row in store.read_known_rows(path).values()
                                 if row.feature is not None}
                except store.DamagedCacheError:
                    raise  # never silently recompute around damage: the user should know (and --rebuild)
                except UserError:  # not a cache of this project
                    pass
                indexes[key] = found
            index.update(indexes[key])
        return index


class ResNet18Features(BackboneFeatures):
    """:class:`BackboneFeatures` of the default backbone, ResNet18 (512-d features).

    The same parameters, less ``backbone``; kept so that code and pickles written for it work.
    """

    backbone = DEFAULT_BACKBONE  # read by BackboneFeatures; not a parameter here

    def __init__(self, weights: str = "imagenet", seed: int = 0, device: str = "auto", precision: str = "auto",
                 batch_size: int = 0, cache: Optional[str] = None, root: Optional[str] = None, draft: bool = True,
                 memory=None):
        self.weights = weights
        self.seed = seed
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.cache = cache
        self.root = root
        self.draft = draft
        self.memory = memory
