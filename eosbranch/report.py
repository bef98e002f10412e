"""``eosbranch report``: a study's figures and a short summary, from its run directories.

``report(run)`` loads the run and its branches (``compare.branches_of``), compares them
(``compare.compare``: t*, t**, Δl_k per group) and writes into ``RUN/report/``:

- ``fig1_sharpness.png`` … ``fig6_curvature_fraction.png`` (see :mod:`eosbranch.plots`);
- ``summary.md``: t*, t**, Δl_k per group at t** read as "learns faster/slower at EoS", the
  integrity certificate (events named ``certificate…``), the figures with one-line captions, and
  the reason for every figure that was skipped.

Several runs are the seeds of one study: figure 3 shows the median and inter-quartile range of
Δl_k across seeds on time since each seed's fork, the summary the median and IQR of Δl_k at t**;
the other figures show the first run. A run without branches gets a reduced report (its own
sharpness, losses, probes and curvature; figure 3 and the Δ table are replaced by a note on how
to fork it), so a trunk can be inspected before it is forked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import pandas as pd
import yaml

from . import branch_effect as be
from . import plots
from .atomic_file import check_output_dir, write_output
from .compare import branch_effect, compare_seeds, summarize, threshold_ratio
from .errors import EosbranchError
from .groups import load_group_spec
from .opposing import loss_trajectory, pair_statistics
from .opposing_kind import OPPOSING_GROUPS
from .run import Run
from .study import load_study_run  # noqa: F401  (part of the report API)
from .sweep_manifest import is_sweep, sweep_runs

FIGURES = {
    1: ("fig1_sharpness.png", "sharpness λ1 per branch on effective time; thresholds as horizontal lines, t* and "
        "t** as vertical lines, the comparison window shaded."),
    2: ("fig2_group_losses.png", "each group's loss per branch (log scale) on effective time, zoomed on the "
        "comparison window (the whole run without branches); EoS reference solid, other branches dashed."),
    3: ("fig3_branch_effect.png", "Δℓ_k = ℓ_k(branch) − ℓ_k(EoS) per group on effective time (median and "
        "inter-quartile band across seeds when several are given); above zero the group learns faster at EoS."),
    4: ("fig4_alignment.png", "per group and branch: alignment cos²θ_k with the top eigenvector v1, curvature "
        "influence C_k = ⟨g_k, v1⟩² and gradient norm ‖g_k‖."),
    5: ("fig5_opposing.png", "the opposing pair's group losses against the full loss and a random subset of "
        "the same size, step by step from the step they were found at; right: change since that step."),
    6: ("fig6_curvature_fraction.png", "fraction of curvature ‖v1[p]‖² per parameter tensor at the fork, "
        "mid-window and the window's end, per branch."),
}
SUMMARY = "summary.md"


def effect_bands(seeds: list, grid: int = 3000) -> pd.DataFrame:
    """Δl_k per branch and group on a common grid: per seed ``compare.branch_effect`` over that
    seed's window (every-step curves), then the median and quartiles across seeds; ``central``
    is the median of the central curves (consecutive steps averaged, ``eosbranch.branch_effect``).

    One seed: x is t_eff over [t_fork, t_end] (the curve ``compare`` summarises; its last value is
    ``delta_at_end``). Several seeds: x is time since each seed's fork, up to the shortest window.
    Columns: branch, group, x, median, q25, q75, n_seeds, central."""
    relative = len(seeds) > 1
    out = []
    branches = list(dict.fromkeys(b for s in seeds for b in s.comparison.branch))
    for b in branches:
        rows = [(s, s.comparison[s.comparison.branch == b]) for s in seeds]
        rows = [(s, c) for s, c in rows if len(c)]
        span = min(float(c.t_end.iloc[0] - c.t_fork.iloc[0]) for _, c in rows)
        groups = list(dict.fromkeys(g for _, c in rows for g in c.group))
        for g in groups:
            curves, centrals = [], []
            for s, c in rows:
                if g not in set(c.group):
                    continue
                t_fork, t_end = float(c.t_fork.iloc[0]), float(c.t_end.iloc[0])
                lb, lr = s.curve(b, "loss", g), s.curve(s.reference, "loss", g)
                lr = lr[lr.index >= t_fork - 1e-12]  # as compare() does
                end = t_fork + span if relative else t_end
                curves.append(branch_effect(lb.index, lb.values, lr.index, lr.values, t_fork, end, grid))
                centrals.append(be.central_on_grid(lb.index, lb.values, lr.index, lr.values, t_fork, end, grid))
                x = np.linspace(0.0, span, grid) if relative else np.linspace(t_fork, t_end, grid)
            d = np.vstack(curves)
            q25, med, q75 = np.percentile(d, [25, 50, 75], axis=0)
            out.append(pd.DataFrame({"branch": b, "group": g, "x": x, "median": med, "q25": q25, "q75": q75,
                                     "n_seeds": len(curves), "central": np.median(np.vstack(centrals), axis=0)}))
    cols = ["branch", "group", "x", "median", "q25", "q75", "n_seeds", "central"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def window_ratios(seeds: list) -> tuple[pd.DataFrame, dict]:
    """The EoS reference's S / threshold over each branch's window, per seed (x as in
    :func:`effect_bands`), and per branch ``(n_valid, n_seeds, reasons)`` from compare's
    validity columns. Columns of the first: branch, seed, x, ratio."""
    relative = len(seeds) > 1
    parts, validity = [], {}
    for s in seeds:
        for b, c in s.comparison.groupby("branch", sort=False):
            head = c.iloc[0]
            t_fork, t_end = float(head.t_fork), float(head.t_end)
            r = threshold_ratio(s.lines[s.reference])
            r = r[(r.index >= t_fork - 1e-12) & (r.index <= t_end + 1e-12)]
            parts.append(pd.DataFrame({"branch": b, "seed": s.seed, "x": r.index - (t_fork if relative else 0.0),
                                       "ratio": r.to_numpy()}))
            ok = bool(head.valid) if "valid" in c.columns else True
            n_valid, n, reasons = validity.get(b, (0, 0, []))
            reason = str(head.invalid_reason) if "invalid_reason" in c.columns else ""
            validity[b] = (n_valid + ok, n + 1, reasons + ([] if ok else [reason]))
    cols = ["branch", "seed", "x", "ratio"]
    return (pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)), validity


def opposing_trace(run: Run, seed) -> tuple[Optional[dict], str]:
    """The opposing pair of ``run``, replayed step by step: (trace for ``plots.plot_opposing``, note).

    The pair comes from ``opposing_groups.yaml`` (written by ``eosbranch opposing``, with the step
    and window of ``opposing_pairs.parquet``) or else from the spec's groups of kind ``opposing``
    (window of 20 steps from t*). The losses of every point come from an exact replay of the run
    (``opposing.loss_trajectory``): the stored tables hold them only at measurement steps, too
    sparse to show a step-to-step antiphase."""
    entry, step, window, source = None, None, 20, ""
    f = run.path / OPPOSING_GROUPS
    if f.is_file():
        found = [e for e in (yaml.safe_load(f.read_text()) or []) if isinstance(e, dict) and e.get("kind") == "opposing"]
        if found:
            entry, source = found[0], "found by `eosbranch opposing`"
            pairs_file = run.path / "opposing_pairs.parquet"
            if pairs_file.is_file():
                pairs = pd.read_parquet(pairs_file)
                step, window = int(pairs.step.iloc[0]), int(pairs.window.iloc[0])
    if entry is None:
        found = [e for e in load_group_spec(run.spec.groups, str(run.path / "spec.yaml")) if e["kind"] == "opposing"]
        if not found:
            return None, (f"{run.name} has no opposing pair (run `eosbranch opposing {run.path} --step onset`, "
                          "or track a group of kind `opposing`)")
        entry, source = found[0], "groups of kind opposing in the spec"
    if step is None:
        if seed.t_star_step is None:
            return None, f"{run.name}: the opposing pair has no step to start from (no t*)"
        step = seed.t_star_step
    window = min(window, run.spec.steps - step)
    if window < 2:
        return None, f"{run.name}: fewer than 2 steps after step {step} to follow the opposing pair"
    losses, _, exp = loss_trajectory(run, step, window)
    name_rise, name_fall = entry.get("name_rise", "opposing_rise"), entry.get("name_fall", "opposing_fall")
    if source.startswith("groups") and name_rise in exp.groups:
        rise, fall = (exp.groups[n].cpu().numpy() for n in (name_rise, name_fall))
    else:
        rise, fall = np.asarray(entry["indices_rise"]), np.asarray(entry["indices_fall"])
    train = np.arange(losses.shape[1]) if exp.train_index is None else exp.train_index.cpu().numpy()
    pool = np.setdiff1d(train, np.union1d(rise, fall))
    subset = np.random.default_rng(0).choice(pool, size=min(len(rise), len(pool)), replace=False)
    series = {"rise": losses[:, rise].mean(1), "fall": losses[:, fall].mean(1), "full": losses[:, train].mean(1),
              "random": losses[:, subset].mean(1)}
    steps = np.arange(step, step + window + 1)
    frame = pd.concat([pd.DataFrame({"step": steps, "series": k, "loss": v}) for k, v in series.items()],
                      ignore_index=True)
    pair = pair_statistics(series["rise"], series["fall"])
    full_amp = float(np.abs(np.diff(series["full"])).mean())
    note = (f"alternation {pair['alternation_rate']:.2f}, correlation of step changes {pair['correlation']:+.2f}, "
            f"mean |step change| {pair['amplitude_a']:.2g} / {pair['amplitude_b']:.2g} (full loss {full_amp:.2g})")
    return ({"title": f"{run.name}: pair {source}, steps {step}–{step + window}", "names": (name_rise, name_fall),
             "frame": frame, "size": len(rise), "note": note, "statistics": pair, "step": step, "window": window},
            note)


def _num(v: float, fmt: str = ".6g") -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, fmt)


def _delta(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:+.3e}"


def _reading(delta: float, effect: str) -> str:
    """compare's reading of Δ, except that an exact zero (e.g. a null branch) is no difference."""
    return "no difference (Δ = 0)" if delta == 0 else effect


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def write_summary(path: Path, runs: list[Run], seeds: list, figures: dict, skipped: dict, opposing_notes: list) -> Path:
    multi = len(seeds) > 1
    name = seeds[0].name if not multi else f"{len(seeds)} seeds of {runs[0].spec.name}"
    lines = [f"# eosbranch report: {name}", ""]
    lines += [f"Runs: {', '.join(f'`{r.path}` (seed {s.seed})' for r, s in zip(runs, seeds))}.", ""]
    lines += ["## Onset and comparison window", "",
              "t* is the EoS onset (first measurement after the warm-up with sharpness ≥ threshold); t** is the "
              "first time after the fork at which a branch's own sharpness reaches its own threshold; the window "
              "[t*, t**] ends at the branch's end where t** is not reached. Times are effective time t_eff = Σ η.", ""]
    rows = []
    for s in seeds:
        t_star = f"{_num(s.t_star)} (step {s.t_star_step})" if s.t_star_step is not None else "not reached"
        if s.comparison.empty:
            rows.append([s.name, str(s.seed), t_star, "—", "—", "—", "—"])
        for b, c in s.comparison.groupby("branch", sort=False):
            r = c.iloc[0]
            tss = _num(r.t_star_star) if np.isfinite(r.t_star_star) else "not reached"
            ok = bool(r.valid) if "valid" in c.columns else True
            why = "valid" if ok else f"**invalid**: {r.invalid_reason}"
            rows.append([s.name, str(s.seed), t_star, f"{b} vs {s.reference}", str(int(r.fork_step)), tss, _num(r.t_end),
                         why])
    lines += _table(["run", "seed", "t*", "branch", "fork step", "t**", "window end t_end", "window"], rows) + [""]
    lines += ["A window is valid when the branch reaches its own t** (not a step cap) and stays below its own "
              "threshold until then, and the EoS reference hovers (median S/threshold within 10 % of 1, at least "
              "half of its measurements within ±10 %; at least 3 measurements and 20 steps; `eosbranch.window`). "
              "Invalid windows are reported, never summarised as effects.", ""]

    lines += ["## Branch effect Δℓ_k per group", ""]
    comps = [s.comparison for s in seeds if len(s.comparison)]
    if not comps:
        lines += [f"No branches to compare: fork the run first, e.g. `eosbranch fork --run {runs[0].path} --at onset 0 "
                  "--branches exit_eos --steps 200` (with an `eos` branch as the reference, see README), then "
                  "report again.", ""]
    else:
        lines += ["Δℓ_k = ℓ_k(branch) − ℓ_k(EoS) on a common t_eff grid, at the window's end t** (or the branch's "
                  "end) and averaged over the window. Δ > 0: the group's loss is lower at EoS, it **learns faster "
                  "at EoS**; Δ < 0: it learns slower at EoS.", ""]
        if not multi:
            c = seeds[0].comparison
            central = "delta_central_at_end" in c.columns
            lines += _table(["branch", "group", "Δℓ_k at t**", "mean Δℓ_k over the window", "central Δℓ_k at t**",
                             "reading"],
                            [[r.branch, r.group, _delta(r.delta_at_end), _delta(r.delta_mean),
                              _delta(r.delta_central_at_end) if central else "—",
                              _reading(r.delta_central_mean if central and r.source == "every_step" else r.delta_at_end,
                                       r.effect) + ("" if not central or r.valid else " (invalid window)")]
                             for r in c.itertuples()]) + [""]
        else:
            per_seed = pd.concat([s.comparison.assign(seed=s.seed) for s in seeds if len(s.comparison)],
                                 ignore_index=True)
            summ = summarize(per_seed)
            faster = per_seed.assign(up=per_seed.delta_at_end > 0).groupby(["branch", "group"]).up.sum()
            summ["n_faster"] = [int(faster[(b, g)]) for b, g in zip(summ.branch, summ.group)]
            lines += _table(["branch", "group", "valid seeds", "Δℓ_k at t**: median [q25, q75]",
                             "mean Δℓ_k: median [q25, q75]", "seeds with Δ > 0", "reading (median)"],
                            [[r.branch, r.group, f"{r.n_valid}/{r.n_seeds}",
                              f"{_delta(r.delta_at_end_median)} [{_delta(r.delta_at_end_q25)}, {_delta(r.delta_at_end_q75)}]",
                              f"{_delta(r.delta_mean_median)} [{_delta(r.delta_mean_q25)}, {_delta(r.delta_mean_q75)}]",
                              f"{r.n_faster}/{r.n_seeds}", _reading(r.delta_at_end_median, r.effect)]
                             for r in summ.itertuples()]) + [""]
            lines += ["Per seed, Δℓ_k at t**:", ""]
            per = []
            for b in dict.fromkeys(summ.branch):
                for g in dict.fromkeys(summ[summ.branch == b].group):
                    vals = []
                    for s in seeds:
                        c = s.comparison
                        hit = c[(c.branch == b) & (c.group == g)]
                        vals.append(_delta(float(hit.delta_at_end.iloc[0])) if len(hit) else "—")
                    per.append([b, g, *vals])
            lines += _table(["branch", "group", *(f"seed {s.seed}" for s in seeds)], per) + [""]

    lines += ["## Integrity certificate", ""]
    ev = pd.concat([s.events for s in seeds], ignore_index=True)
    cert = ev[ev.event.astype(str).str.startswith("certificate")]
    if cert.empty:
        lines += ["No certificate events in these runs.", ""]
    else:
        lines += _table(["run", "branch", "event", "step", "value", "detail"],
                        [[str(r.run), str(r.branch), str(r.event), str(r.step), _num(r.value), str(r.detail or "")]
                         for r in cert.itertuples()]) + [""]

    lines += ["## Figures", ""]
    for k, (file, caption) in FIGURES.items():
        if k in figures:
            lines.append(f"{k}. [`{file}`]({file}): {caption}")
        else:
            lines.append(f"{k}. skipped: {skipped[k]}")
    lines.append("")
    if multi:
        lines += [f"Figures 1, 2, 4, 5 and 6 show the first run (seed {seeds[0].seed}); figure 3 aggregates all seeds.", ""]
    for note in opposing_notes:
        lines += [f"Opposing pair: {note}.", ""]
    write_output(path, "\n".join(lines).encode())  # atomic; refuses a planted symlink
    return path


def report(run_or_runs: Union[Run, str, Path, Iterable], out: Union[str, Path, None] = None,
           progress: Callable[[str], None] = lambda m: None) -> Path:
    """Write a study's figures and ``summary.md`` into ``out`` (default ``RUN/report/``, RUN the
    first run); returns the path of ``summary.md``. Several runs (or a sweep directory, whose
    report defaults to ``SWEEP/report/``) are seeds of one study."""
    items = [run_or_runs] if isinstance(run_or_runs, (Run, str, Path)) else list(run_or_runs)
    if not items:
        raise EosbranchError("report needs at least one run directory")
    if len(items) == 1 and not isinstance(items[0], Run) and not (Path(items[0]) / "spec.yaml").exists():
        if is_sweep(items[0]):  # a sweep directory: its parents are the seeds; the report goes next to them
            out = Path(out) if out is not None else Path(items[0]) / "report"
            items = sweep_runs(items[0], warn=progress)
    runs = [r if isinstance(r, Run) else Run(r) for r in items]
    paths = [r.path.resolve() for r in runs]
    if len(set(paths)) < len(paths):
        raise EosbranchError("the same run is given twice; pass each seed's run once")
    out = Path(out) if out is not None else runs[0].path / "report"
    check_output_dir(out)  # a planted RUN/report -> elsewhere: refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    comparisons = {}
    if len(runs) > 1:  # seeds of one spec (checked): per-seed rows, saved as comparison_seeds.parquet
        per_seed = compare_seeds(runs)
        comparisons = {seed: d.drop(columns="seed").reset_index(drop=True) for seed, d in per_seed.groupby("seed")}
    seeds = [load_study_run(r, comparisons.get(r.spec.seed)) for r in runs]
    first = seeds[0]

    traces, missing = [], []
    for r, s in zip(runs, seeds):
        trace, note = opposing_trace(r, s)
        (traces if trace is not None else missing).append(trace or note)
    traces = traces[:3]  # one row per seed, at most three
    names = {g for s in seeds for m in s.lines.values() for g in m.loc[m.metric == "loss", "group"]}
    names |= {n for t in traces for n in t["names"]}
    colors = plots.group_colors(names)

    bands = effect_bands(seeds)
    ratios, validity = window_ratios(seeds)
    makers = {
        1: lambda p: plots.plot_sharpness(first, p),
        2: lambda p: plots.plot_group_losses(first, p, colors),
        3: lambda p: plots.plot_branch_effect(bands, p, colors, reference=first.reference, relative=len(seeds) > 1,
                                              ratios=ratios, validity=validity),
        4: lambda p: plots.plot_alignment(first, p, colors),
        5: lambda p: plots.plot_opposing(traces, p, colors),
        6: lambda p: plots.plot_curvature_fraction(first, p),
    }
    figures, skipped = {}, {}
    for k, make in makers.items():
        file = out / FIGURES[k][0]
        try:
            figures[k] = make(file)
            progress(f"figure {k}: {figures[k]}")
        except plots.NothingToPlot as e:
            file.unlink(missing_ok=True)  # never leave a stale figure from an earlier report
            skipped[k] = "; ".join(missing) if k == 5 and missing else str(e)
            progress(f"figure {k} skipped: {skipped[k]}")
    return write_summary(out / SUMMARY, runs, seeds, figures, skipped, [f"{t['title']}: {t['note']}" for t in traces])
