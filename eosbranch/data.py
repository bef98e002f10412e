"""Data sets: a registry from name to a loader ``(params) -> Dataset`` (DESIGN §6).

Every loader is offline by default and deterministic: the same parameters give the same tensors,
bit for bit, because measurements and forks are compared across runs. Subsets are always "the
first n in file order" or drawn from a seeded generator, never from the clock.

A spec selects a kind with ``data: {kind: digits, classes: [3, 5]}``; unknown fields are errors.
The small built-in sets are here; ``cifar10`` and ``tensors`` (a user's files) have their own
modules, and :class:`Dataset` and ``DATASETS`` live in ``dataset``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from sklearn.datasets import load_digits

from .cifar10 import Cifar10Params, cifar10  # noqa: F401  (registers `cifar10`)
from .dataset import DATASETS, Dataset, classes_ok, first_per_class, remap
from .errors import EosbranchError, SpecError
from .limits import MAX_DEGREE, MAX_DIM, MAX_POINTS
from .registry import Params
from .tensor_file import TensorsParams, _read_arrays, tensors  # noqa: F401  (registers `tensors`)


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


# --------------------------------------------------------------------------------------- digits


class DigitsParams(Params):
    classes: list[int] = [3, 5]
    n_per_class: int | None = Field(default=None, ge=1, le=MAX_POINTS)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _classes(cls, v):
        return classes_ok(v, range(10))


@DATASETS.register("digits", DigitsParams)
def digits(p: DigitsParams) -> Dataset:
    """scikit-learn's bundled 8x8 digits (real data, no download); pixels / 16 into [0, 1].

    ``n_per_class`` takes the first n images of each class in file order; ``test_fraction`` then
    holds out that share of each class (stratified, seeded), and both parts stay in file order.
    """
    raw = load_digits()
    idx = first_per_class(raw.target, p.classes, p.n_per_class, "images", "data.n_per_class")
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
        return torch.from_numpy(raw.data[ix] / 16.0), remap(raw.target[ix], p.classes)

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
