"""The ``tensors`` data set: a user's own arrays from an ``.npz`` or ``.pt`` file, read without
running code (``allow_pickle=False``, ``weights_only=True``) and with the sizes of an ``.npz``'s
members checked before anything is decompressed."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from .dataset import DATASETS, Dataset, remap
from .errors import EosbranchError, SpecError
from .registry import Params


class TensorsParams(Params):
    path: str
    task: Literal["auto", "classification", "regression"] = "auto"

    @field_validator("path")
    @classmethod
    def _suffix(cls, v):
        if Path(v).suffix.lower() not in (".npz", ".pt", ".pth"):
            raise ValueError(f"expected a .npz, .pt or .pth file, got {v!r}")
        return v


MAX_ARRAY_BYTES = 16 << 30  # the decompressed size of an .npz's members, together (issue 17)


def _check_npz_sizes(path: Path) -> None:
    """Read the zip directory only: the declared uncompressed size of every member, and the
    compression ratio (a bomb declares a huge size or lies about it; either is refused)."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        raise EosbranchError(f"{path}: not a readable .npz archive ({type(err).__name__})") from None
    total = sum(i.file_size for i in infos)
    if total > MAX_ARRAY_BYTES:
        big = max(infos, key=lambda i: i.file_size)
        raise EosbranchError(f"{path}: its arrays decompress to {total / 2**30:.1f} GiB (member {big.filename}: "
                             f"{big.file_size / 2**30:.1f} GiB), over the {MAX_ARRAY_BYTES >> 30} GiB limit; "
                             "refused before decompressing")
    for i in infos:
        if i.compress_size and i.file_size / i.compress_size > 1000 and i.file_size > 64 << 20:
            raise EosbranchError(f"{path}: member {i.filename} decompresses {i.file_size // i.compress_size}x "
                                 f"to {i.file_size / 2**20:.0f} MiB (a zip bomb?); refused before decompressing")


def _read_arrays(path: Path) -> dict:
    if path.suffix.lower() == ".npz":
        _check_npz_sizes(path)  # before any member is decompressed: a zip bomb is refused in one line
        try:
            # allow_pickle=False: an .npz with object arrays could run code when loaded.
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as err:
            raise EosbranchError(f"{path}: refused or unreadable .npz ({err})") from None
        except Exception as err:
            raise EosbranchError(f"{path}: not a readable .npz archive ({type(err).__name__})") from None
    try:
        # weights_only=True: only tensors and plain containers; a crafted pickle cannot run code.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise EosbranchError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain "
            "containers (read with weights_only=True, since arbitrary pickles can run code); "
            "save plain tensors, e.g. torch.save({'X': X, 'y': y}, path)"
        ) from None
    except Exception as err:
        raise EosbranchError(f"{path}: not a readable .pt file ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise EosbranchError(f"{path}: expected a dict with keys X, y (and optional X_test, y_test), "
                             f"got {type(obj).__name__}")
    return obj


def _as_numpy(v, path: Path, key: str) -> np.ndarray:
    try:
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    except Exception:
        raise EosbranchError(f"{path}: key {key!r} is not an array ({type(v).__name__})") from None
    if a.dtype.kind not in "biuf":
        raise EosbranchError(f"{path}: key {key!r} must hold numbers, got dtype {a.dtype}")
    return a


@DATASETS.register("tensors", TensorsParams)
def tensors(p: TensorsParams) -> Dataset:
    """A user's own arrays: ``X``, ``y``, optional ``X_test``, ``y_test`` in an .npz or a .pt dict.

    ``task: auto`` reads integer (or bool) ``y`` as class labels and anything else as regression
    targets. Class labels are remapped to 0..C-1 in sorted order; ``classes`` keeps the originals.
    """
    path = Path(os.path.expanduser(p.path))
    if not path.is_file():
        raise EosbranchError(f"data.path: file not found: {path}")
    raw = _read_arrays(path)
    for key in ("X", "y"):
        if key not in raw:
            found = ", ".join(map(str, raw)) or "none"
            raise EosbranchError(f"{path}: missing key {key!r} (found: {found})")
    if ("X_test" in raw) != ("y_test" in raw):
        have, lack = ("X_test", "y_test") if "X_test" in raw else ("y_test", "X_test")
        raise EosbranchError(f"{path}: has {have!r} but is missing key {lack!r}")
    arr = {k: _as_numpy(raw[k], path, k) for k in ("X", "y", "X_test", "y_test") if k in raw}

    task = p.task
    if task == "auto":
        task = "classification" if arr["y"].dtype.kind in "biu" else "regression"
    for k in ("X", "X_test"):
        if k in arr and arr[k].ndim == 1:
            arr[k] = arr[k][:, None]  # a 1-D X is N scalar inputs
    for xk, yk in (("X", "y"), ("X_test", "y_test")):
        if xk not in arr:
            continue
        if arr[xk].shape[1:] != arr["X"].shape[1:]:
            raise EosbranchError(
                f"{path}: {xk!r} has shape {arr[xk].shape}, inconsistent with 'X' {arr['X'].shape}"
            )
        if len(arr[xk]) != len(arr[yk]):
            raise EosbranchError(f"{path}: {xk!r} has {len(arr[xk])} rows but {yk!r} has {len(arr[yk])}")
        if not np.isfinite(arr[xk]).all():
            raise EosbranchError(f"{path}: {xk!r} contains NaN or inf")
        arr[xk] = arr[xk].astype(np.float64)

    if task == "classification":
        ys, classes = _class_labels(arr, path)
        num_outputs = len(classes)
    else:
        ys, classes = _regression_targets(arr, path), None
        num_outputs = ys["y"].shape[1]
    X = torch.from_numpy(arr["X"])
    X_test = torch.from_numpy(arr["X_test"]) if "X_test" in arr else None
    return Dataset(X, ys["y"], X_test, ys.get("y_test"), task, num_outputs,
                   tuple(X.shape[1:]), classes, {"path": str(path)})


def _class_labels(arr: dict, path: Path) -> tuple[dict, tuple[int, ...]]:
    """Integer labels remapped to 0..C-1 (sorted over train and test); also the original ids."""
    keys = [k for k in ("y", "y_test") if k in arr]
    for k in keys:
        a = arr[k]
        integral = a.dtype.kind != "f" or (np.isfinite(a).all() and (a == np.round(a)).all())
        if a.ndim != 1 or not integral:
            raise EosbranchError(f"{path}: {k!r} must be a 1-D vector of integer class labels for "
                                 f"classification (shape {a.shape}, dtype {a.dtype})")
    classes = np.unique(np.concatenate([arr[k] for k in keys])).astype(np.int64)
    if len(classes) < 2:
        raise EosbranchError(f"{path}: 'y' has a single class; classification needs at least 2")
    ys = {k: remap(arr[k].astype(np.int64), classes) for k in keys}
    return ys, tuple(int(c) for c in classes)


def _regression_targets(arr: dict, path: Path) -> dict:
    """Float64 targets of shape (N, out); a 1-D y is one output."""
    ys = {}
    for k in ("y", "y_test"):
        if k in arr:
            a = arr[k].astype(np.float64)
            a = a[:, None] if a.ndim == 1 else a.reshape(len(a), -1)
            if not np.isfinite(a).all():
                raise EosbranchError(f"{path}: {k!r} contains NaN or inf")
            ys[k] = torch.from_numpy(a)
    if "y_test" in ys and ys["y_test"].shape[1] != ys["y"].shape[1]:
        raise EosbranchError(f"{path}: 'y_test' has {ys['y_test'].shape[1]} outputs, "
                             f"'y' has {ys['y'].shape[1]}")
    return ys
