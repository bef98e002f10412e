"""The table of models every curvature route is checked against (tests/test_backends.py): one
tiny float64 instance per kind of model, with the backend ``select_backend`` must pick on auto and
the routes the model qualifies for.

- ``mlp``: Flatten, Linear, Tanh, Linear, Sigmoid, Linear: every route;
- ``input_linear``: a first Linear, then a Softmax (not elementwise): input_linear and autograd;
- ``cnn``: Conv2d first: autograd only;
- ``two_branch``: a non-Sequential module (two Linear branches summed): autograd only;
- ``token_pool``: Linear over the last axis of [n, tokens, features], Tanh, mean over tokens,
  Linear: the first Linear's rows are tokens, so autograd only (auto used to crash here);
- ``transformer`` and ``vit``: eosbranch.transformer's models: autograd only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from eosbranch.data import load_data
from eosbranch.models import build_model

F64 = torch.float64


class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))


class MeanOverTokens(nn.Module):
    def forward(self, x):
        return x.mean(1)


@dataclass
class Case:
    name: str
    model: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    auto: str                    # the backend auto must pick
    routes: list[str] = field(default_factory=lambda: ["generic"])  # Context curvature methods that apply
    third: bool = True           # the dense third-derivative oracle is cheap enough here

    @property
    def groups(self) -> dict:
        n = self.X.shape[0]
        return {"a": torch.arange(0, 6), "b": torch.arange(3, n, 3), "c": torch.tensor([1, n - 1])}


def _data(shape, n=20, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, classes, (n,), generator=g)


def _transformer(kind: str):
    if kind == "transformer":
        ds = load_data({"kind": "modular", "p": 5, "train_fraction": 0.8})
        spec = {"kind": "transformer", "d_model": 8, "heads": 2, "mlp_ratio": 1, "depth": 1}
        X, y, shape, out = ds.X, ds.y, ds.input_shape, ds.num_outputs
    else:
        X, y = _data((16,), n=18)
        shape, out = (16,), 3
        spec = {"kind": "vit", "patch": 2, "d_model": 8, "heads": 2, "mlp_ratio": 1, "pool": "cls"}
    model = build_model(spec, shape, out).to(F64)
    return model, X.to(F64), y


def make(name: str) -> Case:
    """A fresh instance of case ``name`` (seeded: the same numbers every call)."""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Sigmoid(),
                              nn.Linear(4, 3)).to(F64)
        return Case(name, model, *_data((2, 3)), "mlp", ["auto", "taylor", "input_layer", "generic"])
    if name == "input_linear":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Softmax(-1), nn.Linear(4, 3)).to(F64)
        return Case(name, model, *_data((5,)), "input_linear", ["auto", "input_layer", "generic"])
    if name == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(F64)
        return Case(name, model, *_data((1, 4, 4)), "autograd", ["auto", "generic"])
    if name == "two_branch":
        return Case(name, TwoBranch().to(F64), *_data((5,)), "autograd", ["auto", "generic"])
    if name == "token_pool":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), MeanOverTokens(), nn.Linear(6, 3)).to(F64)
        return Case(name, model, *_data((5, 4)), "autograd", ["auto", "generic"])
    if name in ("transformer", "vit"):
        return Case(name, *_transformer(name), "autograd", ["auto", "generic"], third=False)
    raise KeyError(name)


NAMES = ["mlp", "input_linear", "cnn", "two_branch", "token_pool", "transformer", "vit"]
