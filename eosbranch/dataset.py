"""What a data set is: the :class:`Dataset` every loader returns, the registry ``DATASETS`` of
loaders, and the class selection the loaders share (the loaders are in ``data``, ``cifar10`` and
``tensor_file``; ``data.load_data`` builds the one a spec names)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import SpecError
from .registry import Registry

DATASETS = Registry("data set")


@dataclass
class Dataset:
    """Training (and optional test) tensors on the CPU, in float64, plus what they mean."""

    X: torch.Tensor  # float64, natural shape (N, *input_shape)
    y: torch.Tensor  # int64 labels 0..C-1 (classification) or float64 (N, out) (regression)
    X_test: torch.Tensor | None
    y_test: torch.Tensor | None
    task: str  # "classification" | "regression"
    num_outputs: int  # classes for classification; target dim for regression
    input_shape: tuple[int, ...]
    classes: tuple | None  # original class ids in label order, e.g. (3, 5)
    info: dict = field(default_factory=dict)  # kind-specific extras (indices, masks, directions)

    def __post_init__(self):
        # Catch a new loader's mistakes here rather than as a shape error deep in training.
        if self.task not in ("classification", "regression"):
            raise ValueError(f"Dataset.task must be classification or regression, got {self.task!r}")
        for name in ("X", "y") + (("X_test", "y_test") if self.X_test is not None else ()):
            _check_pair_dtype(self, name)
        if len(self.X) != len(self.y):
            raise ValueError(f"Dataset: X has {len(self.X)} rows but y has {len(self.y)}")
        if tuple(self.X.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"Dataset: X.shape[1:] = {tuple(self.X.shape[1:])} != {self.input_shape}")
        if (self.X_test is None) != (self.y_test is None):
            raise ValueError("Dataset: X_test and y_test must both be given or both be None")


def _check_pair_dtype(ds: Dataset, name: str) -> None:
    t = getattr(ds, name)
    want = torch.int64 if (name.startswith("y") and ds.task == "classification") else torch.float64
    if t.dtype != want:
        raise ValueError(f"Dataset.{name} must be {want}, got {t.dtype}")


def classes_ok(v: list[int], allowed: range, exact: int | None = None) -> list[int]:
    allowed_txt = f"{allowed.start}..{allowed.stop - 1}"
    bad = [c for c in v if c not in allowed]
    if bad:
        raise ValueError(f"class {bad[0]} is not in the data set; allowed values are {allowed_txt}")
    if len(set(v)) != len(v):
        raise ValueError(f"classes must be distinct, got {v}")
    if exact is not None and len(v) != exact:
        raise ValueError(f"expected exactly {exact} classes (a pair from {allowed_txt}), got {v}")
    if len(v) < 2:
        raise ValueError(f"need at least 2 classes from {allowed_txt}, got {v}")
    return v


def first_per_class(labels: np.ndarray, classes, n: int | None, what: str, where: str) -> np.ndarray:
    """Indices of the first ``n`` items of each class, merged back into file order."""
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if n is not None and n > len(idx):
            raise SpecError(f"{where}: asks for {n} {what} of class {c}, but only {len(idx)} exist")
        picked.append(idx if n is None else idx[:n])
    return np.sort(np.concatenate(picked))


def remap(labels: np.ndarray, classes) -> torch.Tensor:
    # Label k is the k-th entry of `classes`, so the spec fixes which class is "class 0".
    out = np.empty(len(labels), dtype=np.int64)
    for k, c in enumerate(classes):
        out[labels == c] = k
    return torch.from_numpy(out)
