"""A study as the report reads it: one :class:`StudyRun` per seed, the parent's and each branch's
tables loaded once (``load_study_run``), which every figure of ``plots`` takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .compare import COLUMNS as COMPARE_COLUMNS
from .compare import branches_of, compare
from .errors import EosbranchError
from .run import Run


@dataclass
class StudyRun:
    """One seed of a study, loaded once: the parent's and each branch's tables.

    ``lines`` maps a label (the branch name; the parent under its own branch name, ``trunk`` for a
    trained run) to that run's ``metrics`` table; ``reference`` is the label of the EoS reference;
    ``comparison`` is ``eosbranch.compare``'s table (empty without branches).
    """

    name: str
    seed: int
    parent: str
    lines: dict[str, pd.DataFrame]
    reference: str
    comparison: pd.DataFrame
    events: pd.DataFrame
    t_star: float = float("nan")  # t_eff of the t_star event (NaN: never reached)
    t_star_step: Optional[int] = None
    fork_t: dict[str, float] = field(default_factory=dict)  # branch label -> t_eff at its fork

    @property
    def others(self) -> list[str]:
        """Branches compared against the reference (not the reference, not the parent)."""
        return [b for b in self.lines if b not in (self.reference, self.parent)]

    def curve(self, label: str, metric: str, group: str = "all") -> pd.Series:
        m = self.lines[label]
        m = m[(m.metric == metric) & (m.group == group)]
        s = m.set_index("t_eff")["value"].sort_index()
        if label == self.parent and self.reference != self.parent and self.fork_t:
            s = s[s.index <= min(self.fork_t.values()) + 1e-12]  # the parent only up to the fork
        return s

    def groups(self, metric: str = "loss") -> list[str]:
        """Data groups that have ``metric`` (``all`` last), in sorted order."""
        names = set()
        for m in self.lines.values():
            names |= set(m.loc[m.metric == metric, "group"])
        return sorted(names - {"all"}) + (["all"] if "all" in names else [])

    def window(self) -> tuple[float, float]:
        """[t_fork, t_end] of the comparison (over all compared branches); the whole run without branches."""
        c = self.comparison
        if len(c):
            return float(c.t_fork.min()), float(c.t_end.max())
        t = self.lines[self.parent].t_eff
        return float(t.min()), float(t.max())


def load_study_run(run: Union[Run, str, Path], comparison: Optional[pd.DataFrame] = None) -> StudyRun:
    """A run, its branches and their comparison (``compare(run)`` unless given), loaded once."""
    run = run if isinstance(run, Run) else Run(run)
    branches = branches_of(run)
    names = [b.lineage["branch"] for b in branches]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        paths = ", ".join(b.name for b in branches if b.lineage["branch"] in dup)
        raise EosbranchError(f"{run.path}: several branches are named {', '.join(dup)} ({paths}); a report "
                             "compares one branch per name: move the extra ones out of this directory")
    parent = run.lineage.get("branch") or "trunk"
    if parent in names:
        parent = "parent"
    lines, events, fork_t = {parent: run.metrics}, [run.events], {}
    for b, name in zip(branches, names):
        m = b.metrics
        lines[name] = m
        events.append(b.events)
        fork_t[name] = float(m.t_eff.min())
    if comparison is None:
        comparison = compare(run) if branches else pd.DataFrame(columns=COMPARE_COLUMNS)
    ev = run.events
    hit = ev[ev.event == "t_star"]
    return StudyRun(
        name=run.name, seed=int(run.spec.seed), parent=parent, lines=lines,
        reference="eos" if "eos" in names else parent, comparison=comparison,
        events=pd.concat([e for e in events if len(e)] or [events[0]], ignore_index=True),
        t_star=float(hit.t_eff.iloc[0]) if len(hit) else float("nan"),
        t_star_step=int(hit.step.iloc[0]) if len(hit) else None, fork_t=fork_t,
    )
