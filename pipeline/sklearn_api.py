"""``ResNet18Features``: a scikit-learn transformer from image paths to frozen ResNet18 features.

>>> from sklearn.pipeline import make_pipeline
>>> from sklearn.linear_model import LogisticRegression
>>> model = make_pipeline(ResNet18Features(weights="random"), LogisticRegression())  # doctest: +SKIP
>>> model.fit(train_paths, train_labels).predict(new_paths)                            # doctest: +SKIP

The network never runs twice over the same image content and settings in one process (a
bounded in-memory memo keyed by the file's sha1, the weights' sha256, precision and
transform), and a matching feature cache (``cache=``) is read instead of recomputing. The
estimator itself holds only its parameters and a few strings, so it pickles and clones
cheaply; the network is rebuilt from ``weights`` when needed and its sha256 is checked.
"""
from __future__ import annotations

import glob
import os
import re
import threading
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .config import FEATURE_DIM
from . import paths
from .files import file_digest

__all__ = ["ResNet18Features", "clear_memory"]

_MEMO_MAX = 20000  # features kept in memory (2 KiB each: about 40 MiB)
_LOCK = threading.RLock()
_WEIGHTS: "OrderedDict[tuple, object]" = OrderedDict()
_MODELS: "OrderedDict[tuple, object]" = OrderedDict()
_MEMO: "OrderedDict[tuple, np.ndarray]" = OrderedDict()
_CACHE_INDEX: Dict[tuple, Dict[str, np.ndarray]] = {}
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # noise in PIL's messages


def clear_memory() -> None:
    """Forget memoised weights, networks, features and cache indexes (frees memory)."""
    with _LOCK:
        for d in (_WEIGHTS, _MODELS, _MEMO, _CACHE_INDEX):
            d.clear()


def _put(d: OrderedDict, key, value, limit: int) -> None:
    d[key] = value
    d.move_to_end(key)
    while len(d) > limit:
        d.popitem(last=False)


class ResNet18Features(TransformerMixin, BaseEstimator):
    """Frozen ResNet18 penultimate features of image files, as a scikit-learn transformer.

    Parameters
    ----------
    weights : str, default="imagenet"
        ``"imagenet"`` (torchvision's IMAGENET1K_V1), ``"random"`` (seeded random init, not
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

    Attributes
    ----------
    weights_id_ : str
        Resolved weights (``imagenet``, ``random-seed0``, ``file:<name>``).
    weights_sha256_ : str
        Content hash of the weights; checked whenever the network is rebuilt.
    pretrained_ : bool
        False for random weights: features then carry no transfer learning.
    device_ : str
    precision_ : str

    Notes
    -----
    ``X`` is a 1-D sequence of image paths (or an array of shape (n_samples, 1)), and
    ``transform`` returns ``ndarray of shape (n_samples, 512)``. An image that cannot be
    decoded makes ``transform`` raise ``ValueError`` naming it.
    """

    def __init__(self, weights: str = "imagenet", seed: int = 0, device: str = "auto", precision: str = "auto",
                 batch_size: int = 0, cache: Optional[str] = None, root: Optional[str] = None, draft: bool = True):
        self.weights = weights
        self.seed = seed
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.cache = cache
        self.root = root
        self.draft = draft

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
        self : ResNet18Features
        """
        from . import backbone
        from .errors import UserError

        self._paths(X)
        if not isinstance(self.batch_size, (int, np.integer)) or self.batch_size < 0:
            raise ValueError(f"batch_size={self.batch_size!r}. Only integers >= 0 are supported (0: automatic).")
        self._cache_files()  # validates ``cache``
        weights = self._resolve_weights()
        try:
            device = backbone.choose_device(self.device)
            precision = backbone.choose_precision(self.precision, device)
        except UserError as exc:
            raise ValueError(str(exc)) from None
        self.weights_id_ = weights.id
        self.weights_sha256_ = weights.sha256
        self.pretrained_ = bool(weights.pretrained)
        self.device_ = str(device)
        self.precision_ = precision
        return self

    def transform(self, X) -> np.ndarray:
        """Features of each image.

        Parameters
        ----------
        X : sequence of str of shape (n_samples,)
            Image paths.

        Returns
        -------
        ndarray of shape (n_samples, 512), float32
        """
        check_is_fitted(self, "weights_sha256_")
        features, ok, errors = self.extract(self._paths(X))
        if errors:
            path, reason = errors[0]
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise ValueError(f"cannot decode image {path!r}: {reason}{more}; remove or fix it before transform")
        return features

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``resnet18_0`` ... ``resnet18_511``."""
        check_is_fitted(self, "weights_sha256_")
        return np.asarray([f"resnet18_{i}" for i in range(FEATURE_DIM)], dtype=object)

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
        full = [self._full(p) for p in paths]
        out: List[Optional[np.ndarray]] = [None] * len(full)
        errors: Dict[int, str] = {}
        sha1 = {}
        for i, path in enumerate(full):
            try:
                sha1[i] = file_digest(path)
            except OSError as exc:
                errors[i] = f"{type(exc).__name__}: {exc.strerror or exc}"
        index = self._cache_index()
        todo = []
        with _LOCK:
            for i, digest in sha1.items():
                hit = _MEMO.get(self._memo_key(digest))
                if hit is None:
                    hit = index.get(digest)
                if hit is None:
                    todo.append(i)
                else:
                    out[i] = hit
        if todo:
            for i, feature, error in self._compute([full[i] for i in todo], todo):
                if error:
                    errors[i] = _BUFFER_REPR.sub("", error)
                else:
                    out[i] = feature
                    with _LOCK:
                        _put(_MEMO, self._memo_key(sha1[i]), feature, _MEMO_MAX)
        ok = np.asarray([i for i in range(len(full)) if out[i] is not None], dtype=np.int64)
        feats = np.stack([out[i] for i in ok]).astype(np.float32) if len(ok) else np.zeros((0, FEATURE_DIM), np.float32)
        return feats, ok, [(full[i], errors[i]) for i in sorted(errors)]

    def _compute(self, paths: List[str], ids: List[int]):
        """Yield ``(id, feature, error)`` for each path: batched forward passes."""
        import torch

        from . import backbone, data

        model, device = self._model()
        dataset = data.ExtractionDataset("", paths, draft=self.draft)
        # Loader processes pay off only for many images on a machine with cores to spare.
        workers = 0 if len(paths) < 64 or (os.cpu_count() or 1) < 4 else 2
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=self.batch_size or (256 if device.type == "cuda" else 32),
            num_workers=workers, pin_memory=device.type == "cuda")
        with torch.inference_mode():
            for batch in loader:
                good = [j for j, err in enumerate(batch["error"]) if not err]
                feats = None
                if good:
                    x = batch["image"][torch.tensor(good)].to(device, non_blocking=True)
                    x = x.contiguous(memory_format=torch.channels_last)
                    with backbone.autocast(device, self.precision_):
                        feats = model(x).float().cpu().numpy()
                for j, k in enumerate(batch["index"].tolist()):
                    if batch["error"][j]:
                        yield ids[k], None, batch["error"][j]
                    else:
                        yield ids[k], feats[good.index(j)], ""

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

    def _memo_key(self, sha1: str) -> tuple:
        return (self.weights_sha256_, self.precision_, bool(self.draft), sha1)

    def _resolve_weights(self):
        """The weights for ``self.weights``, memoised per process (files: by size and mtime)."""
        from . import backbone
        from .errors import UserError

        key: tuple = (self.weights, self.seed)
        if self.weights not in ("imagenet", "random") and os.path.isfile(self.weights):
            st = os.stat(self.weights)
            key += (os.path.abspath(self.weights), st.st_size, st.st_mtime_ns)
        with _LOCK:
            if key in _WEIGHTS:
                return _WEIGHTS[key]
        try:
            weights = backbone.resolve_weights(self.weights, self.seed)
        except UserError as exc:
            raise ValueError(f"weights={self.weights!r}: {exc}") from None
        with _LOCK:
            _put(_WEIGHTS, key, weights, 2)
        return weights

    def _model(self):
        from . import backbone

        device = backbone.choose_device(self.device_)
        key = (self.weights_sha256_, str(device))
        with _LOCK:
            if key in _MODELS:
                return _MODELS[key], device
        weights = self._resolve_weights()
        if weights.sha256 != self.weights_sha256_:
            raise ValueError(
                f"weights={self.weights!r} now resolve to sha256 {weights.sha256[:12]}…, but this transformer "
                f"was fitted with {self.weights_sha256_[:12]}… ({self.weights_id_}); refit it or restore the weights")
        model = backbone.feature_extractor(weights, device, channels_last=True)
        with _LOCK:
            _put(_MODELS, key, model, 2)
        return model, device

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

    def _cache_index(self) -> Dict[str, np.ndarray]:
        """sha1 -> feature over every cache file made with these weights, precision and transform."""
        from . import data, store
        from .errors import UserError

        index: Dict[str, np.ndarray] = {}
        want = data.describe_transforms(0, self.draft)
        for path in self._cache_files():
            st = os.stat(path)
            key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, self.weights_sha256_, self.precision_,
                   bool(self.draft))
            with _LOCK:
                cached = _CACHE_INDEX.get(key)
            if cached is None:
                try:
                    meta = store.read_meta(path)
                    cached = {}
                    transform = meta.get("transform") or {}
                    if (meta.get("weights_sha256") == self.weights_sha256_ and meta.get("precision") == self.precision_
                            and transform.get("eval") == want["eval"]
                            and transform.get("draft_jpeg_min_side") == want["draft_jpeg_min_side"]):
                        cached = {row.sha1: row.feature for row in store.read_known_rows(path).values()
                                  if row.feature is not None}
                except store.DamagedCacheError:
                    raise  # never silently recompute around damage: the user should know (and --rebuild)
                except UserError:  # not a cache of this project
                    cached = {}
                with _LOCK:
                    _CACHE_INDEX[key] = cached
            index.update(cached)
        return index
