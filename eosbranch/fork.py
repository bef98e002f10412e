"""Forking: continue a run's exact state at step s along branches that differ in one way.

:func:`fork` resolves the fork step and each branch's end, makes each branch's run directory
(named by the parent, the branch and its digest, so re-running a fork finds it) and trains it
through the same entry point as a trunk (:func:`eosbranch.train.resume`), which starts or resumes
the branch with :func:`eosbranch.branch.start_branch`; then it certifies the branches.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from .version import __version__
from .branch import BranchSpec, check_replay, load_branches
from .catalog import entry_path
from .certificate import certify
from .data import load_data
from .errors import EosbranchError, SpecError
from .groups import resolve
from .health import at_fork, chance_level
from .lineage import branches_of, fork_step, reached
from .run import Run
from .store import LINEAGE, RunStore
from .threads import check_threads, positive_threads
from .train import resume


def fork(run: Union[Run, str, Path], at: tuple = ("step", 0), branches: Any = "exit_eos",
         steps: Optional[int] = None, until: Optional[str] = None, teff: Optional[float] = None,
         max_steps: Optional[int] = None, progress: bool = False,
         warn: Callable[[str], None] = lambda m: None, threads: Optional[int] = None) -> list[Run]:
    """Fork ``run`` at ``at`` into ``branches`` and run each until one of:

    - ``steps``: N steps after the fork;
    - ``until="tss"``: the branch's own t** plus a margin of two measurement intervals. Branches
      without interventions (the EoS reference) have no t** of their own: they run until they
      cover the effective time the other branches reached, so compare has a reference over the
      whole window. At most ``max_steps`` steps after the fork (default 10x the parent's steps);
    - ``teff``: effective time T after the fork (t_eff >= t_eff(fork) + T);
    - none of these: the parent's last step.

    ``threads``: torch threads of new branches (default: the parent's recorded count, which the
    bit-exact replay to the fork step needs; another count is recorded and may fail that check).

    Returns the branch runs in the order given (finished branches are reused, interrupted ones
    resumed). Certificates (:mod:`eosbranch.certificate`) are computed and stored as events."""
    parent = run if isinstance(run, Run) else Run(run)
    s = fork_step(parent, *at)
    given = [k for k, v in (("steps", steps), ("until", until), ("teff", teff)) if v is not None]
    if len(given) > 1:
        raise EosbranchError(f"give at most one of --steps, --until, --teff (got {', '.join(given)})")
    if until is not None and until not in ("tss", "t**"):
        raise EosbranchError(f"--until takes tss (the branch's own t**); got {until!r}")
    cap = s + (max_steps if max_steps is not None else 10 * parent.spec.steps)
    specs = load_branches(branches)
    _check_names(parent, specs)
    _check_groups(parent, specs, branches)
    for w in _parent_health(parent, s):
        warn(w)
    t_fork = _t_eff_at(parent, s)
    if until is not None:
        order = [b for b in specs if b.interventions] + [b for b in specs if not b.interventions]
        if not any(b.interventions for b in specs) and not _sibling_ends(parent, s):
            raise EosbranchError("--until tss needs a branch that changes something (its t** sets the window); "
                                 "these branches have no interventions")
    else:
        order = specs
    done = {}
    for b in order:
        if steps is not None:
            rule, total = {"kind": "steps"}, s + steps
        elif teff is not None:
            rule, total = {"kind": "teff", "teff": t_fork + float(teff)}, cap
        elif until is not None and b.interventions:
            rule, total = {"kind": "tss", "margin": 2 * parent.spec.measure.every}, cap
        elif until is not None:
            rule, total = {"kind": "teff", "teff": max(_sibling_ends(parent, s))}, cap
        else:
            rule, total = {"kind": "steps"}, parent.spec.steps
        if total <= s:
            raise EosbranchError(f"nothing to run: the fork is at step {s} and the branch would end at {total}")
        done[b.name] = _run_branch(parent, s, b, rule, total, progress, warn, threads)
        if rule["kind"] == "tss" and not (done[b.name].events.event == "t_star_star").any():
            warn(f"branch {b.name}: its sharpness never reached its threshold within {total - s} steps after "
                 "the fork (--max-steps); its window ends at its last step")
    out = [done[b.name] for b in specs]
    certify(parent, out)
    return out


def _check_names(parent: Run, specs: list[BranchSpec]) -> None:
    """A branch name means one branch spec per parent: `compare` and `report` label rows and lines by
    name, so a second, different branch under a name already used (at any fork step) is refused."""
    for b in specs:
        for other in branches_of(parent):
            lin = other.lineage
            if lin.get("branch") == b.name and lin.get("branch_hash") not in (None, b.digest()):
                was = _describe_interventions((lin.get("branch_spec") or {}).get("interventions") or [])
                raise EosbranchError(
                    f"{parent.path}: branch name {b.name!r} is taken by a different branch ({was}, forked at step "
                    f"{lin.get('fork_step')}: {other.path.name}); give this one another name "
                    f"(name: in a branch YAML file)")


def _check_groups(parent: Run, specs: list[BranchSpec], branches: Any) -> None:
    """Every ``group:`` an intervention names must be a group of the parent, checked before any
    branch runs; the error names the branch file and the field."""
    named = [(i, j, iv["group"], iv.get("kind")) for i, b in enumerate(specs) for j, iv in enumerate(b.interventions)
             if isinstance(iv.get("group"), str)]
    if not named:
        return
    spec = parent.spec
    data = load_data(spec.data)
    have = list(resolve(spec.groups, data.X, data.y).groups) if spec.groups else []
    for i, j, g, kind in named:
        if g not in have:
            source = _branch_source(branches)
            loc = f"{'branches[' + str(i) + '].' if len(specs) > 1 else ''}interventions[{j}]: {kind}.group"
            raise SpecError(f"{source + ': ' if source else ''}{loc}: no group {g!r} in {parent.path}; groups: "
                            f"{', '.join(have) or 'none (its spec defines no groups)'}")


def _parent_health(parent: Run, s: int) -> list[str]:
    """Warnings when the parent is saturated or collapsed at the fork step (see :mod:`eosbranch.health`)."""
    m = parent.metrics
    chance = None
    if (m.metric == "accuracy").any():
        data = load_data(parent.spec.data)
        chance = chance_level(data.y) if data.task == "classification" else None
    return at_fork(m, s, chance)


def _branch_source(branches: Any) -> str:
    """The file ``load_branches`` reads ``branches`` from ('' for a mapping or a list)."""
    if not isinstance(branches, (str, Path)):
        return ""
    path = Path(branches)
    return str(path if path.suffix in (".yaml", ".yml") and path.is_file() else entry_path("interventions", str(branches)))


def _describe_interventions(ivs: list) -> str:
    if not ivs:
        return "no interventions"
    return "; ".join(", ".join(f"{k}: {v}" for k, v in iv.items()) for iv in ivs)


def _t_eff_at(parent: Run, s: int) -> float:
    m = parent.metrics
    row = m[(m.step == s) & (m.group == "all")]
    if row.empty:
        raise EosbranchError(f"{parent.path}: no rows at step {s}; is the parent complete?")
    return float(row.t_eff.iloc[0])


def _sibling_ends(parent: Run, s: int) -> list[float]:
    """Final t_eff of the finished branches with interventions forked at step s."""
    ends = []
    for b in branches_of(parent):
        if b.lineage.get("fork_step") == s and (b.lineage.get("branch_spec") or {}).get("interventions") and b.complete:
            loss = b.metrics.query("metric in ('loss', 'batch_loss') and group == 'all'")
            if len(loss):
                ends.append(float(loss.t_eff.max()))
    return ends


def _run_branch(parent: Run, s: int, b: BranchSpec, rule: dict, total: int, progress: bool, warn,
                threads: Optional[int] = None) -> Run:
    path = parent.path.parent / f"{parent.name}--{b.name}-at{s}-{b.digest()}"
    store = RunStore(path)
    if store.path.exists() and store.checkpoint_steps():
        existing = Run(path)
        check_threads(path, existing.lineage.get("threads"), threads)
        if existing.complete and not _reaches(existing, rule, total):
            # Asked to go further than it went (e.g. --steps 100 before, --until tss now): extend it.
            store.lock()  # the lineage is written under the run's lock, like every write
            try:
                store.write_json(LINEAGE, {**existing.lineage, "until": rule})
                branch = resume(path, steps=max(total, existing.spec.steps + 1), progress=progress, warn=warn,
                                store=store)
            finally:
                store.unlock()
        else:
            branch = resume(path, progress=progress, warn=warn)  # a finished or interrupted branch
        check_replay(parent, branch, s)
        return branch
    spec = parent.spec.model_copy(update={"steps": total})
    parent_threads = parent.lineage.get("threads") or torch.get_num_threads()
    threads = parent_threads if threads is None else positive_threads(threads)
    # The lock before any write or clean-up: a second fork into the same branch fails fast here
    # and changes nothing (it never removes the directory the first one is writing).
    store, created = store.new_locked()
    try:
        store.create(spec.to_yaml(), {"parent": parent.name, "fork_step": s, "branch": b.name,
                                      "branch_spec": b.model_dump(), "branch_hash": b.digest(),
                                      "until": rule, "code_version": __version__, "threads": threads})
        resume(path, progress=progress, warn=warn, store=store)  # a new branch starts as a resumed one does
    except BaseException:
        if created and not _has_checkpoints(store):
            # Failed before the fork step's checkpoint (replay mismatch, an intervention that does
            # not fit this run, no space): leave no half-made branch for `runs` to list.
            shutil.rmtree(path, ignore_errors=True)  # still under our lock: nobody else is writing it
        raise
    finally:
        store.unlock()
    return Run(path)


def _has_checkpoints(store: RunStore) -> bool:
    try:
        return bool(store.checkpoint_steps())
    except EosbranchError:
        return True  # damaged, not absent: keep it for the user to look at


def _reaches(branch: Run, rule: dict, total: int) -> bool:
    """Whether a finished branch already covers what ``rule`` asks for."""
    end = branch.spec.steps
    if rule["kind"] == "teff":
        return reached(float(branch.metrics.t_eff.max()), rule["teff"])
    if rule["kind"] == "tss":
        hit = branch.events.query("event == 't_star_star'")
        return len(hit) > 0 and end >= int(hit.step.iloc[0]) + int(rule["margin"])
    return end >= total
