"""A branch at its fork step: the parent's exact state, replayed, checked, then changed.

:func:`start_branch` is the one way into a branch, for a new one and a resumed one alike (the
trunk resumes through the same checkpoint loading): a new branch restores the parent's newest
checkpoint at or before the fork step s, replays to s with the same loop (measurements included,
so warm starts and events match), checks the replay (its loss at s must equal the parent's
recorded loss bit for bit, before any intervention can act, since the loss at s depends only on
theta_s), then applies its interventions and saves its first checkpoint; a resumed branch loads
its own newest checkpoint and re-applies the interventions' persistent changes to the freshly
built experiment. A branch without interventions therefore reproduces its parent bit for bit.

Branch specs (``interventions/``, or a user's YAML file) have the same shape::

    name: exit_eos
    interventions: [{kind: lr, factor: 0.1}]

or ``branches: [...]`` holding several such mappings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .catalog import entry_path
from .certificate import fork_snapshot, perturbation_certificate
from .errors import EosbranchError, SpecError, format_validation_error
from .experiment import Experiment, build
from .interventions import INTERVENTIONS, Intervention
from . import surgery as _surgery  # noqa: F401  (registers the gradient_surgery intervention)
from .loop import Trainer
from .measure import solve_sharpness
from .run import Run
from .spec import load_spec, read_yaml
from .state import restore_state
from .store import LINEAGE, SPEC, RunStore


class BranchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    interventions: list[dict[str, Any]] = Field(default_factory=list)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:8]

    def compose(self, source: str = "", where: str = "") -> list[Intervention]:
        """The interventions, validated (errors name the file and the field; ``where``: this
        branch's place in its file, e.g. ``branches[1]``)."""
        out = []
        for i, section in enumerate(self.interventions):
            loc = f"{where + '.' if where else ''}interventions[{i}]"
            entry, params = INTERVENTIONS.parse(section, loc, source)
            try:
                out.append(entry.fn(params))
            except SpecError as err:  # a nested section (loss_switch.to, optimizer_switch.to): name its place
                raise SpecError(f"{source + ': ' if source else ''}{loc}.{err}") from None
        return out


def load_branches(branches: Union[str, Path, dict, list]) -> list[BranchSpec]:
    """Branch specs from a catalog name, a YAML file, a mapping or a list; names must be unique."""
    source = "<branches>"
    if isinstance(branches, (str, Path)):
        path = Path(branches)
        if path.suffix not in (".yaml", ".yml") or not path.is_file():
            path = entry_path("interventions", str(branches))
        source, branches = str(path), read_yaml(path)
    if isinstance(branches, dict) and "branches" in branches:
        branches = branches["branches"]
    items = branches if isinstance(branches, list) else [branches]
    out = []
    for i, item in enumerate(items):
        try:
            b = BranchSpec.model_validate(item)
        except ValidationError as err:
            raise SpecError(format_validation_error(err, source, f"branches[{i}]" if len(items) > 1 else "",
                                                    model=BranchSpec)) from None
        b.compose(source, f"branches[{i}]" if len(items) > 1 else "")  # validate every intervention now
        out.append(b)
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{source}: branch names must be unique; repeated: {', '.join(dup)}")
    return out


class ForkPoint:
    """The fork step as interventions see it: the replayed experiment and state before any change,
    their curvature (computed once, on first use), and the branch's event log."""

    def __init__(self, tr: Trainer):
        self.tr, self.exp, self.st = tr, tr.exp, tr.st
        self._curvature: Optional[dict] = None

    def curvature(self) -> dict:
        """Sharpness and v1 at the fork step before any intervention: ``sharpness``, ``v1``, and
        ``compared`` (what the threshold applies to: preconditioned for Adam). Warm-started from
        the state's vectors without changing them, so measuring here leaves the branch's later
        measurements (and a null branch's bit-exactness) untouched."""
        if self._curvature is None:
            self._curvature = solve_sharpness(self.exp, self.st)
        return self._curvature

    def event(self, name: str, value: float = float("nan"), detail: str = "") -> None:
        self.tr.event(name, value, detail)

    def perturbation_certificate(self, before: Experiment, after: Experiment, group: str) -> None:
        """Record certificate (3) of a data perturbation of ``group`` (eosbranch.certificate)."""
        for row in perturbation_certificate(before, after, self.st, group, self.curvature()["v1"]):
            self.event(*row)


def start_branch(store: RunStore, lineage: dict, warn: Callable[[str], None] = lambda m: None,
                 on_step: Callable = lambda tr, loss: None) -> Trainer:
    """The trainer of the branch in ``store`` (described by its ``lineage``) at its newest state:
    a new branch at its fork step (replayed from the parent, checked, changed by its
    interventions, its first checkpoint saved), a resumed one at its newest checkpoint.
    ``on_step``: the loop's per-step callback during the replay."""
    branch = BranchSpec.model_validate(lineage["branch_spec"])
    interventions = branch.compose(str(store.path / LINEAGE))
    exp = build(load_spec(store.path / SPEC))
    if store.checkpoint_steps():
        for iv in interventions:  # the persistent part; the checkpoints hold the rest
            exp = iv.configure(exp)
        tr = Trainer(exp, store, branch=branch.name, warn=warn)
        tr.resume()
        return tr
    parent = Run(store.path.parent / lineage["parent"])
    s = int(lineage["fork_step"])
    tr = Trainer(exp, store, branch=branch.name, warn=warn)
    tr.st = restore_state(exp, parent.store.load_checkpoint(s, warn=warn))
    tr.run(s, on_step, replay=True)
    threads, parent_threads = lineage.get("threads"), parent.lineage.get("threads") or torch.get_num_threads()
    _fork(tr, interventions, lambda loss: check_replay(parent, None, s, loss, threads, parent_threads))
    return tr


def _fork(tr: Trainer, interventions: list[Intervention], check: Callable[[float], None]) -> None:
    """At the fork step: record and check the replayed state before anything changes (the
    parent's loss at this step, bit for bit; the fork-state snapshot of the integrity
    certificate), forget the replay's rows (they are the parent's), apply the interventions
    and save the branch's first checkpoint."""
    at = ForkPoint(tr)
    devices = [tr.exp.device] if tr.exp.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # measuring must not consume the run's randomness
        snapshot = fork_snapshot(tr.exp, tr.st, at.curvature)
    check(snapshot["loss"])
    tr.rec.clear()
    for detail, value in snapshot["rows"]:
        tr.event("fork_state", value, detail)
    tr.event("fork_params", float("nan"), snapshot["params_sha256"])
    tr.st.fork_step = tr.st.step
    exp, st = tr.exp, tr.st
    for iv in interventions:
        exp, st = iv(exp, st, at)
    tr.exp, tr.st = exp, st
    tr.event("fork_step", float(st.step))
    tr.save()


def check_replay(parent: Run, branch: Optional[Run], s: int, loss: Optional[float] = None,
                  threads: Optional[int] = None, parent_threads: Optional[int] = None) -> None:
    """The replayed training loss at the fork step, before any intervention, must equal the
    parent's recorded one bit for bit (``loss``: from the running branch; else read from the
    finished branch's ``fork_state`` events)."""
    name = "loss" if parent.spec.optimizer.get("batch_size") is None else "batch_loss"
    p = parent.metric(name)
    if loss is None:
        ev = branch.events
        row = ev[(ev.event == "fork_state") & (ev.detail == "loss/all")]
        if row.empty:
            return
        loss = float(row.value.iloc[0])
    if s in p.index and p[s] != loss:
        where = branch.path if branch is not None else parent.path
        raise EosbranchError(f"{where}: replay mismatch at step {s}: parent loss {p[s]!r}, "
                             f"replayed {loss!r}; " + (f"the parent ran with {parent_threads} torch thread(s), this fork "
                             f"with {threads}: omit --threads" if threads != parent_threads else
                             "the parent's checkpoints or code changed"))
