"""Comparing branches on effective time (DESIGN §2): t*, t**, the branch effect Δl_k, and whether
its window can be trusted.

Branches that differ in step size take steps of different length, so they are compared at equal
t_eff = sum of step sizes, never at equal step count. For a branch b and group k,
Δl_k(t_eff) = l_k^b(t_eff) - l_k^EoS(t_eff) over the window [t_fork, t**] (t**: the first t_eff
after the fork at which b's own sharpness reaches b's own threshold, interpolated between
measurements; the branch's last t_eff if it never does, and the window is then invalid).
Δ > 0: the group's loss is lower at the EoS, it learns faster there.

Group losses come from every step (full-batch runs record them at each step, see
``eosbranch.step_losses``), so the period-two oscillation of the EoS cannot alias the result;
``source`` says whether both curves had a row at every step of the window (``every_step``) or
only at measurements (``measurement_steps``: minibatch runs, runs recorded before every-step
rows). ``delta_mean`` is the exact mean of Δl_k over the window; the ``central`` variant averages
consecutive steps first (``eosbranch.branch_effect``). ``effect`` reads ``delta_central_mean``
when the curves are every-step, else ``delta_at_end``. Each row carries the window's
diagnostics and ``valid`` / ``invalid_reason`` (``eosbranch.window``); every invalid window is
also reported as a one-line warning.

The EoS reference of a branch is the branch named ``eos`` forked at the same step if there is
one, else the parent itself (a branch without interventions reproduces it bit for bit).

Across seeds (parents of one spec that differ only in their seed, e.g. a sweep): ``compare([run,
...])`` (or a sweep directory) stacks the per-seed tables with a ``seed`` column first
(:data:`SEED_COLUMNS`, saved as ``comparison_seeds.parquet``), and :func:`summarize` gives per
branch and group the median and inter-quartile range (pandas' linear quantiles) over the seeds
with a valid window (:data:`SUMMARY_COLUMNS`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import pandas as pd

from . import branch_effect as be
from .completeness import check_summary_rows, incomplete_runs
from .errors import EosbranchError, EosbranchWarning
from .mechanism import MECHANISM_COLUMNS, measured_rate, predict
from .run import Run
from .store import RunStore
from .sweep_manifest import is_sweep, sweep_runs
from .window import DIAGNOSTIC_COLUMNS, Validity, diagnose

COLUMNS = ["branch", "group", "fork_step", "t_star", "t_fork", "t_star_star", "t_end", "delta_at_end",
           "delta_mean", "effect", "delta_central_at_end", "delta_central_mean", "source", *DIAGNOSTIC_COLUMNS]
SEED_COLUMNS = ["seed", *COLUMNS]  # compare() over several seeds
CURVE_COLUMNS = ["branch", "group", "fork_step", "t_eff", "delta", "delta_central"]  # comparison_curves.parquet: Δl_k(t_eff) on the grid
SUMMARY_COLUMNS = ["branch", "group", "n_seeds", "delta_at_end_median", "delta_at_end_q25", "delta_at_end_q75",
                   "delta_mean_median", "delta_mean_q25", "delta_mean_q75", "effect", "n_valid", "invalid_seeds",
                   "delta_central_mean_median", "delta_central_mean_q25", "delta_central_mean_q75"]


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
    return be.on_grid(t_branch, loss_branch, t_eos, loss_eos, start, end, grid)


def _ratio(run: Run) -> pd.Series:
    return threshold_ratio(run.metrics)


def threshold_ratio(m: pd.DataFrame) -> pd.Series:
    """S / threshold at a metrics table's measurements (the preconditioned sharpness where the
    optimizer's threshold applies to it), indexed by t_eff."""
    m = m[m.group == "all"]
    thr = m[m.metric == "threshold"].set_index("step")["value"]
    pre = m[m.metric == "preconditioned_sharpness"].set_index("step")["value"]
    sharp = m[m.metric == "sharpness"].set_index("step")
    s = sharp["value"].copy()
    both = s.index.intersection(pre.index)
    s.loc[both] = pre.loc[both]
    ratio = (s / thr.reindex(s.index)).dropna()
    return pd.Series(ratio.to_numpy(), index=sharp["t_eff"].reindex(ratio.index).to_numpy()).sort_index()


def _every_step(run: Run, group: str, start: float, end: float) -> bool:
    """Whether the group's loss has a row at every step of [start, end] in this run."""
    m = run.metrics
    m = m[(m.metric == "loss") & (m.group == group) & (m.t_eff >= start - 1e-12) & (m.t_eff <= end + 1e-12)]
    steps = np.sort(m.step.to_numpy())
    return len(steps) >= 2 and bool((np.diff(steps) == 1).all())


def effect(delta: float) -> str:
    if delta == 0:
        return "no difference"  # e.g. a null branch: exactly the EoS reference
    return "learns faster at EoS" if delta > 0 else "learns slower at EoS"


def compare(run: Union[Run, str, Path, Sequence], grid: int = 3000, validity: Validity = Validity()) -> pd.DataFrame:
    """Per branch and group: fork step, t*, t**, Δl_k at the window's end and its mean over the window.

    ``run`` is one parent run (saves ``comparison.parquet`` in it, and the curves themselves,
    Δl_k(t_eff) on the ``grid`` points of each branch's window, as ``comparison_curves.parquet``
    with :data:`CURVE_COLUMNS`; see :func:`curves`), or several parents of one spec with different
    seeds, or a sweep directory (rows per seed, see :func:`compare_seeds`)."""
    if isinstance(run, (list, tuple)):
        return compare_seeds(run, grid, validity=validity)
    if not isinstance(run, Run) and not (Path(run) / "spec.yaml").exists():
        if is_sweep(run):
            return compare_seeds(sweep_runs(run), grid, where=Path(run), validity=validity)
    parent = run if isinstance(run, Run) else Run(run)
    branches = branches_of(parent)
    if not branches:
        raise EosbranchError(f"{parent.path}: no branches; fork it first (eosbranch fork --run {parent.path} ...)")
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
    rows, curve_parts, mech_rows = [], [], []
    for b in branches:
        s = b.lineage["fork_step"]
        reference = eos_at.get(s, parent)
        if b is reference:
            continue
        loss_all = _curve(b, "loss")
        t_fork = float(loss_all.index.min())
        ratio = _ratio(b)
        tss = crossing(ratio.index, ratio.values, np.ones(len(ratio)), after=t_fork + 1e-12) if len(ratio) else float("nan")
        ref_loss = _curve(reference, "loss")
        ref_end = float(ref_loss.index.max())
        t_end = min(tss if np.isfinite(tss) else float(loss_all.index.max()), float(loss_all.index.max()), ref_end)
        ref_ratio = _ratio(reference)
        diag = diagnose(t_fork=t_fork, t_end=t_end, tss=tss, ref_steps_t=ref_loss.index.to_numpy(),
                        ref_ratio_t=ref_ratio.index.to_numpy(), ref_ratio=ref_ratio.to_numpy(),
                        branch_ratio_t=ratio.index.to_numpy(), branch_ratio=ratio.to_numpy(), validity=validity)
        name = b.lineage["branch"]
        if not diag["valid"]:
            warnings.warn(f"{parent.path}: branch {name!r} forked at step {s}: invalid window "
                          f"({diag['invalid_reason']})", EosbranchWarning, stacklevel=2)
        groups = sorted(set(b.metrics.query("metric == 'loss'").group) - {"all"}) + ["all"]
        ts = np.linspace(t_fork, t_end, grid)
        for g in groups:
            lb, lr = _curve(b, "loss", g), _curve(reference, "loss", g)
            lr = lr[lr.index >= t_fork - 1e-12]
            if len(lb) < 2 or len(lr) < 2:
                continue
            values = be.effect_values(lb.index, lb.values, lr.index, lr.values, t_fork, t_end)
            every = _every_step(b, g, t_fork, t_end) and _every_step(reference, g, t_fork, t_end)
            delta = branch_effect(lb.index, lb.values, lr.index, lr.values, t_fork, t_end, grid)
            central = be.central_on_grid(lb.index, lb.values, lr.index, lr.values, t_fork, t_end, grid)
            curve_parts.append(pd.DataFrame({"branch": name, "group": g, "fork_step": s, "t_eff": ts, "delta": delta,
                                             "delta_central": central}))
            mech_rows.append(_mechanism_row(reference, name, g, s, t_fork, t_end, diag["valid"], values, ts, central))
            rows.append({"branch": name, "group": g, "fork_step": s, "t_star": t_star,
                         "t_fork": t_fork, "t_star_star": tss, "t_end": t_end, **values,
                         "effect": effect(values["delta_central_mean"] if every else values["delta_at_end"]),
                         "source": "every_step" if every else "measurement_steps", **diag})
    df = pd.DataFrame(rows, columns=COLUMNS)
    if incomplete:  # only with --incomplete: those rows are invalid, and say so
        bad_ref = {s for s, r in eos_at.items() if r.lineage.get("branch") in incomplete}
        df["incomplete"] = df.branch.isin(incomplete) | df.fork_step.isin(bad_ref) | ("<reference>" in incomplete)
        # An unfinished run's window is not the one the study defines: invalid, whatever its diagnostics.
        df.loc[df.incomplete, "invalid_reason"] = [("incomplete run; " + r).rstrip("; ")
                                                   for r in df.loc[df.incomplete, "invalid_reason"]]
        df.loc[df.incomplete, "valid"] = False
    parent.store.write_frame("comparison", df)
    curve = pd.concat(curve_parts, ignore_index=True) if curve_parts else pd.DataFrame(columns=CURVE_COLUMNS)
    parent.store.write_frame("comparison_curves", curve[CURVE_COLUMNS])
    parent.store.write_frame("mechanism", pd.DataFrame(mech_rows, columns=MECHANISM_COLUMNS))
    return df


def _mechanism_row(reference: Run, branch: str, group: str, fork_step: int, t_fork: float, t_end: float,
                   valid: bool, values: dict, ts: np.ndarray, central_delta: np.ndarray) -> dict:
    """The central-flow prediction of Δl_k beside the measured one (eosbranch.mechanism), from
    the reference's measurements in the window: means of its mechanism terms, the predicted and
    measured mean Δl_k (central), and the predicted and measured rates (the measured one the
    least-squares slope of the central Δl_k on t_eff)."""
    def series(metric, g=group):
        c = _curve(reference, metric, g)
        return c[(c.index >= t_fork - 1e-12) & (c.index <= t_end + 1e-12)]

    cost, drift = series("oscillation_cost"), series("drift_rate")
    both = cost.index.intersection(drift.index)
    pred = predict(both.to_numpy(), drift.loc[both].to_numpy(), cost.loc[both].to_numpy(), t_fork, t_end)
    mean = lambda c: float(c.mean()) if len(c) else float("nan")  # noqa: E731
    return {"branch": branch, "group": group, "fork_step": fork_step, "valid": valid,
            "oscillation_variance": mean(series("oscillation_variance", "all")),
            "v1_group_curvature": mean(series("v1_group_curvature")), "oscillation_cost": mean(cost),
            "drift_rate": mean(drift), **pred, "measured_delta_mean": values["delta_central_mean"],
            "measured_rate": measured_rate(ts, central_delta)}


def mechanism(run: Union[Run, str, Path]) -> pd.DataFrame:
    """The mechanism table of the last :func:`compare` of ``run`` (``mechanism.parquet``; columns
    :data:`eosbranch.mechanism.MECHANISM_COLUMNS`): per branch and group, the reference's mean
    σ², v1ᵀ∇²l_k v1, oscillation cost and drift rate over the window, and the predicted Δl_k
    (mean and rate) beside the measured one."""
    parent = run if isinstance(run, Run) else Run(run)
    path = parent.path / "mechanism.parquet"
    if not path.is_file():
        raise EosbranchError(f"{parent.path}: no mechanism.parquet; run `eosbranch compare {parent.path}` first")
    return pd.read_parquet(path)


def curves(run: Union[Run, str, Path]) -> pd.DataFrame:
    """Δl_k(t_eff) per branch and group on the common grid of the last :func:`compare` of ``run``
    (``comparison_curves.parquet``; columns :data:`CURVE_COLUMNS`)."""
    parent = run if isinstance(run, Run) else Run(run)
    path = parent.path / "comparison_curves.parquet"
    if not path.is_file():
        raise EosbranchError(f"{parent.path}: no comparison_curves.parquet; run `eosbranch compare {parent.path}` first")
    return pd.read_parquet(path)


def compare_seeds(runs: Sequence[Union[Run, str, Path]], grid: int = 3000,
                  where: Union[str, Path, None] = None, validity: Validity = Validity()) -> pd.DataFrame:
    """:func:`compare` for each parent (same spec, different seeds), stacked with a ``seed`` column.

    Saved as ``comparison_seeds.parquet`` in ``where`` (default: the first run's directory's parent,
    where a sweep keeps its runs and ``sweep.json``)."""
    parents = [r if isinstance(r, Run) else Run(r) for r in runs]
    if not parents:
        raise EosbranchError("compare: no runs given")
    _check_same_spec(parents)
    frames = [compare(p, grid, validity).assign(seed=p.spec.seed) for p in parents]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SEED_COLUMNS)
    df = df[SEED_COLUMNS + (["incomplete"] if "incomplete" in df.columns else [])]  # marked by --incomplete
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


def summarize(df: pd.DataFrame, valid_only: bool = True) -> pd.DataFrame:
    """Per branch and group across seeds: ``n_seeds``, ``n_valid`` (seeds whose window is valid),
    ``invalid_seeds`` (their seeds, comma-separated) and the median, 25% and 75% quantiles (linear
    interpolation, as pandas and NumPy default) of ``delta_at_end``, ``delta_mean`` and
    ``delta_central_mean`` over the valid seeds (every seed with ``valid_only=False``, or for a
    table without validity columns); ``effect`` reads the median of ``delta_central_mean`` where
    every seed's curves were every-step, else of ``delta_at_end``; "no valid window" when no seed
    is valid. Columns: :data:`SUMMARY_COLUMNS`."""
    missing = [c for c in ("seed", "branch", "group", "delta_at_end", "delta_mean") if c not in df.columns]
    if missing:
        raise EosbranchError(f"summarize: needs a per-seed comparison (compare([run, ...])); missing {missing}")
    check_summary_rows(df)
    rows = []
    for (branch, group), d in df.groupby(["branch", "group"], sort=False):
        valid = d["valid"].astype(bool) if "valid" in d.columns else pd.Series(True, index=d.index)
        row = {"branch": branch, "group": group, "n_seeds": int(d.seed.nunique()),
               "n_valid": int(d.seed[valid].nunique()),
               "invalid_seeds": ",".join(str(x) for x in sorted(d.seed[~valid].unique()))}
        use = d[valid] if valid_only else d
        for col in ("delta_at_end", "delta_mean", "delta_central_mean"):
            v = use[col].astype(float) if col in use.columns else pd.Series(dtype=float)
            row.update({f"{col}_median": float(v.median()), f"{col}_q25": float(v.quantile(0.25)),
                        f"{col}_q75": float(v.quantile(0.75))})
        every = "source" in use.columns and len(use) and (use.source == "every_step").all()
        if len(use) == 0:
            row["effect"] = "no valid window"
        else:
            row["effect"] = effect(row["delta_central_mean_median" if every else "delta_at_end_median"])
        rows.append(row)
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
