"""Lineage: which runs are branches of a run, where a fork goes (``step N``, ``onset K``,
``teff T``), and when a branch stops (its ``until`` rule in ``lineage.json``)."""

from __future__ import annotations

from typing import Callable, Optional

from .errors import EosbranchError
from .run import Run
from .store import LINEAGE


def branches_of(parent: Run) -> list[Run]:
    """The branch runs of ``parent`` (its sibling directories ``<parent>--*`` whose lineage names it)."""
    found = []
    for p in sorted(parent.path.parent.glob(f"{parent.name}--*")):
        if p.is_dir() and any((p / f).exists() for f in (LINEAGE, "spec.yaml", "record.json", "checkpoints")):
            r = Run(p)  # a damaged or edited spec.yaml / lineage.json: one line naming it
            if not (p / LINEAGE).is_file():
                raise EosbranchError(f"{p / LINEAGE}: missing; cannot tell whose branch {p.name} is "
                                     "(restore it, or move the directory away)")
            if r.lineage.get("parent") == parent.name:
                found.append(r)
    return found


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


def stop_rule(lineage: dict) -> Optional[Callable]:
    """The branch's stop rule from its lineage (so a resumed branch stops where it would have):
    ``tss``: its own t** (first measurement after the fork at or past its threshold) plus
    ``margin`` steps; ``teff``: the first step with t_eff >= the target."""
    until = lineage.get("until") or {}
    if until.get("kind") == "tss":
        margin = int(until["margin"])
        return lambda tr: tr.st.t_star_star is not None and tr.st.step >= tr.st.t_star_star + margin
    if until.get("kind") == "teff":
        target = float(until["teff"])
        return lambda tr: reached(tr.st.t_eff, target)
    return None


def reached(t_eff: float, target: float) -> bool:
    # t_eff is a running sum of step sizes: allow its rounding, not a whole extra step.
    return t_eff >= target - 1e-12 * max(1.0, abs(target))
