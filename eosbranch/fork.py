"""Forking: continue a run's exact state at step s along branches that differ in one way.

A branch restores the parent's newest checkpoint at or before s, replays to s with the same loop
(measurements included, so warm starts and events match), applies its interventions to the state
(e.g. the step size: the state holds it, so "exit EoS" edits one field), and trains on in its own
run directory. The replay is checked, not assumed: the branch's loss at s must equal the parent's
recorded loss at s bit for bit (before any intervention can act, since the loss at s depends only
on theta_s). A branch without interventions therefore reproduces its parent bit for bit.

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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from . import __version__
from .errors import EosbranchError, SpecError, format_validation_error
from .registry import Params, Registry
from .run import Run
from .store import LINEAGE, SPEC, RunStore

INTERVENTIONS = Registry("intervention")


class LRParams(Params):
    factor: Optional[float] = Field(None, gt=0, description="eta' = factor * eta")
    value: Optional[float] = Field(None, gt=0, description="eta' = value")
    stable_margin: Optional[float] = Field(None, gt=0, description="eta' = margin * 2 / S(t_fork)")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("factor", "value", "stable_margin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of factor, value, stable_margin (got {given or 'none'})")
        return self


@INTERVENTIONS.register("lr", LRParams)
def lr_intervention(p: LRParams) -> Callable:
    """Change the step size from the fork on (t_eff then grows by the new eta per step)."""

    def apply(tr) -> None:
        st = tr.st
        if p.factor is not None:
            st.lr = st.lr * p.factor
        elif p.value is not None:
            st.lr = p.value
        else:
            sharp = st.measured.get("sharpness")
            if sharp is None or sharp <= 0:
                raise EosbranchError("lr.stable_margin needs a positive sharpness measured at or before the fork")
            st.lr = p.stable_margin * 2.0 / sharp

    return apply


class BranchSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    interventions: list[dict[str, Any]] = Field(default_factory=list)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:8]

    def compose(self, source: str = "") -> Callable:
        fns = []
        for i, section in enumerate(self.interventions):
            entry, params = INTERVENTIONS.parse(section, f"interventions[{i}]", source)
            fns.append(entry.fn(params))

        def apply(tr) -> None:
            for fn in fns:
                fn(tr)

        return apply


def load_branches(branches: Union[str, Path, dict, list]) -> list[BranchSpec]:
    """Branch specs from a catalog name, a YAML file, a mapping or a list; names must be unique."""
    from .catalog import entry_path
    from .spec import read_yaml

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
        b.compose(source)  # validate every intervention now, before anything runs
        out.append(b)
    names = [b.name for b in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{source}: branch names must be unique; repeated: {', '.join(dup)}")
    return out


def fork_step(parent: Run, kind: str, value: float) -> int:
    """The step to fork at: ``step N``, ``onset K`` (t* + K steps) or ``teff T`` (first step with t_eff >= T)."""
    if kind == "step":
        s = int(value)
    elif kind == "onset":
        ev = parent.events
        hit = ev[ev.event == "t_star"]
        if hit.empty:
            raise EosbranchError(f"{parent.path}: no t_star event; the parent never reached its threshold")
        s = int(hit.step.iloc[0]) + int(value)
    elif kind == "teff":
        loss = parent.metrics.query("metric in ('loss', 'batch_loss') and group == 'all'")
        later = loss[loss.t_eff >= float(value)]
        if later.empty:
            raise EosbranchError(f"{parent.path}: the run never reaches t_eff {value}")
        s = int(later.step.min())
    else:
        raise EosbranchError(f"--at takes step, onset or teff; got {kind!r}")
    if not 0 <= s <= parent.spec.steps:
        raise EosbranchError(f"fork step {s} is outside the parent's 0..{parent.spec.steps}")
    return s


def fork(run: Union[Run, str, Path], at: tuple = ("step", 0), branches: Any = "exit_eos",
         steps: Optional[int] = None, progress: bool = False,
         warn: Callable[[str], None] = lambda m: None) -> list[Run]:
    """Fork ``run`` at ``at`` into ``branches``; each runs ``steps`` steps after the fork (default:
    to the parent's last step). Returns the branch runs (existing complete ones are reused)."""
    from .spec import load_spec
    from .train import Trainer, _progress, build, restore_state

    parent = run if isinstance(run, Run) else Run(run)
    s = fork_step(parent, *at)
    total = s + (steps if steps is not None else parent.spec.steps - s)
    if total <= s:
        raise EosbranchError(f"nothing to run: the fork is at step {s} and the branch would end at {total}")
    spec = parent.spec.model_copy(update={"steps": total})
    out = []
    for b in load_branches(branches):
        path = parent.path.parent / f"{parent.name}--{b.name}-at{s}-{b.digest()}"
        store = RunStore(path)
        if store.path.exists() and store.checkpoint_steps():
            from .train import resume

            branch = resume(path, progress=progress, warn=warn)  # a finished or interrupted branch
            _check_replay(parent, branch, s)
            out.append(branch)
            continue
        store.path.mkdir(parents=True, exist_ok=True)
        store.write_text(SPEC, spec.to_yaml())
        store.write_json(LINEAGE, {"parent": parent.name, "fork_step": s, "branch": b.name,
                                   "branch_spec": b.model_dump(), "branch_hash": b.digest(),
                                   "code_version": __version__})
        store.lock()
        try:
            exp = build(load_spec(path / SPEC))
            tr = Trainer(exp, store, branch=b.name, warn=warn)
            tr.st = restore_state(exp, parent.store.load_checkpoint(s, warn=warn))
            tr.fork_at, tr.intervene = s, b.compose()
            with _progress(progress, total, tr.st.step) as show:
                def on_step(trainer, loss):
                    show(trainer, loss)
                    if trainer.st.step == s + 1:  # the fork step's loss is recorded: check it now
                        _check_replay(parent, None, s, trainer.metrics)

                tr.run(total, on_step)
        finally:
            store.unlock()
        branch = Run(path)
        _check_replay(parent, branch, s)
        out.append(branch)
    return out


def _check_replay(parent: Run, branch: Optional[Run], s: int, rows: Optional[list] = None) -> None:
    """The branch's loss at the fork step must equal the parent's recorded one, bit for bit.

    ``rows``: the branch trainer's in-memory metric rows (checked while it runs, to fail fast)."""
    name = "loss" if parent.spec.optimizer.get("batch_size") is None else "batch_loss"
    p = parent.metric(name)
    if rows is not None:
        mine = [r[5] for r in rows if r[0] == s and r[3] == "all" and r[4] == name]
    else:
        b = branch.metric(name)
        mine = [b[s]] if s in b.index else []
    if s in p.index and mine and p[s] != mine[0]:
        where = branch.path if branch is not None else parent.path
        raise EosbranchError(f"{where}: replay mismatch at step {s}: parent loss {p[s]!r}, "
                             f"replayed {mine[0]!r}; the parent's checkpoints or code changed")
