"""The ``prototypes`` group kind: the 2026 study's taxonomy (DESIGN §2) of inlier, boundary,
input-outlier and output-outlier points, constructed from a two-class data set.

Sources are drawn among the training points, removed, and the four groups appended as constructed
points (input outliers displaced along the class-centroid difference ``v_diff``, or along a seeded
random direction orthogonal to it; output outliers relabelled). Constructed points are computed in
float64 on the flattened inputs, then cast back to the input dtype and reshaped to the input shape.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from .errors import SpecError
from .group_kind import GROUP_KINDS, Resolved, add_group, centroids, flat64, two_class
from .registry import Params

PROTOTYPE_ROLES = ("inlier", "boundary", "input_outlier", "output_outlier")



class PrototypeNames(Params):
    inlier: str = "inlier"
    boundary: str = "boundary"
    input_outlier: str = "input_outlier"
    output_outlier: str = "output_outlier"


class PrototypesParams(Params):
    per_class: int = Field(25, ge=1, description="points per class in each of the four groups")
    alpha: float = Field(3.0, ge=0.0, description="input-outlier displacement, in units of v_diff")
    direction: Literal["coherent", "random_orthogonal"] = "coherent"
    boundary_rule: Literal["knn", "centroid"] = "knn"
    knn_k: int = Field(32, ge=1)
    mode: Literal["train", "heldout"] = "train"
    seed: int = Field(0, description="draws z for random_orthogonal; coherent ignores it")
    names: PrototypeNames = Field(default_factory=PrototypeNames)


def _knn_mix(xn: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, k: int, chunk: int = 1024) -> np.ndarray:
    """|2·#class-1 neighbours − k| for each of ``rows`` (0 = a 50/50 mix), among all of ``xn``.

    ``xn`` are L2-normalised inputs, so the nearest neighbours are the largest cosines.
    """
    out = []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        sims = xn[r] @ xn.T
        sims[torch.arange(len(r)), r] = -math.inf  # a point is not its own neighbour
        nb = sims.topk(k, dim=1).indices
        ones = (y[nb] == 1).sum(1)
        out.append((2 * ones - k).abs())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


@GROUP_KINDS.register("prototypes", PrototypesParams)
def prototypes(state: Resolved, p: PrototypesParams, where: str) -> Resolved:
    """The 2026 study's taxonomy (DESIGN §2): inlier, boundary, input_outlier, output_outlier.

    Sources are drawn among training points not already in a group (so earlier groups keep
    their meaning and only shift index), ties broken by index. The appended block holds the
    four groups in that order, class 0 before class 1 within each.
    """
    two_class(state.y, where, "prototypes")
    X, y = state.X, state.y
    Xf = flat64(X)
    n = len(X)
    train = state.train
    used = torch.zeros(n, dtype=torch.bool)
    for idx in state.groups.values():
        used[idx] = True
    in_train = torch.zeros(n, dtype=torch.bool)
    in_train[train] = True
    eligible = in_train & ~used

    # Step 1: centroids of the training points; boundary pool per class.
    mu_all = centroids(Xf, y, train)
    if p.boundary_rule == "knn" and p.knn_k > len(train) - 1:
        raise SpecError(f"{where}.knn_k: {p.knn_k} neighbours requested, but only {len(train) - 1} other training points exist")
    if p.boundary_rule == "knn":
        xn = Xf[train] / torch.linalg.vector_norm(Xf[train], dim=1, keepdim=True).clamp_min(1e-300)
    P = p.per_class
    sources = {role: [] for role in PROTOTYPE_ROLES}
    for c in (0, 1):
        cand = torch.nonzero(eligible & (y == c)).flatten()
        n_train_c = int((in_train & (y == c)).sum())
        available = min(len(cand), n_train_c - 1)  # one point of each class stays in the base set
        if 4 * P > available:
            taken = int((used & in_train & (y == c)).sum())
            hint = f"; {taken} are in earlier groups, so list prototypes first" if taken else ""
            raise SpecError(
                f"{where}.per_class: {P} per group needs {4 * P} points of class {c} (4 groups), "
                f"but only {available} are available (one point of each class stays in the base set{hint})"
            )
        d_other = torch.linalg.vector_norm(Xf[cand] - mu_all[1 - c], dim=1).numpy()
        if p.boundary_rule == "knn":
            pos = torch.searchsorted(train, cand)  # rows of cand within the (sorted) train set
            mix = _knn_mix(xn, y[train], pos, p.knn_k)
            order = np.lexsort((cand.numpy(), d_other, mix))
        else:
            order = np.lexsort((cand.numpy(), d_other))
        boundary = cand[torch.from_numpy(order[:P])]
        rest = cand[torch.from_numpy(np.sort(order[P:]))]
        # Step 2: inlier pool sorted by distance to the own centroid; consecutive slices.
        d_own = torch.linalg.vector_norm(Xf[rest] - mu_all[c], dim=1).numpy()
        pool = rest[torch.from_numpy(np.lexsort((rest.numpy(), d_own)))]
        sources["boundary"].append(boundary)
        sources["inlier"].append(pool[:P])
        sources["output_outlier"].append(pool[P : 2 * P])
        sources["input_outlier"].append(pool[2 * P : 3 * P])
    src = {role: torch.cat(sources[role]) for role in PROTOTYPE_ROLES}
    src_labels = {role: y[src[role]] for role in PROTOTYPE_ROLES}

    # Step 3: remove all sources; recompute the centroids on the base (training) set.
    removed = torch.zeros(n, dtype=torch.bool)
    for idx in src.values():
        removed[idx] = True
    keep = torch.nonzero(~removed).flatten()
    new_pos = torch.full((n,), -1, dtype=torch.long)
    new_pos[keep] = torch.arange(len(keep))
    base_train = new_pos[train[~removed[train]]]
    mu = centroids(Xf[keep], y[keep], base_train)
    v_diff = mu[1] - mu[0]

    # Step 4: construct.
    shape = X.shape[1:]
    blocks_X, blocks_y, blocks_origin = [], [], []
    info = dict(state.info)
    for role in PROTOTYPE_ROLES:
        idx, lab = src[role], src_labels[role]
        Xg, yg = X[idx].clone(), lab.clone()
        if role == "output_outlier":
            yg = 1 - lab
        elif role == "input_outlier":
            sign = (2 * lab - 1).to(torch.float64).unsqueeze(1)  # −1 for class 0, +1 for class 1
            x = Xf[idx]
            coherent = x + sign * p.alpha * v_diff
            if p.direction == "coherent":
                moved = coherent
                # Lets a fork move them to a random orthogonal direction (interventions.random_direction).
                info["alpha"] = {**info.get("alpha", {}), p.names.input_outlier: p.alpha}
            else:
                z = orthogonal_units(len(idx), v_diff, p.seed, where)
                moved = x + p.alpha * torch.linalg.vector_norm(v_diff) * z
                mu_own = mu[lab]
                ratio = torch.linalg.vector_norm(moved - mu_own, dim=1) / torch.linalg.vector_norm(coherent - mu_own, dim=1)
                info["distance_ratio"] = {**info.get("distance_ratio", {}), p.names.input_outlier: float(np.median(ratio.numpy()))}
            Xg = moved.to(X.dtype).reshape(len(idx), *shape)
        blocks_X.append(Xg)
        blocks_y.append(yg)
        blocks_origin.append(state.info["origin"][idx])

    # Step 5: append (train) or append as tracked-only (heldout).
    X_new = torch.cat([X[keep], *blocks_X])
    y_new = torch.cat([y[keep], *blocks_y])
    info["origin"] = torch.cat([state.info["origin"][keep], *blocks_origin])
    info["mu"], info["v_diff"] = mu, v_diff
    groups = {name: new_pos[idx] for name, idx in state.groups.items()}
    start = len(keep)
    appended = []
    for role, Xg in zip(PROTOTYPE_ROLES, blocks_X):
        idx = torch.arange(start, start + len(Xg))
        add_group(groups, getattr(p.names, role), idx, f"{where}.names.{role}")
        appended.append(idx)
        start += len(Xg)
    train_new = base_train if p.mode == "heldout" else torch.cat([base_train, *appended])
    return Resolved(X_new, y_new, groups, info, torch.sort(train_new).values)


def orthogonal_units(m: int, v: torch.Tensor, seed: int, where: str) -> torch.Tensor:
    """``m`` seeded random unit vectors orthogonal to ``v`` (float64, [m, D])."""
    D = len(v)
    if D < 2:
        raise SpecError(f"{where}.direction: random_orthogonal needs inputs of dimension >= 2, got {D}")
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((m, D), generator=g, dtype=torch.float64)
    nv = torch.linalg.vector_norm(v)
    if nv > 0:
        u = v / nv
        z = z - (z @ u).unsqueeze(1) * u
        z = z - (z @ u).unsqueeze(1) * u  # a second pass takes the residual to round-off
    return z / torch.linalg.vector_norm(z, dim=1, keepdim=True)
