"""The experiment: everything built from a spec (data on the device, model, loss, optimizer),
frozen. A branch's intervention returns a new experiment (``dataclasses.replace``) instead of
changing this one, so the cached training view of the data can never be stale."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

import numpy as np
import torch

from .data import Dataset, load_data
from .errors import EosbranchError
from .groups import resolve
from .loss import get_loss
from .models import build_model
from .optimizer import Optimizer, build_optimizer
from .spec import Spec

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EosbranchError("device: cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


@dataclass(frozen=True, eq=False)
class Experiment:
    """Everything built from a spec: data on the device, model, loss, optimizer (not state)."""

    spec: Spec
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    model: torch.nn.Module
    loss_fn: Callable
    optimizer: Optimizer

    groups: dict = field(default_factory=dict)  # name -> indices into data.X
    group_info: dict = field(default_factory=dict)  # centroids, v_diff, centroid distances
    train_index: Optional[torch.Tensor] = None  # None: train on every point of data.X
    # Set by interventions (eosbranch.interventions) from a fork on:
    sample_weight: Optional[torch.Tensor] = None  # per row of data.X; loss = sum w l / sum w
    grad_hook: Optional[Callable] = None  # (exp, st, idx, per, grads, record) -> grads

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @cached_property
    def train_X(self) -> torch.Tensor:
        return self.data.X if self.train_index is None else self.data.X[self.train_index]

    @cached_property
    def train_y(self) -> torch.Tensor:
        return self.data.y if self.train_index is None else self.data.y[self.train_index]

    @property
    def train_weight(self) -> Optional[torch.Tensor]:
        w = self.sample_weight
        return w if w is None or self.train_index is None else w[self.train_index]

    def rows(self, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of data.X behind training positions ``idx`` (None: the whole training set)."""
        pos = torch.arange(self.train_X.shape[0], device=self.device) if idx is None else idx
        return pos if self.train_index is None else self.train_index[pos]

    def objective(self, per: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training loss from per-example losses at training positions ``idx``: their mean, or
        the weighted mean sum w l / sum w under a reweighting branch."""
        w = self.train_weight
        if w is None:
            return per.mean()
        w = w if idx is None else w[idx]
        return (per * w).sum() / w.sum().clamp_min(1e-30)


def build(spec: Spec) -> Experiment:
    device, dtype = resolve_device(spec.device), DTYPES[spec.dtype]
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; it reads this when its handle is
        # created, at the first matrix product, which comes after this point.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_data(spec.data)
    groups, info, train_index = {}, {}, None
    if spec.groups:
        r = resolve(spec.groups, data.X, data.y)  # on the CPU in float64: geometry is exact
        data.X, data.y = r.X, r.y
        groups, info = {k: v.to(device) for k, v in r.groups.items()}, r.info
        if r.train is not None and len(r.train) < len(r.X):
            train_index = r.train.to(device)
    data = _place(data, device, dtype)
    # Every global RNG from the seed (the model's initialisation depends on it only), so that the
    # full state a checkpoint records, Python's and NumPy's RNGs included, is the same in any process.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_outputs).to(device=device, dtype=dtype)
    return Experiment(spec, device, dtype, data, model, get_loss(spec.loss), build_optimizer(spec.optimizer),
                      groups, info, train_index)


def _place(data: Dataset, device: torch.device, dtype: torch.dtype) -> Dataset:
    """Move a data set to the run's device; inputs (and regression targets) to the run's dtype."""
    def move(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    data.X, data.y, data.X_test, data.y_test = (move(t) for t in (data.X, data.y, data.X_test, data.y_test))
    return data
