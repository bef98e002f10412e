"""Groups of training examples: a registry of group kinds, applied in list order (DESIGN §2).

A group spec is a ``{kind: ..., **params}`` mapping, a list of them, or the name of a catalog
entry (``groups/<name>.yaml``, the same shape a user writes inline). :func:`resolve` applies the
kinds in order to the data; each kind takes the evolving :class:`Resolved` state and returns a new
one, so a kind may rebuild the data (``prototypes`` removes source points and appends constructed
ones) or only name indices (``class``, ``indices``, ``random``, ``opposing``).

Geometry (centroids, distances, displacements) is computed in float64 on ``X.flatten(1)``, the
flattened input space; constructed points are cast back to the input dtype and reshaped to the
input shape. Adding a kind is one decorated function and one YAML file::

    @GROUP_KINDS.register("my_kind", MyParams)
    def my_kind(state: Resolved, p: MyParams, where: str) -> Resolved: ...

``where`` (e.g. ``groups[1]``) prefixes the kind's one-line errors. Medians are the usual
ones (mean of the two middle values for an even count), as numpy and pandas compute them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field, model_validator

from .errors import SpecError
from .registry import Params, Registry

GROUP_KINDS = Registry("group kind")

PROTOTYPE_ROLES = ("inlier", "boundary", "input_outlier", "output_outlier")


@dataclass
class Resolved:
    """The data after group construction, and the groups that index it."""

    X: torch.Tensor  # (N, *input_shape), same dtype as the input X
    y: torch.Tensor  # labels after construction (label flips applied)
    groups: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> sorted LongTensor into X
    info: dict = field(default_factory=dict)  # mu, v_diff, centroid_distance, origin, distance_ratio
    train: torch.Tensor | None = None  # LongTensor: indices of X used for training


# ------------------------------------------------------------------------------------ spec forms


def _catalog_or_file(name: str) -> tuple[Any, str]:
    from .catalog import entry_path
    from .spec import read_yaml

    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return read_yaml(path), str(path)
    path = entry_path("groups", name)
    return read_yaml(path), str(path)


def load_group_spec(section: Any, source: str = "") -> list[dict]:
    """Any group spec form -> the validated list of ``{kind, **params}`` dicts, defaults filled.

    ``section`` is ``None`` (no groups), one mapping, a list of mappings, or a string naming a
    catalog entry (or a ``.yaml`` file); a string inside a list expands that entry in place.
    """
    items = _expand(section, source, seen=())
    out = []
    for item, src, where in items:
        entry, params = GROUP_KINDS.parse(item, where, src)
        out.append({"kind": entry.name, **params.model_dump(mode="json")})
    return out


def _expand(section: Any, source: str, seen: tuple) -> list[tuple[Any, str, str]]:
    """Flatten to ``(mapping, source, where)`` triples; ``where`` is ``groups`` or ``groups[i]``."""
    prefix = f"{source}: " if source else ""
    if section is None:
        return []
    if isinstance(section, str):
        if section in seen:
            raise SpecError(f"{prefix}groups: catalog entry {section!r} includes itself")
        raw, src = _catalog_or_file(section)
        if raw is None:
            raise SpecError(f"{src}: groups: the file is empty")
        return _expand(raw, src, seen + (section,))
    if isinstance(section, dict):
        return [(section, source, "groups")]
    if isinstance(section, list):
        out = []
        for i, item in enumerate(section):
            if isinstance(item, str):
                out += _expand(item, source, seen)
            elif isinstance(item, dict):
                out.append((item, source, f"groups[{i}]"))
            else:
                raise SpecError(
                    f"{prefix}groups[{i}]: expected a mapping with a 'kind' field or a catalog name, "
                    f"got {type(item).__name__}"
                )
        return out
    raise SpecError(
        f"{prefix}groups: expected a mapping, a list of mappings or a catalog name, "
        f"got {type(section).__name__}"
    )


# ---------------------------------------------------------------------------------------- resolve


def resolve(spec: Any, X: Any, y: Any = None, source: str = "") -> Resolved:
    """Apply a group spec to data ``(X, y)``; returns the constructed data, groups and geometry.

    ``X`` may also be a :class:`eosbranch.data.Dataset` (then ``y`` is taken from it). ``info``
    always holds ``mu`` (class centroids of the training points, or of the prototype base set),
    ``v_diff = mu[1] - mu[0]`` for two classes, ``centroid_distance`` = ‖x_i − μ_{y_i}‖ per row
    of the returned X, and ``origin``: the row of the input X each returned row comes from.
    """
    if y is None and hasattr(X, "X") and hasattr(X, "y"):
        X, y = X.X, X.y
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.ndim < 2 or len(X) != len(y):
        raise SpecError(f"groups: need X of shape (N, ...) and N labels; got X {tuple(X.shape)}, y {tuple(y.shape)}")
    n = len(X)
    state = Resolved(X, y, {}, {"origin": torch.arange(n)}, torch.arange(n))
    for mapping, src, where in _expand(spec, source, seen=()):
        entry, params = GROUP_KINDS.parse(mapping, where, src)
        state = entry.fn(state, params, f"{src}: {where}" if src else where)
    return _finish(state)


def _add_group(groups: dict, name: str, idx, where: str) -> None:
    """Add a group (sorted, unique indices), refusing a name that is already taken."""
    if name in groups:
        raise SpecError(f"{where}: duplicate group name {name!r}; each group needs its own name")
    groups[name] = torch.as_tensor(np.unique(np.asarray(idx, dtype=np.int64)), dtype=torch.long)


def _flat64(X: torch.Tensor) -> torch.Tensor:
    return X.flatten(1).to(torch.float64)


def _is_classification(y: torch.Tensor) -> bool:
    return y.ndim == 1 and not torch.is_floating_point(y)


def _centroids(Xf: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Class centroids over ``rows`` ([C, D], C = max label + 1; one row if y is not labels)."""
    Xr = Xf[rows]
    if not _is_classification(y):
        return Xr.mean(0, keepdim=True)
    yr = y[rows]
    C = int(y.max()) + 1 if len(y) else 0
    return torch.stack([Xr[yr == c].mean(0) for c in range(C)])


def _finish(state: Resolved) -> Resolved:
    info = dict(state.info)
    Xf = _flat64(state.X)
    if "mu" not in info:
        info["mu"] = _centroids(Xf, state.y, state.train)
        if len(info["mu"]) == 2:
            info["v_diff"] = info["mu"][1] - info["mu"][0]
    mu = info["mu"]
    own = mu[state.y] if _is_classification(state.y) else mu[0].expand_as(Xf)
    info["centroid_distance"] = torch.linalg.vector_norm(Xf - own, dim=1)
    return replace(state, info=info)


def _two_class(y: torch.Tensor, where: str, kind: str) -> None:
    if not _is_classification(y):
        raise SpecError(f"{where}.kind: {kind} needs two-class labels 0 and 1, got {y.dtype} targets of shape {tuple(y.shape)}")
    labels = sorted(torch.unique(y).tolist())
    if labels != [0, 1]:
        raise SpecError(
            f"{where}.kind: {kind} needs two-class data (labels 0 and 1), "
            f"got {len(labels)} classes {labels}"
        )


def _check_indices(idx: list[int], n: int, where: str, field_name: str) -> None:
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise SpecError(f"{where}.{field_name}: index {bad[0]} is out of range; the data has {n} points (0..{n - 1})")


# ------------------------------------------------------------------------------------ prototypes


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
    _two_class(state.y, where, "prototypes")
    X, y = state.X, state.y
    Xf = _flat64(X)
    n = len(X)
    train = state.train
    used = torch.zeros(n, dtype=torch.bool)
    for idx in state.groups.values():
        used[idx] = True
    in_train = torch.zeros(n, dtype=torch.bool)
    in_train[train] = True
    eligible = in_train & ~used

    # Step 1: centroids of the training points; boundary pool per class.
    mu_all = _centroids(Xf, y, train)
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
    mu = _centroids(Xf[keep], y[keep], base_train)
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
                z = _orthogonal_units(len(idx), v_diff, p.seed, where)
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
        _add_group(groups, getattr(p.names, role), idx, f"{where}.names.{role}")
        appended.append(idx)
        start += len(Xg)
    train_new = base_train if p.mode == "heldout" else torch.cat([base_train, *appended])
    return Resolved(X_new, y_new, groups, info, torch.sort(train_new).values)


def _orthogonal_units(m: int, v: torch.Tensor, seed: int, where: str) -> torch.Tensor:
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


# -------------------------------------------------------------------------------- class, indices


class ClassParams(Params):
    label: int
    name: Optional[str] = Field(None, description="defaults to class_<label>")


@GROUP_KINDS.register("class", ClassParams)
def class_group(state: Resolved, p: ClassParams, where: str) -> Resolved:
    """All points whose (current) label is ``label``."""
    if not _is_classification(state.y):
        raise SpecError(f"{where}.label: class groups need class labels, got {state.y.dtype} targets")
    idx = torch.nonzero(state.y == p.label).flatten()
    if len(idx) == 0:
        present = sorted(torch.unique(state.y).tolist())
        raise SpecError(f"{where}.label: no point has label {p.label}; labels present: {present}")
    groups = dict(state.groups)
    _add_group(groups, p.name if p.name is not None else f"class_{p.label}", idx, f"{where}.name")
    return replace(state, groups=groups)


class IndicesParams(Params):
    name: str
    indices: list[int] = Field(min_length=1)


@GROUP_KINDS.register("indices", IndicesParams)
def indices_group(state: Resolved, p: IndicesParams, where: str) -> Resolved:
    """Explicit indices into the data as it stands at this point of the list."""
    _check_indices(p.indices, len(state.X), where, "indices")
    groups = dict(state.groups)
    _add_group(groups, p.name, p.indices, f"{where}.name")
    return replace(state, groups=groups)


class TokenParams(Params):
    position: int = Field(ge=0, description="which token of the input sequence (modular: 0 is a, 1 is b)")
    value: int = Field(ge=0)
    name: Optional[str] = Field(None, description="defaults to token<position>_<value>")


@GROUP_KINDS.register("token", TokenParams)
def token_group(state: Resolved, p: TokenParams, where: str) -> Resolved:
    """All points whose input token at ``position`` equals ``value`` (token-sequence data such as
    ``modular`` with ``encoding: tokens``: group by operand, e.g. every pair with a = 3)."""
    if state.X.ndim != 2 or p.position >= state.X.shape[1]:
        raise SpecError(f"{where}.position: token groups need inputs of shape (N, length) with length > "
                        f"{p.position}; got {tuple(state.X.shape)}")
    idx = torch.nonzero(state.X[:, p.position] == p.value).flatten()
    if len(idx) == 0:
        raise SpecError(f"{where}.value: no point has token {p.value} at position {p.position}")
    groups = dict(state.groups)
    _add_group(groups, p.name if p.name is not None else f"token{p.position}_{p.value}", idx, f"{where}.name")
    return replace(state, groups=groups)


# ----------------------------------------------------------------------------------------- random


class RandomParams(Params):
    name: str = "random"
    size: Optional[int] = Field(None, ge=1)
    size_like: Optional[str] = Field(None, description="take the size of this (earlier) group")
    exclude: list[str] = Field(default_factory=list, description="groups whose points are not drawn")
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self):
        if (self.size is None) == (self.size_like is None):
            raise ValueError("give exactly one of size or size_like")
        return self


@GROUP_KINDS.register("random", RandomParams)
def random_group(state: Resolved, p: RandomParams, where: str) -> Resolved:
    """A seeded draw of training points, outside the ``exclude`` groups (a size-matched control)."""
    for fname, names in (("size_like", [p.size_like] if p.size_like else []), ("exclude", p.exclude)):
        for g in names:
            if g not in state.groups:
                have = ", ".join(state.groups) or "none yet"
                raise SpecError(f"{where}.{fname}: no group named {g!r} earlier in the list; defined: {have}")
    size = p.size if p.size is not None else len(state.groups[p.size_like])
    mask = torch.zeros(len(state.X), dtype=torch.bool)
    mask[state.train] = True
    for g in p.exclude:
        mask[state.groups[g]] = False
    cand = torch.nonzero(mask).flatten()
    if size > len(cand):
        field_name = "size" if p.size is not None else "size_like"
        raise SpecError(f"{where}.{field_name}: a group of {size} points, but only {len(cand)} training points are outside the excluded groups")
    g = torch.Generator().manual_seed(p.seed)
    idx = cand[torch.randperm(len(cand), generator=g)[:size]]
    groups = dict(state.groups)
    _add_group(groups, p.name, idx, f"{where}.name")
    return replace(state, groups=groups)


# --------------------------------------------------------------------------------------- opposing


class OpposingParams(Params):
    name_rise: str = "opposing_rise"
    name_fall: str = "opposing_fall"
    indices_rise: Optional[list[int]] = Field(None, min_length=1)
    indices_fall: Optional[list[int]] = Field(None, min_length=1)
    run: Optional[str] = Field(None, description="detect the pair in this run directory's loss changes")
    step: int | Literal["onset"] = Field("onset", description="with run: the step T ranked by l_i(T+1) - l_i(T), "
                                                                "or 'onset' (the run's t*)")
    top: int = Field(20, ge=1, description="with run: points per group (the top rises and the top falls)")


@GROUP_KINDS.register("opposing", OpposingParams)
def opposing(state: Resolved, p: OpposingParams, where: str) -> Resolved:
    """A pair of opposing-signal groups: given by index, or detected in a run (``run``, ``step``,
    ``top``) as its top-m loss rises and falls over step T -> T+1, exactly as ``eosbranch opposing``
    finds them. The run must have been trained on the same data, since the indices are its rows."""
    n = len(state.X)
    rise, fall = p.indices_rise, p.indices_fall
    if p.run is not None:
        given = [f for f, v in (("indices_rise", rise), ("indices_fall", fall)) if v is not None]
        if given:
            raise SpecError(f"{where}.{given[0]}: give either a run to detect the pair in or indices_rise and "
                            "indices_fall, not both")
        rise, fall = _detect_opposing(state, p, where)
    else:
        for f, v in (("indices_rise", rise), ("indices_fall", fall)):
            if v is None:
                raise SpecError(f"{where}.{f}: missing; give indices_rise and indices_fall, or a run to detect them in")
    _check_indices(rise, n, where, "indices_rise")
    _check_indices(fall, n, where, "indices_fall")
    both = sorted(set(rise) & set(fall))
    if both:
        raise SpecError(f"{where}.indices_fall: index {both[0]} is also in indices_rise; a point cannot both rise and fall")
    groups = dict(state.groups)
    _add_group(groups, p.name_rise, rise, f"{where}.name_rise")
    _add_group(groups, p.name_fall, fall, f"{where}.name_fall")
    return replace(state, groups=groups)


def _detect_opposing(state: Resolved, p: OpposingParams, where: str) -> tuple[list[int], list[int]]:
    from .errors import EosbranchError
    from .opposing import find

    path = Path(p.run).expanduser()
    if not (path / "spec.yaml").is_file():
        raise SpecError(f"{where}.run: no run directory at {p.run} (it has no spec.yaml)")
    try:
        res = find(str(path), p.step, top=p.top, window=2)
    except EosbranchError as err:
        raise SpecError(f"{where}: {err}") from None
    # The indices name rows of the run's data (held in its own dtype; resolution works in float64).
    X, y = res.data.X.cpu(), res.data.y.cpu()
    if not (X.shape == state.X.shape and torch.equal(X, state.X.to(X.dtype).cpu())
            and torch.equal(y, state.y.to(y.dtype).cpu())):
        raise SpecError(f"{where}.run: {p.run} was trained on other data ({len(X)} points) than this "
                        f"spec has here ({len(state.X)} points); the pair's indices would name other points")
    return res.group_spec["indices_rise"], res.group_spec["indices_fall"]


# --------------------------------------------------------------------------------------- describe

DESCRIBE_COLUMNS = ["group", "size", "class_0", "class_1", "median_centroid_distance", "distance_ratio"]


def describe(resolved: Resolved):
    """One row per group: size, class counts (current labels), median centroid distance, and
    ``distance_ratio`` for a random-orthogonal input-outlier group (median over its points of
    ‖x_rand − μ_y‖ / ‖x_coherent − μ_y‖, the coherent construction of the same sources; NaN
    elsewhere)."""
    import pandas as pd

    y = resolved.y
    dist = resolved.info["centroid_distance"]
    ratios = resolved.info.get("distance_ratio", {})
    rows = []
    for name, idx in resolved.groups.items():
        labels = y[idx]
        counts = (
            (int((labels == 0).sum()), int((labels == 1).sum())) if _is_classification(y) else (math.nan, math.nan)
        )
        rows.append({
            "group": name,
            "size": len(idx),
            "class_0": counts[0],
            "class_1": counts[1],
            "median_centroid_distance": float(np.median(dist[idx].numpy())) if len(idx) else math.nan,
            "distance_ratio": ratios.get(name, math.nan),
        })
    return pd.DataFrame(rows, columns=DESCRIBE_COLUMNS)
