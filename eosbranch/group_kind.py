"""What a group kind works on: the :class:`Resolved` state it takes and returns, the registry
``GROUP_KINDS`` every kind is entered in, and the checks and geometry the kinds share.

Geometry (centroids, distances) is computed in float64 on ``X.flatten(1)``, the flattened input
space. The kinds themselves live in ``groups`` (class, indices, token, random), ``prototypes``
and ``opposing_kind``; ``groups`` applies them in list order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import SpecError
from .registry import Registry

GROUP_KINDS = Registry("group kind")


@dataclass
class Resolved:
    """The data after group construction, and the groups that index it."""

    X: torch.Tensor  # (N, *input_shape), same dtype as the input X
    y: torch.Tensor  # labels after construction (label flips applied)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sorted LongTensor into X
    info: dict = field(default_factory=dict)  # mu, v_diff, centroid_distance, origin, distance_ratio
    train: torch.Tensor | None = None  # LongTensor: indices of X used for training


def add_group(groups: dict, name: str, idx, where: str) -> None:
    """Add a group (sorted, unique indices), refusing a name that is already taken."""
    if name in groups:
        raise SpecError(f"{where}: duplicate group name {name!r}; each group needs its own name")
    groups[name] = torch.as_tensor(np.unique(np.asarray(idx, dtype=np.int64)), dtype=torch.long)


def flat64(X: torch.Tensor) -> torch.Tensor:
    return X.flatten(1).to(torch.float64)


def is_classification(y: torch.Tensor) -> bool:
    return y.ndim == 1 and not torch.is_floating_point(y)


def centroids(Xf: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Class centroids over ``rows`` ([C, D], C = max label + 1; one row if y is not labels)."""
    Xr = Xf[rows]
    if not is_classification(y):
        return Xr.mean(0, keepdim=True)
    yr = y[rows]
    C = int(y.max()) + 1 if len(y) else 0
    return torch.stack([Xr[yr == c].mean(0) for c in range(C)])


def two_class(y: torch.Tensor, where: str, kind: str) -> None:
    if not is_classification(y):
        raise SpecError(f"{where}.kind: {kind} needs two-class labels 0 and 1, got {y.dtype} targets of shape {tuple(y.shape)}")
    labels = sorted(torch.unique(y).tolist())
    if labels != [0, 1]:
        raise SpecError(
            f"{where}.kind: {kind} needs two-class data (labels 0 and 1), "
            f"got {len(labels)} classes {labels}"
        )


def check_indices(idx: list[int], n: int, where: str, field_name: str) -> None:
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise SpecError(f"{where}.{field_name}: index {bad[0]} is out of range; the data has {n} points (0..{n - 1})")
