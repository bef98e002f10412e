"""Comparing branches on effective time (DESIGN §2): t*, t**, and the branch effect Δl_k.

Branches that differ in step size take steps of different length, so they are compared at equal
t_eff = sum of step sizes, never at equal step count. For a branch b and group k,
Δl_k(t_eff) = l_k^b(t_eff) - l_k^EoS(t_eff), both curves interpolated linearly onto one grid over
[t_fork, t**] (t**: the first t_eff after the fork at which b's own sharpness reaches b's own
threshold, interpolated between measurements; the branch's last t_eff if it never does).
Δ > 0: the group's loss is lower at the EoS, it learns faster there.

The EoS reference is the branch named ``eos`` if there is one, else the parent itself (a branch
without interventions reproduces it bit for bit).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import pandas as pd

from .errors import EosbranchError
from .run import Run

COLUMNS = ["branch", "group", "fork_step", "t_star", "t_fork", "t_star_star", "t_end", "delta_at_end",
           "delta_mean", "effect"]


def crossing(t: np.ndarray, value: np.ndarray, threshold: np.ndarray, after: float = -np.inf) -> float:
    """First t > ``after`` where value reaches threshold, interpolated linearly; NaN if never."""
    t, f = np.asarray(t, float), np.asarray(value, float) - np.asarray(threshold, float)
    keep = t >= after
    t, f = t[keep], f[keep]
    hits = np.flatnonzero(f >= 0)
    if len(hits) == 0:
        return float("nan")
    i = hits[0]
    if i == 0:
        return float(t[0])
    return float(t[i - 1] + (t[i] - t[i - 1]) * (-f[i - 1]) / (f[i] - f[i - 1]))


def branches_of(parent: Run) -> list[Run]:
    found = []
    for p in sorted(parent.path.parent.glob(f"{parent.name}--*")):
        if (p / "lineage.json").is_file():
            r = Run(p)
            if r.lineage.get("parent") == parent.name:
                found.append(r)
    return found


def _curve(run: Run, metric: str, group: str = "all") -> pd.Series:
    m = run.metrics
    m = m[(m.metric == metric) & (m.group == group)]
    return m.set_index("t_eff")["value"].sort_index()


def branch_effect(t_branch, loss_branch, t_eos, loss_eos, start: float, end: float, grid: int = 3000) -> np.ndarray:
    """Δl(t_eff) = l^branch - l^EoS on ``grid`` points of [start, end], both curves interpolated."""
    ts = np.linspace(start, end, grid)
    return np.interp(ts, t_branch, loss_branch) - np.interp(ts, t_eos, loss_eos)


def effect(delta: float) -> str:
    return "learns faster at EoS" if delta > 0 else "learns slower at EoS"


def compare(run: Union[Run, str, Path], grid: int = 3000) -> pd.DataFrame:
    """Per branch and group: fork step, t*, t**, Δl_k at the window's end and its mean over the window."""
    parent = run if isinstance(run, Run) else Run(run)
    branches = branches_of(parent)
    if not branches:
        raise EosbranchError(f"{parent.path}: no branches; fork it first (eosbranch fork --run {parent.path} ...)")
    reference = next((b for b in branches if b.lineage.get("branch") == "eos"), parent)
    ev = parent.events
    hit = ev[ev.event == "t_star"]
    t_star = float(hit.t_eff.iloc[0]) if len(hit) else float("nan")
    rows = []
    for b in branches:
        if b is reference:
            continue
        s = b.lineage["fork_step"]
        loss_all = _curve(b, "loss")
        t_fork = float(loss_all.index.min())
        sharp, thr = _curve(b, "sharpness"), _curve(b, "threshold")
        tss = crossing(sharp.index, sharp.values, thr.values, after=t_fork + 1e-12) if len(sharp) else float("nan")
        ref_end = float(_curve(reference, "loss").index.max())
        t_end = min(tss if np.isfinite(tss) else float(loss_all.index.max()), float(loss_all.index.max()), ref_end)
        groups = sorted(set(b.metrics.query("metric == 'loss'").group) - {"all"}) + ["all"]
        for g in groups:
            lb, lr = _curve(b, "loss", g), _curve(reference, "loss", g)
            lr = lr[lr.index >= t_fork - 1e-12]
            if len(lb) < 2 or len(lr) < 2:
                continue
            delta = branch_effect(lb.index, lb.values, lr.index, lr.values, t_fork, t_end, grid)
            rows.append({"branch": b.lineage["branch"], "group": g, "fork_step": s, "t_star": t_star,
                         "t_fork": t_fork, "t_star_star": tss, "t_end": t_end, "delta_at_end": float(delta[-1]),
                         "delta_mean": float(delta.mean()), "effect": effect(delta[-1])})
    df = pd.DataFrame(rows, columns=COLUMNS)
    parent.store.write_frame("comparison", df)
    return df
