"""The ``cifar10`` data set: torchvision's CIFAR-10 read offline from its python-format batches,
each pickle loaded by an unpickler that builds only arrays (a crafted file cannot run code)."""

from __future__ import annotations

import functools
import os
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torchvision.datasets import CIFAR10

from .dataset import DATASETS, Dataset, classes_ok, first_per_class, remap
from .errors import EosbranchError, SpecError
from .limits import MAX_POINTS
from .registry import Params

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


class Cifar10Params(Params):
    root: str
    download: bool = False
    classes: list[int] = [3, 5]
    n: int | None = Field(default=None, ge=2, le=MAX_POINTS)  # None: every training image of the pair
    n_test: int | None = Field(default=None, ge=2, le=MAX_POINTS)  # None: no test set
    verify: bool = True  # False skips only the md5 comparison, for small copies in the real format

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        return classes_ok(v, range(10), exact=2)

    @field_validator("n", "n_test")
    @classmethod
    def _even(cls, v):
        if v is not None and v % 2:
            raise ValueError(f"must be even (n/2 images of each class), got {v}")
        return v


@functools.cache
def _cifar10_class(verify: bool):
    """torchvision's CIFAR10, or a subclass whose only change is ``md5=None`` for every file.

    torchvision's ``check_integrity(path, None)`` still requires each file to exist, so with
    ``verify: false`` the loader, file layout and error paths stay torchvision's own. The default
    (``verify: true``) is torchvision's class untouched, so real users keep the real md5 check.
    """
    if verify:
        return CIFAR10

    class UnverifiedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return UnverifiedCIFAR10


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that builds only dicts, lists, strings, numbers and numpy arrays.

    CIFAR-10's python format is pickle, and torchvision loads it with plain ``pickle.load``. With
    the md5 check on, only the known files get that far; with ``verify: false`` we first read each
    file with this unpickler, so a crafted pickle fails here instead of running code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # written by numpy < 2 (the real files)
        ("numpy._core.multiarray", "_reconstruct"),  # written by numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _scan_cifar_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except Exception as err:  # any failure means "not a CIFAR-10 batch": report it on one line
        why = (str(err).splitlines() or [""])[0]
        raise EosbranchError(f"{path}: not a CIFAR-10 batch file ({type(err).__name__}: {why})") from None
    if path.name == "batches.meta":
        ok = isinstance(obj, dict) and isinstance(obj.get("label_names"), list)
        want = "a dict with 'label_names'"
    else:
        data = obj.get("data") if isinstance(obj, dict) else None
        ok = (
            isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3072 and isinstance(obj.get("labels"), list)
            and len(obj["labels"]) == len(data)
        )
        want = "a dict with uint8 'data' [n, 3072] and n 'labels'"
    if not ok:
        raise EosbranchError(f"{path}: not in the CIFAR-10 batch format (expected {want})")


def _open_cifar10(p: Cifar10Params, train: bool):
    root = Path(os.path.expanduser(p.root))
    folder = root / _CIFAR_DIR
    missing = [f for f in _CIFAR_FILES if not (folder / f).is_file()]
    how = (
        "set download: true in the data section to fetch it (needs network), or extract "
        f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into {root}"
    )
    if missing and not p.download:
        what = "does not exist" if not root.exists() else f"has no {_CIFAR_DIR}/{missing[0]}"
        raise EosbranchError(f"data.root: CIFAR-10 not found: {root} {what}; {how}")
    cls = _cifar10_class(p.verify)
    if p.download and missing:
        try:
            cls(str(root), train=train, download=True)
        except Exception as err:  # network errors come in many types; all mean the same to the user
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise EosbranchError(f"data.root: could not download CIFAR-10 into {root}: {msg}") from None
    if not p.verify:
        # Only the files torchvision will unpickle for this split.
        for f in (_CIFAR_FILES[:5] if train else ["test_batch"]) + ["batches.meta"]:
            _scan_cifar_file(folder / f)
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError:
        # The files exist (checked above), so torchvision's "not found or corrupted" means md5.
        raise EosbranchError(
            f"data.root: the files in {folder} do not match CIFAR-10's md5 checksums (corrupt or "
            "a different copy); re-extract the official archive, or, for a deliberately small copy "
            "in the same format, set verify: false"
        ) from None


def _cifar_part(p: Cifar10Params, train: bool, n: int | None):
    ds = _open_cifar10(p, train)
    targets = np.asarray(ds.targets)
    where = "data.n" if train else "data.n_test"
    what = "training images" if train else "test images"
    idx = first_per_class(targets, p.classes, None if n is None else n // 2, what, where)
    # torchvision keeps images as HWC uint8; back to CHW, then /255 and per-channel standardise.
    x = ds.data[idx].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    mean = np.asarray(CIFAR_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD).reshape(1, 3, 1, 1)
    X = torch.from_numpy((x - mean) / std)
    return X, remap(targets[idx], p.classes), idx, ds.classes


@DATASETS.register("cifar10", Cifar10Params)
def cifar10(p: Cifar10Params) -> Dataset:
    """A CIFAR-10 class pair through torchvision's loader: first n/2 images per class, in file order."""
    X, y, idx, names = _cifar_part(p, True, p.n)
    info = {"indices": torch.from_numpy(idx), "label_names": tuple(names[c] for c in p.classes)}
    X_test = y_test = None
    if p.n_test is not None:
        X_test, y_test, test_idx, _ = _cifar_part(p, False, p.n_test)
        info["test_indices"] = torch.from_numpy(test_idx)
    return Dataset(X, y, X_test, y_test, "classification", 2, (3, 32, 32), tuple(p.classes), info)
