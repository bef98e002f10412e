"""Comparing branches on effective time (DESIGN §2): t*, t**, and the branch effect Δl_k.

Branches that differ in step size take steps of different length, so they are compared at equal
t_eff = sum of step sizes, never at equal step count. For a branch b and group k,
Δl_k(t_eff) = l_k^b(t_eff) - l_k^EoS(t_eff), both curves interpolated linearly onto one grid over
[t_fork, t**] (t**: the first t_eff after the fork at which b's own sharpness reaches b's own
threshold, interpolated between measurements; the branch's last t_eff if it never does).
Δ > 0: the group's loss is lower at the EoS, it learns faster there.

The EoS reference of a branch is the branch named ``eos`` forked at the same step if there is
one, else the parent itself (a branch without interventions reproduces it bit for bit).

Across seeds (parents of one spec that differ only in their seed, e.g. a sweep): ``compare([run,
...])`` (or a sweep directory) stacks the per-seed tables with a ``seed`` column first
(:data:`SEED_COLUMNS`, saved as ``comparison_seeds.parquet``), and :func:`summarize` gives per
branch and group the median and inter-quartile range (pandas' linear quantiles) of Δl_k at the
window's end and of its mean over the window (:data:`SUMMARY_COLUMNS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

from .errors import EosbranchError
from .run import Run

COLUMNS = ["branch", "group", "fork_step", "t_star", "t_fork", "t_star_star", "t_end", "delta_at_end",
           "delta_mean", "effect"]
SEED_COLUMNS = ["seed", *COLUMNS]  # compare() over several seeds
CURVE_COLUMNS = ["branch", "group", "fork_step", "t_eff", "delta"]  # comparison_curves.parquet: Δl_k(t_eff) on the grid
SUMMARY_COLUMNS = ["branch", "group", "n_seeds", "delta_at_end_median", "delta_at_end_q25", "delta_at_end_q75",
                   "delta_mean_median", "delta_mean_q25", "delta_mean_q75", "effect"]


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
        if p.is_dir() and any((p / f).exists() for f in ("lineage.json", "spec.yaml", "record.json", "checkpoints")):
            r = Run(p)  # a damaged or edited spec.yaml / lineage.json: one line naming it
            if not (p / "lineage.json").is_file():
                raise EosbranchError(f"{p / 'lineage.json'}: missing; cannot tell whose branch {p.name} is "
                                     "(restore it, or move the directory away)")
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
    if delta == 0:
        return "no difference"  # e.g. a null branch: exactly the EoS reference
    return "learns faster at EoS" if delta > 0 else "learns slower at EoS"


def compare(run: Union[Run, str, Path, Sequence], grid: int = 3000) -> pd.DataFrame:
    """Per branch and group: fork step, t*, t**, Δl_k at the window's end and its mean over the window.

    ``run`` is one parent run (saves ``comparison.parquet`` in it, and the curves themselves,
    Δl_k(t_eff) on the ``grid`` points of each branch's window, as ``comparison_curves.parquet``
    with :data:`CURVE_COLUMNS`; see :func:`curves`), or several parents of one spec with different
    seeds, or a sweep directory (rows per seed, see :func:`compare_seeds`)."""
    if isinstance(run, (list, tuple)):
        return compare_seeds(run, grid)
    if not isinstance(run, Run) and not (Path(run) / "spec.yaml").exists():
        from .sweep import is_sweep, sweep_runs

        if is_sweep(run):
            return compare_seeds(sweep_runs(run), grid, where=Path(run))
    parent = run if isinstance(run, Run) else Run(run)
    branches = branches_of(parent)
    if not branches:
        raise EosbranchError(f"{parent.path}: no branches; fork it first (eosbranch fork --run {parent.path} ...)")
    from .validity import incomplete_runs

    incomplete = incomplete_runs(parent, branches)  # refused unless --incomplete (then marked)
    # The reference of a branch is the `eos` branch forked at the same step (one parent may be
    # forked at several steps), else the parent itself.
    eos_at = {}
    for b in branches:
        if b.lineage.get("branch") == "eos":
            eos_at.setdefault(b.lineage["fork_step"], b)
    ev = parent.events
    hit = ev[ev.event == "t_star"]
    t_star = float(hit.t_eff.iloc[0]) if len(hit) else float("nan")
    rows, curve_parts = [], []
    for b in branches:
        s = b.lineage["fork_step"]
        reference = eos_at.get(s, parent)
        if b is reference:
            continue
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
            curve_parts.append(pd.DataFrame({"branch": b.lineage["branch"], "group": g, "fork_step": s,
                                             "t_eff": np.linspace(t_fork, t_end, grid), "delta": delta}))
            rows.append({"branch": b.lineage["branch"], "group": g, "fork_step": s, "t_star": t_star,
                         "t_fork": t_fork, "t_star_star": tss, "t_end": t_end, "delta_at_end": float(delta[-1]),
                         "delta_mean": float(delta.mean()), "effect": effect(delta[-1])})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if incomplete:  # only with --incomplete: those rows are invalid, and say so
        bad_ref = {s for s, r in eos_at.items() if r.lineage.get("branch") in incomplete}
        df["incomplete"] = df.branch.isin(incomplete) | df.fork_step.isin(bad_ref) | ("<reference>" in incomplete)
    parent.store.write_frame("comparison", df)
    curve = pd.concat(curve_parts, ignore_index=True) if curve_parts else pd.DataFrame(columns=CURVE_COLUMNS)
    parent.store.write_frame("comparison_curves", curve[CURVE_COLUMNS])
    return df


def curves(run: Union[Run, str, Path]) -> pd.DataFrame:
    """Δl_k(t_eff) per branch and group on the common grid of the last :func:`compare` of ``run``
    (``comparison_curves.parquet``; columns :data:`CURVE_COLUMNS`)."""
    parent = run if isinstance(run, Run) else Run(run)
    path = parent.path / "comparison_curves.parquet"
    if not path.is_file():
        raise EosbranchError(f"{parent.path}: no comparison_curves.parquet; run `eosbranch compare {parent.path}` first")
    return pd.read_parquet(path)


def compare_seeds(runs: Sequence[Union[Run, str, Path]], grid: int = 3000,
                  where: Union[str, Path, None] = None) -> pd.DataFrame:
    """:func:`compare` for each parent (same spec, different seeds), stacked with a ``seed`` column.

    Saved as ``comparison_seeds.parquet`` in ``where`` (default: the first run's directory's parent,
    where a sweep keeps its runs and ``sweep.json``)."""
    parents = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not parents:
        raise EosbranchError("compare: no runs given")
    _check_same_spec(parents)
    frames = [compare(p, grid).assign(seed=p.spec.seed) for p in parents]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SEED_COLUMNS)
    df = df[SEED_COLUMNS + (["incomplete"] if "incomplete" in df.columns else [])]  # marked by --incomplete
    from .store import RunStore

    RunStore(Path(where) if where is not None else parents[0].path.parent).write_frame("comparison_seeds", df)
    return df


def _check_same_spec(parents: list[Run]) -> None:
    """Parents must share their spec (steps aside) and differ in their seed."""
    first = parents[0].spec.model_dump(mode="json", exclude={"seed", "steps"})
    for p in parents[1:]:
        other = p.spec.model_dump(mode="json", exclude={"seed", "steps"})
        diff = [k for k in first if first[k] != other.get(k)]
        if diff:
            raise EosbranchError(f"{p.path}: its spec differs from {parents[0].path} in {', '.join(diff)}; "
                                 "compare across seeds takes runs of one spec")
    seeds = [p.spec.seed for p in parents]
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise EosbranchError(f"compare: seed {', '.join(map(str, dup))} given more than once; "
                             "compare across seeds takes one run per seed")


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per branch and group across seeds: ``n_seeds`` and the median, 25% and 75% quantiles (linear
    interpolation, as pandas and NumPy default) of ``delta_at_end`` and ``delta_mean``; ``effect``
    reads the median of ``delta_at_end``. Columns: :data:`SUMMARY_COLUMNS`."""
    missing = [c for c in ("seed", "branch", "group", "delta_at_end", "delta_mean") if c not in df.columns]
    if missing:
        raise EosbranchError(f"summarize: needs a per-seed comparison (compare([run, ...])); missing {missing}")
    from .validity import check_summary_rows

    check_summary_rows(df)
    rows = []
    for (branch, group), d in df.groupby(["branch", "group"], sort=False):
        row = {"branch": branch, "group": group, "n_seeds": int(d.seed.nunique())}
        for col in ("delta_at_end", "delta_mean"):
            v = d[col].astype(float)
            row.update({f"{col}_median": float(v.median()), f"{col}_q25": float(v.quantile(0.25)),
                        f"{col}_q75": float(v.quantile(0.75))})
        row["effect"] = effect(row["delta_at_end_median"])
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
