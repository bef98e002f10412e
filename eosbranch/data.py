"""Data sets: a registry from name to a loader ``(params) -> Dataset`` (DESIGN §6).

Every loader is offline by default and deterministic: the same parameters give the same tensors,
bit for bit, because measurements and forks are compared across runs. Subsets are always "the
first n in file order" or drawn from a seeded generator, never from the clock.

A spec selects a kind with ``data: {kind: digits, classes: [3, 5]}``; unknown fields are errors.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from .errors import EosbranchError, SpecError
from .registry import Params, Registry
from .limits import MAX_DEGREE, MAX_DIM, MAX_POINTS

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


def load_data(section: dict | str, source: str = "") -> Dataset:
    """Validate a ``data:`` section and build the data set it names.

    Errors raised while loading (missing files, too few images) get the spec file's name in
    front, so the one-line message says where to look.
    """
    entry, params = DATASETS.parse(section, "data", source)
    try:
        return entry.fn(params)
    except EosbranchError as err:
        if not source:
            raise
        raise type(err)(f"{source}: {err}") from None


def _classes_ok(v: list[int], allowed: range, exact: int | None = None) -> list[int]:
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


def _first_per_class(labels: np.ndarray, classes, n: int | None, what: str, where: str) -> np.ndarray:
    """Indices of the first ``n`` items of each class, merged back into file order."""
    picked = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if n is not None and n > len(idx):
            raise SpecError(f"{where}: asks for {n} {what} of class {c}, but only {len(idx)} exist")
        picked.append(idx if n is None else idx[:n])
    return np.sort(np.concatenate(picked))


def _remap(labels: np.ndarray, classes) -> torch.Tensor:
    # Label k is the k-th entry of `classes`, so the spec fixes which class is "class 0".
    out = np.empty(len(labels), dtype=np.int64)
    for k, c in enumerate(classes):
        out[labels == c] = k
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------- digits


class DigitsParams(Params):
    classes: list[int] = [3, 5]
    n_per_class: int | None = Field(default=None, ge=1, le=MAX_POINTS)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        return _classes_ok(v, range(10))


@DATASETS.register("digits", DigitsParams)
def digits(p: DigitsParams) -> Dataset:
    """scikit-learn's bundled 8x8 digits (real data, no download); pixels / 16 into [0, 1].

    ``n_per_class`` takes the first n images of each class in file order; ``test_fraction`` then
    holds out that share of each class (stratified, seeded), and both parts stay in file order.
    """
    from sklearn.datasets import load_digits  # lazy: sklearn is slow to import

    raw = load_digits()
    idx = _first_per_class(raw.target, p.classes, p.n_per_class, "images", "data.n_per_class")
    test_idx = np.array([], dtype=np.int64)
    if p.test_fraction > 0:
        rng = np.random.default_rng(p.seed)
        held = []
        for c in p.classes:
            own = idx[raw.target[idx] == c]
            k = round(p.test_fraction * len(own))
            if k >= len(own):
                raise SpecError(
                    f"data.test_fraction: {p.test_fraction} leaves no training image of class {c}"
                )
            held.append(own[rng.permutation(len(own))[:k]])
        test_idx = np.sort(np.concatenate(held))
        idx = np.setdiff1d(idx, test_idx)  # sorted, so file order is kept

    def part(ix):
        return torch.from_numpy(raw.data[ix] / 16.0), _remap(raw.target[ix], p.classes)

    X, y = part(idx)
    X_test, y_test = part(test_idx) if len(test_idx) else (None, None)
    return Dataset(
        X, y, X_test, y_test, "classification", len(p.classes), (64,), tuple(p.classes),
        {"indices": torch.from_numpy(idx), "test_indices": torch.from_numpy(test_idx)},
    )


# ----------------------------------------------------------------------------------- prototypes


class PrototypesParams(Params):
    dim: int = Field(default=64, ge=1, le=MAX_DIM)
    n_per_class: int = Field(default=250, ge=1, le=MAX_POINTS)
    separation: float = Field(default=4.0, ge=0.0)
    noise: float = Field(default=1.0, gt=0.0)
    seed: int = 0
    n_test_per_class: int | None = Field(default=None, ge=1, le=MAX_POINTS)


@DATASETS.register("prototypes", PrototypesParams)
def prototypes(p: PrototypesParams) -> Dataset:
    """Two seeded Gaussian clusters, means ``±separation/2`` along a random unit direction u.

    Every direction has standard deviation ``noise``, so the signed margin along u is
    ``separation/2 + noise·N(0, 1)``: with the defaults (4, 1) about 16% of points lie within one
    noise unit of the boundary and about 2% across it — a few boundary points, most clear.
    u is random rather than an axis so no input coordinate is special. Class 0 comes first.
    """
    rng = np.random.default_rng(p.seed)
    u = rng.standard_normal(p.dim)
    u /= np.linalg.norm(u)
    means = np.stack([-0.5 * p.separation * u, 0.5 * p.separation * u])

    def draw(n):
        # Train is drawn before test, so asking for a test set never changes the training set.
        X = np.concatenate([means[c] + p.noise * rng.standard_normal((n, p.dim)) for c in (0, 1)])
        return torch.from_numpy(X), torch.arange(2).repeat_interleave(n)

    X, y = draw(p.n_per_class)
    X_test, y_test = draw(p.n_test_per_class) if p.n_test_per_class else (None, None)
    info = {"direction": torch.from_numpy(u), "means": torch.from_numpy(means)}
    return Dataset(X, y, X_test, y_test, "classification", 2, (p.dim,), (0, 1), info)


# -------------------------------------------------------------------------------------- cifar10

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
        return _classes_ok(v, range(10), exact=2)

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
    from torchvision.datasets import CIFAR10  # lazy: torchvision is slow to import

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
    idx = _first_per_class(targets, p.classes, None if n is None else n // 2, what, where)
    # torchvision keeps images as HWC uint8; back to CHW, then /255 and per-channel standardise.
    x = ds.data[idx].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    mean = np.asarray(CIFAR_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR_STD).reshape(1, 3, 1, 1)
    X = torch.from_numpy((x - mean) / std)
    return X, _remap(targets[idx], p.classes), idx, ds.classes


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


# ------------------------------------------------------------------------------------ chebyshev


class ChebyshevParams(Params):
    n: int = Field(default=20, ge=2, le=MAX_POINTS)
    degree: int = Field(default=4, ge=0, le=MAX_DEGREE)


@DATASETS.register("chebyshev", ChebyshevParams)
def chebyshev(p: ChebyshevParams) -> Dataset:
    """``n`` evenly spaced points of [-1, 1]; target T_degree(x) (the 2023 study's 1-D regression)."""
    x = torch.linspace(-1.0, 1.0, p.n, dtype=torch.float64)
    # Three-term recurrence T_{k+1} = 2x·T_k − T_{k−1}: exact at x = ±1, unlike cos(k·arccos x).
    t_prev, t = torch.ones_like(x), x.clone()
    if p.degree == 0:
        t = t_prev
    for _ in range(p.degree - 1):
        t_prev, t = t, 2 * x * t - t_prev
    info = {"degree": p.degree}
    return Dataset(x[:, None], t[:, None], None, None, "regression", 1, (1,), None, info)


# ------------------------------------------------------------------------------ linear_opposing


class LinearOpposingParams(Params):
    n: int = Field(default=4000, ge=1, le=MAX_POINTS)
    d1: int = Field(default=50, ge=1, le=MAX_DIM)
    d2: int = Field(default=100, ge=1, le=MAX_DIM)
    alpha: float = Field(default=100.0, ge=0.0)
    p: float = Field(default=0.1, gt=0.0, le=1.0)
    beta_norm: float = Field(default=5.0, ge=0.0)
    seed: int = 0

    @model_validator(mode="after")
    def _some_opposing(self):
        if round(self.p * self.n) == 0:
            raise ValueError(f"p·n = {self.p * self.n:g} rounds to no opposing points; raise p or n")
        return self


@DATASETS.register("linear_opposing", LinearOpposingParams)
def linear_opposing(p: LinearOpposingParams) -> Dataset:
    """Gaussian inputs plus an opposing signal on a fraction p of points (DESIGN §6).

    x ~ N(0, I_d1); on exactly round(p·n) seeded points x_o = sqrt(alpha/p)·s with s independent
    ±1 signs in R^d2 (so E[x_o x_oᵀ] = alpha·I), x_o = 0 elsewhere; y = βᵀx + (1/sqrt d2)·1ᵀ|x_o|
    with ‖β‖ = beta_norm in a seeded random direction. X = [x, x_o].
    """
    rng = np.random.default_rng(p.seed)
    beta = rng.standard_normal(p.d1)  # drawn first, so β does not change with n
    beta *= p.beta_norm / np.linalg.norm(beta)
    x = rng.standard_normal((p.n, p.d1))
    mask = np.zeros(p.n, dtype=bool)
    # An exact count (not Bernoulli(p)) keeps the opposing share, and so E[x_o x_oᵀ], at p.
    mask[rng.permutation(p.n)[: round(p.p * p.n)]] = True
    signs = rng.choice(np.array([-1.0, 1.0]), size=(p.n, p.d2))
    x_o = np.where(mask[:, None], math.sqrt(p.alpha / p.p) * signs, 0.0)
    y = x @ beta + np.abs(x_o).sum(axis=1) / math.sqrt(p.d2)
    X = torch.from_numpy(np.concatenate([x, x_o], axis=1))
    info = {"d1": p.d1, "d2": p.d2, "mask": torch.from_numpy(mask), "beta": torch.from_numpy(beta)}
    y = torch.from_numpy(y)[:, None]
    return Dataset(X, y, None, None, "regression", 1, (p.d1 + p.d2,), None, info)


# -------------------------------------------------------------------------------------- modular

MODULAR_OPS = {"add": lambda a, b, p: (a + b) % p, "sub": lambda a, b, p: (a - b) % p,
               "mul": lambda a, b, p: (a * b) % p}


class ModularParams(Params):
    p: int = Field(default=23, ge=2, le=1021)
    op: Literal["add", "sub", "mul"] = "add"
    train_fraction: float = Field(default=0.5, gt=0.0, le=1.0)
    seed: int = 0
    encoding: Literal["tokens", "onehot"] = "tokens"

    @model_validator(mode="after")
    def _some_training(self):
        if round(self.train_fraction * self.p * self.p) == 0:
            raise ValueError(f"train_fraction·p² = {self.train_fraction * self.p ** 2:g} rounds to no "
                             "training pair; raise train_fraction or p")
        return self


@DATASETS.register("modular", ModularParams)
def modular(p: ModularParams) -> Dataset:
    """a ∘ b mod p over all p² pairs (Power et al. 2022), target the residue class (p classes).

    Row r of the full table is the pair (a, b) = (r // p, r % p). A seeded permutation of the p²
    rows puts its first round(train_fraction·p²) rows in the training set and the rest in the test
    set; both parts are kept in row order. Layout ``encoding: tokens`` (default): X[i] = [a, b], two
    integer-valued tokens from a vocabulary of p (float64, as every data set; the ``transformer``
    model embeds them, the operation is fixed per data set so it needs no token). ``onehot``:
    X[i] = [onehot_p(a), onehot_p(b)] (2p inputs) for MLPs. ``info``: a, b (train rows), indices and
    test_indices (row numbers a·p + b), p, op.
    """
    n = p.p * p.p
    rng = np.random.default_rng(p.seed)
    perm = rng.permutation(n)
    k = round(p.train_fraction * n)
    train_idx, test_idx = np.sort(perm[:k]), np.sort(perm[k:])

    def part(rows):
        a, b = rows // p.p, rows % p.p
        y = torch.from_numpy(MODULAR_OPS[p.op](a, b, p.p).astype(np.int64))
        if p.encoding == "tokens":
            X = torch.from_numpy(np.stack([a, b], axis=1).astype(np.float64))
        else:
            X = torch.zeros(len(rows), 2 * p.p, dtype=torch.float64)
            X[torch.arange(len(rows)), torch.from_numpy(a)] = 1.0
            X[torch.arange(len(rows)), p.p + torch.from_numpy(b)] = 1.0
        return X, y

    X, y = part(train_idx)
    X_test, y_test = part(test_idx) if len(test_idx) else (None, None)
    shape = (2,) if p.encoding == "tokens" else (2 * p.p,)
    info = {"p": p.p, "op": p.op, "encoding": p.encoding, "vocab": p.p,
            "a": torch.from_numpy(train_idx // p.p), "b": torch.from_numpy(train_idx % p.p),
            "indices": torch.from_numpy(train_idx), "test_indices": torch.from_numpy(test_idx)}
    return Dataset(X, y, X_test, y_test, "classification", p.p, shape, tuple(range(p.p)), info)


# -------------------------------------------------------------------------------------- tensors


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
    import zipfile

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
    ys = {k: _remap(arr[k].astype(np.int64), classes) for k in keys}
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
