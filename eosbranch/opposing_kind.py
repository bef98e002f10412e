"""The ``opposing`` group kind: a pair of opposing-signal groups, given by index or read from the
pair that ``eosbranch opposing`` found in a run and saved as ``RUN/opposing_groups.yaml``.

Resolving a spec never replays a run: the kind with ``run`` reads the saved pair, checks that it
was found at the requested step with the requested size and on the same data (its ``data_sha256``),
and otherwise stops in one line naming the ``eosbranch opposing`` command that finds it.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import pandas as pd
import torch
from pydantic import Field

from .errors import EosbranchError, SpecError
from .group_kind import GROUP_KINDS, Resolved, add_group, check_indices
from .registry import Params
from .store import SPEC, RunStore
from .yaml_file import read_yaml

OPPOSING_GROUPS = "opposing_groups.yaml"  # written by `eosbranch opposing` into the run directory


class OpposingParams(Params):
    name_rise: str = "opposing_rise"
    name_fall: str = "opposing_fall"
    indices_rise: Optional[list[int]] = Field(None, min_length=1)
    indices_fall: Optional[list[int]] = Field(None, min_length=1)
    run: Optional[str] = Field(None, description="read the pair `eosbranch opposing` found in this run directory")
    step: int | Literal["onset"] = Field("onset", description="with run: the step T ranked by l_i(T+1) - l_i(T), "
                                                                "or 'onset' (the run's t*)")
    top: int = Field(20, ge=1, description="with run: points per group (the top rises and the top falls)")
    data_sha256: Optional[str] = Field(None, description="with indices: the data they name (eosbranch opposing "
                                                         "writes it), checked against the data here")


def data_digest(X: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of a data set's inputs and targets, inputs taken in float32 so that the data a run
    holds in its own dtype and the data a spec resolves (float64 geometry) give the same digest."""
    h = hashlib.sha256()
    X = X.detach().cpu().to(torch.float32).contiguous()
    y = y.detach().cpu()
    y = (y.to(torch.float32) if torch.is_floating_point(y) else y.to(torch.int64)).contiguous()
    for t in (X, y):
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def t_star_step(events: pd.DataFrame, run: Path) -> int:
    """The step of the run's t* event (its onset)."""
    hit = events[events.event == "t_star"]
    if hit.empty:
        raise EosbranchError(f"{run}: no t_star event (the run never reached its threshold)")
    return int(hit.step.iloc[0])


@GROUP_KINDS.register("opposing", OpposingParams)
def opposing(state: Resolved, p: OpposingParams, where: str) -> Resolved:
    """A pair of opposing-signal groups: given by index, or the pair ``eosbranch opposing`` found
    in a run (``run``, ``step``, ``top``: its top-m loss rises and falls over step T -> T+1). The
    run must have been trained on the same data, since the indices are its rows."""
    n = len(state.X)
    rise, fall, digest = p.indices_rise, p.indices_fall, p.data_sha256
    if p.run is not None:
        given = [f for f, v in (("indices_rise", rise), ("indices_fall", fall)) if v is not None]
        if given:
            raise SpecError(f"{where}.{given[0]}: give either a run to detect the pair in or indices_rise and "
                            "indices_fall, not both")
        rise, fall, digest = _saved_pair(p, where)
    else:
        for f, v in (("indices_rise", rise), ("indices_fall", fall)):
            if v is None:
                raise SpecError(f"{where}.{f}: missing; give indices_rise and indices_fall, or a run to detect them in")
    if digest is not None and digest != data_digest(state.X, state.y):
        field_name, whose = ("run", f"the pair saved in {p.run}") if p.run is not None else ("data_sha256", "the pair")
        raise SpecError(f"{where}.{field_name}: {whose} was found on other data than this spec has here "
                        f"({n} points); the pair's indices would name other points")
    check_indices(rise, n, where, "indices_rise")
    check_indices(fall, n, where, "indices_fall")
    both = sorted(set(rise) & set(fall))
    if both:
        raise SpecError(f"{where}.indices_fall: index {both[0]} is also in indices_rise; a point cannot both rise and fall")
    groups = dict(state.groups)
    add_group(groups, p.name_rise, rise, f"{where}.name_rise")
    add_group(groups, p.name_fall, fall, f"{where}.name_fall")
    return replace(state, groups=groups)


def _saved_pair(p: OpposingParams, where: str) -> tuple[list[int], list[int], Optional[str]]:
    """The pair saved in ``RUN/opposing_groups.yaml``, if it answers this entry's step and top."""
    path = Path(p.run).expanduser()
    if not (path / SPEC).is_file():
        raise SpecError(f"{where}.run: no run directory at {p.run} (it has no {SPEC})")
    command = f"`eosbranch opposing {p.run} --step {p.step} --top {p.top}`"
    f = path / OPPOSING_GROUPS
    if not f.is_file():
        raise SpecError(f"{where}.run: {p.run} has no {OPPOSING_GROUPS}; run {command} first to find the pair")
    raw = read_yaml(f)
    found = [e for e in raw if isinstance(e, dict) and e.get("kind") == "opposing"] if isinstance(raw, list) else []
    if not found:
        raise SpecError(f"{f}: no entry of kind opposing; run {command} to find the pair")
    _, saved = GROUP_KINDS.parse(found[0], "opposing", str(f))
    try:
        step = t_star_step(RunStore(path).read_table("events"), path) if p.step == "onset" else p.step
    except EosbranchError as err:
        raise SpecError(f"{where}: {err}") from None
    if (saved.step, saved.top) != (step, p.top) or saved.indices_rise is None or saved.indices_fall is None:
        asked = f"step {step} (onset)" if p.step == "onset" else f"step {step}"
        raise SpecError(f"{where}: {f} holds the pair of step {saved.step} with top {saved.top}, not {asked} with "
                        f"top {p.top}; run {command} to find that pair")
    return saved.indices_rise, saved.indices_fall, saved.data_sha256
