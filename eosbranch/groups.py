"""Groups of training examples: a registry of group kinds, applied in list order (DESIGN §2).

A group spec is a ``{kind: ..., **params}`` mapping, a list of them, or the name of a catalog
entry (``groups/<name>.yaml``, the same shape a user writes inline). :func:`resolve` applies the
kinds in order to the data; each kind takes the evolving :class:`Resolved` state and returns a new
one, so a kind may rebuild the data (``prototypes``, in ``prototypes.py``, removes source points and
appends constructed ones) or only name indices (``class``, ``indices``, ``token``, ``random`` here;
``opposing`` in ``opposing_kind.py``). The state and the registry are in ``group_kind.py``.

Geometry (centroids, distances) is computed in float64 on ``X.flatten(1)``, the flattened input
space. Adding a kind is one decorated function and one YAML file::

    @GROUP_KINDS.register("my_kind", MyParams)
    def my_kind(state: Resolved, p: MyParams, where: str) -> Resolved: ...

``where`` (e.g. ``groups[1]``) prefixes the kind's one-line errors. Medians are the usual
ones (mean of the two middle values for an even count), as numpy and pandas compute them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from .catalog import entry_path
from .errors import SpecError
from .group_kind import (GROUP_KINDS, Resolved, add_group, centroids, check_indices, flat64,
                         is_classification)
from .opposing_kind import OpposingParams, opposing  # noqa: F401  (registers `opposing`)
from .prototypes import PROTOTYPE_ROLES, PrototypesParams, prototypes  # noqa: F401  (registers `prototypes`)
# interventions.random_direction draws its directions with the prototypes' construction.
from .prototypes import orthogonal_units as _orthogonal_units  # noqa: F401
from .registry import Params
from .yaml_file import read_yaml

# ------------------------------------------------------------------------------------ spec forms


def _catalog_or_file(name: str) -> tuple[Any, str]:
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


def _finish(state: Resolved) -> Resolved:
    info = dict(state.info)
    Xf = flat64(state.X)
    if "mu" not in info:
        info["mu"] = centroids(Xf, state.y, state.train)
        if len(info["mu"]) == 2:
            info["v_diff"] = info["mu"][1] - info["mu"][0]
    mu = info["mu"]
    own = mu[state.y] if is_classification(state.y) else mu[0].expand_as(Xf)
    info["centroid_distance"] = torch.linalg.vector_norm(Xf - own, dim=1)
    return replace(state, info=info)


# -------------------------------------------------------------------------------- class, indices


class ClassParams(Params):
    label: int
    name: Optional[str] = Field(None, description="defaults to class_<label>")


@GROUP_KINDS.register("class", ClassParams)
def class_group(state: Resolved, p: ClassParams, where: str) -> Resolved:
    """All points whose (current) label is ``label``."""
    if not is_classification(state.y):
        raise SpecError(f"{where}.label: class groups need class labels, got {state.y.dtype} targets")
    idx = torch.nonzero(state.y == p.label).flatten()
    if len(idx) == 0:
        present = sorted(torch.unique(state.y).tolist())
        raise SpecError(f"{where}.label: no point has label {p.label}; labels present: {present}")
    groups = dict(state.groups)
    add_group(groups, p.name if p.name is not None else f"class_{p.label}", idx, f"{where}.name")
    return replace(state, groups=groups)


class IndicesParams(Params):
    name: str
    indices: list[int] = Field(min_length=1)


@GROUP_KINDS.register("indices", IndicesParams)
def indices_group(state: Resolved, p: IndicesParams, where: str) -> Resolved:
    """Explicit indices into the data as it stands at this point of the list."""
    check_indices(p.indices, len(state.X), where, "indices")
    groups = dict(state.groups)
    add_group(groups, p.name, p.indices, f"{where}.name")
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
    add_group(groups, p.name if p.name is not None else f"token{p.position}_{p.value}", idx, f"{where}.name")
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
    add_group(groups, p.name, idx, f"{where}.name")
    return replace(state, groups=groups)


# --------------------------------------------------------------------------------------- describe

DESCRIBE_COLUMNS = ["group", "size", "class_0", "class_1", "median_centroid_distance", "distance_ratio"]


def describe(resolved: Resolved):
    """One row per group: size, class counts (current labels), median centroid distance, and
    ``distance_ratio`` for a random-orthogonal input-outlier group (median over its points of
    ‖x_rand − μ_y‖ / ‖x_coherent − μ_y‖, the coherent construction of the same sources; NaN
    elsewhere)."""
    y = resolved.y
    dist = resolved.info["centroid_distance"]
    ratios = resolved.info.get("distance_ratio", {})
    rows = []
    for name, idx in resolved.groups.items():
        labels = y[idx]
        counts = (
            (int((labels == 0).sum()), int((labels == 1).sum())) if is_classification(y) else (math.nan, math.nan)
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
