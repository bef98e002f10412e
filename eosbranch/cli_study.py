"""The commands that read runs: ``compare``, ``groups show``, ``opposing`` and ``report`` (registered on
the app in cli.py), with the comparison and certificate tables they print."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer
import yaml
from rich.table import Column, Table

from .catalog import example_path
from .certificate import certificates
from .cli_console import err, out, warn
from .compare import compare as compare_run
from .compare import compare_seeds, summarize
from .completeness import allow_incomplete
from .data import load_data
from .errors import EosbranchError
from .groups import describe, resolve
from .opposing import find
from .opposing_kind import OPPOSING_GROUPS
from .report import report as report_run
from .run import Run
from .spec import load_spec, read_yaml
from .sweep import is_sweep, sweep_runs


def compare(run_dirs: list[Path] = typer.Argument(
        ..., help="Parent run whose branches to compare; several parents (seeds of one spec) or a sweep directory."),
        incomplete: bool = typer.Option(False, "--incomplete", help="Use unfinished branches or references too, "
                                        "their rows marked incomplete (invalid); by default they are refused.")) -> None:
    """Per branch and group: t*, t**, the branch effect Δl_k on effective time; saves comparison.parquet.
    Several seeds: median and inter-quartile range across them; saves comparison_seeds.parquet."""
    with allow_incomplete(incomplete):
        compare_dirs(run_dirs)


def compare_dirs(run_dirs: list[Path]) -> None:
    where = None
    if len(run_dirs) == 1 and not (run_dirs[0] / "spec.yaml").exists() and is_sweep(run_dirs[0]):
        where = run_dirs[0]
        parents = sweep_runs(where, warn=warn)
    else:
        parents = [Run(p) for p in run_dirs]
    if len(parents) == 1:
        run = parents[0]
        print_comparison(run, compare_run(run))
        print(run.path / "comparison.parquet")
        return
    compare_seeds_table(parents, where)


def print_comparison(run, df) -> None:
    head = df.iloc[0] if len(df) else None
    where = "" if head is None else f", fork step {head.fork_step}, " + (
        f"t* = {head.t_star:.4g} (t_eff)" if np.isfinite(head.t_star) else "no t*")
    source = "" if head is None else ("every-step group losses" if (df.source == "every_step").all()
                                      else "group losses at measurement steps only (may alias)")
    table = Table("branch", Column("group", no_wrap=True), "t**", Column("mean Δl", no_wrap=True),
                  Column("Δl at end", no_wrap=True), Column("effect", no_wrap=True), "window",
                  title=f"{run.name} branches vs EoS{where}; Δl > 0: learns faster at EoS")
    for r in df.itertuples(index=False):
        tss = f"{r.t_star_star:.4g}" if np.isfinite(r.t_star_star) else "not reached"
        table.add_row(r.branch, r.group, tss, f"{r.delta_mean:+.2e}",
                      f"{r.delta_central_at_end:+.2e}", r.effect.replace("learns ", "").replace(" at EoS", ""),
                      "valid" if r.valid else "INVALID")
    err.print(table)
    if len(df):
        err.print(f"Δl from {source}; mean Δl: its exact mean over the window; Δl at end: the central curve "
                  "(consecutive steps averaged) at t**", highlight=False, soft_wrap=True)
    if len(df) and not np.isfinite(df.t_star_star).all():
        err.print("t** not reached: the branch's sharpness never reached its threshold; its window ends at its "
                  "last step", highlight=False, soft_wrap=True)
    print_certificate(run.path)


def compare_seeds_table(parents, where) -> None:
    where = Path(where) if where is not None else parents[0].path.parent
    summary = summarize(compare_seeds(parents, where=where))
    seeds = ", ".join(str(p.spec.seed) for p in parents)
    number = dict(no_wrap=True, min_width=9, justify="right")
    table = Table("branch", Column("group", no_wrap=True), "valid", Column("mean Δl [IQR]", no_wrap=True),
                  Column("at EoS", no_wrap=True),
                  title=f"{parents[0].spec.name}, seeds {seeds}: median across the seeds with a valid window of "
                        "the central mean Δl; Δl > 0: learns faster at EoS")
    for r in summary.itertuples(index=False):
        mean = (f"{r.delta_central_mean_median:+.2e} [{r.delta_central_mean_q25:+.1e}, {r.delta_central_mean_q75:+.1e}]"
                if r.n_valid else "-")
        table.add_row(r.branch, r.group, f"{r.n_valid}/{r.n_seeds}", mean,
                      "no valid window" if r.n_valid == 0 else r.effect.split()[1])
    err.print(table)
    print(where / "comparison_seeds.parquet")


def print_certificate(parent_dir, fork_steps=None) -> None:
    df = certificates(Run(parent_dir), fork_steps)
    if df.empty:
        return
    table = Table("branch", "check", "value", "verdict", "detail", title="integrity certificate")
    for r in df.itertuples(index=False):
        colour = {"pass": "green", "FAIL": "bold red"}.get(r.verdict, "")
        table.add_row(r.branch, r.check, f"{r.value:.3g}", f"[{colour}]{r.verdict}[/]" if colour else r.verdict, r.detail)
    err.print(table)


def groups_show(
    spec: Path = typer.Argument(..., help="Run spec with a groups section, or a group file such as "
                                          "groups/prototypes.yaml."),
    data_spec: Optional[Path] = typer.Option(None, "--data", help="For a group file: the run spec whose data the "
                                             "groups are built on (default: the demo's, examples/quick.yaml)."),
) -> None:
    """Each group's size, class mix and median centroid distance (and, for the random-orthogonal
    control, the distance ratio to the coherent construction)."""
    raw = read_yaml(spec)
    # A group file (one kind, or a list of kinds) has no data of its own: build it on a run spec's.
    group_file = (isinstance(raw, dict) and "kind" in raw) or (
        isinstance(raw, list) and bool(raw) and all(isinstance(e, dict) and "kind" in e for e in raw))
    if group_file:
        source = data_spec or example_path("quick")
        s, groups = load_spec(source), raw
        title = f"groups of {spec} on the data of {source.name if data_spec is None else source}"
    else:
        if data_spec is not None:
            raise EosbranchError(f"{spec}: --data is for a group file; this run spec brings its own data")
        s = load_spec(spec)
        groups, title = s.groups, f"groups of {spec}"
    if not groups:
        raise EosbranchError(f"{spec}: groups: the spec defines no groups")
    data = load_data(s.data, str(source if group_file else spec))
    df = describe(resolve(groups, data.X, data.y, str(spec)))
    table = Table(*df.columns, title=title)
    for row in df.itertuples(index=False):
        table.add_row(*("-" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}" if isinstance(v, float)
                        else str(v) for v in row))
    out.print(table)


def opposing(
    run_dir: Path = typer.Argument(..., help="Run directory."),
    step: str = typer.Option(..., "--step", help="Step T (or 'onset' for t*): rank points by l_i(T+1) - l_i(T)."),
    top: int = typer.Option(20, "--top", help="Size M of the rising and the falling group."),
    window: int = typer.Option(20, "--window", help="Steps over which the pair's antiphase is measured (at least 2)."),
) -> None:
    """Find opposing signals: the M points whose loss rises most and falls most on one step."""
    run = Run(run_dir)
    res = find(run, step, top=top, window=window)
    pts = Table("role", "index", "label", "loss before", "loss after", "change", "pred before", "pred after",
                title=f"opposing signals at step {res.step}")
    for r in res.points.itertuples():
        pts.add_row(r.role, str(r.index), str(r.label), f"{r.loss_before:.4g}", f"{r.loss_after:.4g}",
                    f"{r.loss_change:+.4g}", f"{r.pred_before:.4g}", f"{r.pred_after:.4g}")
    err.print(pts)
    pairs = Table("pair", "size", "alternation", "amplitude a", "amplitude b", "correlation",
                  title=f"antiphase over steps {res.step}..{res.step + int(res.pairs['window'].iloc[0])}")
    for r in res.pairs.itertuples():
        pairs.add_row(r.pair, str(r.size), f"{r.alternation_rate:.2f}", f"{r.amplitude_a:.3g}",
                      f"{r.amplitude_b:.3g}", f"{r.correlation:+.2f}")
    err.print(pairs)
    err.print(f"fraction of points whose loss rose on step {res.step}: {res.pairs.fraction_loss_increased.iloc[0]:.3f}")
    run.store.write_frame("opposing_points", res.points.assign(step=res.step))
    run.store.write_frame("opposing_pairs", res.pairs)
    run.store.write_text(OPPOSING_GROUPS, yaml.safe_dump([res.group_spec], sort_keys=False))
    print(run.path / "opposing_pairs.parquet")


def report(
    run_dirs: list[Path] = typer.Argument(..., help="Parent run (its branches are found next to it); several "
                                          "parents (seeds of one spec) or a sweep directory."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Directory for the figures and summary.md "
                                           "(default: RUN/report, RUN the first run)."),
    incomplete: bool = typer.Option(False, "--incomplete", help="Use unfinished branches or references too, "
                                    "their rows marked incomplete (invalid); by default they are refused."),
) -> None:
    """Figures (PNG) and summary.md of a study: sharpness, group losses, Δl_k per group (median and
    inter-quartile band across seeds), alignment, opposing pairs, fraction of curvature."""
    with allow_incomplete(incomplete):
        path = report_run(run_dirs, out=out_dir, progress=lambda m: err.print(m, highlight=False, soft_wrap=True))
    print(path)
