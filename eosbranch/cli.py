"""The command line: a thin skin over the API (typer + rich).

Results go to stdout (the run directory on the last line); progress and one-line errors go to
stderr. User mistakes exit with code 2 and no traceback; set ``EOSBRANCH_DEBUG=1`` to see it.

Size: about 530 lines, one typer app of nine thin commands and their table printing; kept whole so
the app and its generated reference (``cli/``) are read in one place.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from typer._completion_shared import get_completion_script
from typer.cli import get_docs_for_click

from .catalog import example_path
from .certificate import certificates
from .compare import compare as compare_run
from .compare import compare_seeds, summarize
from .completeness import allow_incomplete
from .data import load_data
from .errors import EosbranchError, EosbranchWarning
from .fork import fork as fork_run
from .groups import describe, resolve
from .opposing import find
from .opposing_kind import OPPOSING_GROUPS
from .report import report as report_run
from .run import Run
from .spec import load_spec, read_yaml
from .sweep import is_sweep, sweep_runs
from .sweep import sweep as run_sweep
from .train import resume as resume_run
from .train import run_dir_for
from .train import train as train_run

app = typer.Typer(
    name="eosbranch",
    help="Causal studies of the edge of stability: train, fork into branches, measure per group.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _user_errors(fn):
    """Turn an EosbranchError into one line on stderr and exit code 2 (inside the app, so
    CliRunner tests see the same path as a user)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        shown = warnings.showwarning

        def show(message, category, *rest, **kw):  # the store's damage reports: one line each
            if issubclass(category, EosbranchWarning):
                return _warn(str(message))
            return shown(message, category, *rest, **kw)

        warnings.showwarning = show
        try:
            return fn(*args, **kwargs)
        except EosbranchError as e:
            if os.environ.get("EOSBRANCH_DEBUG"):
                raise
            # escape: a message quoting the user's input (e.g. "[/x]") is text, not rich markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if type(e).__name__ == "Interrupted" else 2)
        finally:
            warnings.showwarning = shown

    return wrapper


# torch threads of a new run trained from the command line (`train --threads`; `sweep --threads` has
# the same default): one thread is never oversubscribed by another busy process, and a sweep's runs
# then equal the same `train` + `fork` calls made one by one.
DEFAULT_THREADS = 1


def _threads_for(spec, out_dir: Path, threads: Optional[int]) -> Optional[int]:
    """--threads as given; else DEFAULT_THREADS for a new run, and None (its recorded count) for a
    run that exists."""
    if threads is None and not (run_dir_for(spec, out_dir) / "spec.yaml").exists():
        return DEFAULT_THREADS
    return threads


def _warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def train(
    spec: Optional[Path] = typer.Argument(None, help="Spec YAML file."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total number of steps (overrides the spec)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (overrides the spec)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run from its last checkpoint."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default 1 for a new run; a run "
                                          "that exists keeps the count recorded in its lineage.json)."),
    no_limits: bool = typer.Option(False, "--no-limits", help="Skip the memory estimate that refuses a spec this "
                                   "machine cannot hold (size bounds still apply)."),
) -> None:
    """Train SPEC into a new run directory (or continue one) and print its path."""
    if resume is not None:
        if spec is not None or seed is not None:
            raise EosbranchError("--resume takes the run's own spec; pass only --steps to extend it")
        run = resume_run(resume, steps=steps, progress=True, warn=_warn, threads=threads)
    elif spec is None:
        raise EosbranchError("give a SPEC.yaml to train, or --resume RUN")
    else:
        threads = _threads_for(load_spec(spec, steps=steps, seed=seed), out_dir, threads)
        run = train_run(spec, out_dir, steps=steps, seed=seed, progress=True, warn=_warn, threads=threads,
                        limits=not no_limits)
    _summary(run)
    print(run.path)


@app.command()
@_user_errors
def demo(
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total number of steps (overrides the default)."),
) -> None:
    """Run the embedded default offline: train digits 3 vs 5 with the prototype groups, fork at
    the EoS onset into `eos` and `exit_half` (lr x 0.5, the 2026 study's factor for this class
    pair), run the exit branch to its own t** and the EoS branch as far in effective time, then
    print the per-group comparison on effective time and the integrity certificate."""
    s = load_spec(example_path("quick"), steps=steps)
    run = train_run(s, out_dir, progress=True, warn=_warn, threads=_threads_for(s, out_dir, None))
    _summary(run)
    if (run.events.event == "t_star").any():
        branches = {"branches": [{"name": "eos"}, {"name": "exit_half", "interventions": [{"kind": "lr", "factor": 0.5}]}]}
        for b in fork_run(run, at=("onset", 0), branches=branches, until="tss", progress=True, warn=_warn):
            err.print(f"branch {b.lineage['branch']}: {b.path}")
        _print_comparison(run, compare_run(run))
    else:
        err.print("the run did not reach the EoS (no t*), so there is nothing to fork")
    print(run.path)


@app.command()
@_user_errors
def runs(out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories.")) -> None:
    """List the runs under --out, at any depth (e.g. runs/<example>/...), with their lineage and
    progress; each run's path is printed whole, ready to copy."""
    table = Table("run", "branch", "parent", "fork step", "steps", "complete")
    found = {p.parent for p in out_dir.rglob("spec.yaml") if p.is_file()}
    found |= {p.parent for p in out_dir.rglob("record.json") if p.is_file()}  # a run whose spec.yaml was deleted
    for path in sorted(found):
        try:
            r = Run(path)
            lin, ck, steps, complete = r.lineage, r.checkpoints, r.spec.steps, r.complete
        except FileNotFoundError:
            # Removed between the glob and the read (a failed start cleans up after itself while
            # other runs are being written): it is no longer a run, so it is not listed.
            continue
        except EosbranchError as e:  # a damaged run is listed as such (and said why), never dropped
            _warn(str(e))
            table.add_row(str(path), "?", "?", "?", "?", "damaged")
            continue
        table.add_row(str(path), str(lin.get("branch")), str(lin.get("parent") or "-"),
                      "-" if lin.get("fork_step") is None else str(lin["fork_step"]),
                      f"{max(ck) if ck else 0}/{steps}", "yes" if complete else "no")
    # Wider than the terminal if need be: a path cut to "runs/quick-s0-2c…" cannot be copied.
    need = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(width=max(out.width, need)).print(table)


@app.command()
@_user_errors
def fork(
    at: str = typer.Option(..., "--at", help="Where to fork: 'step N', 'onset' (t*), 'onset K' (t* + K steps) or "
                           "'teff T'."),
    at_value: Optional[str] = typer.Argument(None, hidden=True, metavar="",
                                             help="The value after --at's kind (--at step 500)."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="Parent run (default: the newest run under ./runs)."),
    branches: str = typer.Option("exit_eos", "--branches", help="A name from interventions/ or a YAML file."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps after the fork (default: to the parent's end)."),
    until: Optional[str] = typer.Option(None, "--until", help="'tss': each branch to its own t** plus a margin "
                                        "(branches without interventions: as far in t_eff as the others)."),
    teff: Optional[float] = typer.Option(None, "--teff", help="Effective time T to run after the fork."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Cap for --until/--teff, in steps after the "
                                            "fork (default: 10x the parent's steps)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads of the branches (default: the "
                                          "parent's recorded count, which its bit-exact replay needs)."),
) -> None:
    """Fork a run's exact state into branches; prints the integrity certificate, then each
    branch's run directory on its own line, last."""
    kind, value = _parse_at(at if at_value is None else f"{at} {at_value}", "--at")
    if run_dir is None:
        # Parent runs only: a branch is written after its parent, but forking it again is rarely meant.
        candidates = [p.parent for p in Path("runs").rglob("spec.yaml") if p.is_file() and not _is_branch(p.parent)]
        if not candidates:
            raise EosbranchError("no runs under ./runs; pass --run RUN")
        run_dir = max(candidates, key=lambda p: (p / "spec.yaml").stat().st_mtime)
    done = fork_run(run_dir, at=(kind, value), branches=branches, steps=steps, until=until, teff=teff,
                    max_steps=max_steps, progress=True, warn=_warn, threads=threads)
    _print_certificate(done[0].path.parent / done[0].lineage["parent"], {b.lineage["fork_step"] for b in done})
    for b in done:
        print(b.path)


def _is_branch(path: Path) -> bool:
    try:
        return Run(path).lineage.get("parent") is not None
    except Exception:  # an unreadable lineage is not a branch's: the listing must not fail on it
        return False


def _print_certificate(parent_dir, fork_steps=None) -> None:
    df = certificates(Run(parent_dir), fork_steps)
    if df.empty:
        return
    table = Table("branch", "check", "value", "verdict", "detail", title="integrity certificate")
    for r in df.itertuples(index=False):
        colour = {"pass": "green", "FAIL": "bold red"}.get(r.verdict, "")
        table.add_row(r.branch, r.check, f"{r.value:.3g}", f"[{colour}]{r.verdict}[/]" if colour else r.verdict, r.detail)
    err.print(table)


@app.command()
@_user_errors
def compare(run_dirs: list[Path] = typer.Argument(
        ..., help="Parent run whose branches to compare; several parents (seeds of one spec) or a sweep directory."),
        incomplete: bool = typer.Option(False, "--incomplete", help="Use unfinished branches or references too, "
                                        "their rows marked incomplete (invalid); by default they are refused.")) -> None:
    """Per branch and group: t*, t**, the branch effect Δl_k on effective time; saves comparison.parquet.
    Several seeds: median and inter-quartile range across them; saves comparison_seeds.parquet."""
    with allow_incomplete(incomplete):
        _compare(run_dirs)


def _compare(run_dirs: list[Path]) -> None:
    where = None
    if len(run_dirs) == 1 and not (run_dirs[0] / "spec.yaml").exists() and is_sweep(run_dirs[0]):
        where = run_dirs[0]
        parents = sweep_runs(where, warn=_warn)
    else:
        parents = [Run(p) for p in run_dirs]
    if len(parents) == 1:
        run = parents[0]
        _print_comparison(run, compare_run(run))
        print(run.path / "comparison.parquet")
        return
    _compare_seeds(parents, where)


def _print_comparison(run, df) -> None:
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
    _print_certificate(run.path)


def _compare_seeds(parents, where) -> None:
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


def _parse_fork(text: Optional[str]) -> Optional[tuple]:
    """'onset' -> (onset, 0); 'onset 5', 'step 500', 'teff 4.0' -> (kind, value)."""
    if text is None:
        return None
    return _parse_at(text, "--fork")


def _parse_at(text: str, option: str) -> tuple:
    """`fork --at` and `sweep --fork` read the same syntax: 'onset' (K = 0), 'onset K', 'step N', 'teff T'."""
    parts = text.replace("=", " ").split()
    usage = f"{option}: expected 'onset', 'onset K', 'step N' or 'teff T'; got {text!r}"
    if not parts or parts[0] not in ("onset", "step", "teff") or len(parts) > 2 or (len(parts) == 1 and parts[0] != "onset"):
        raise EosbranchError(usage)
    if len(parts) == 1:
        return ("onset", 0)
    try:
        return (parts[0], float(parts[1]) if parts[0] == "teff" else int(parts[1]))
    except ValueError:
        raise EosbranchError(usage) from None


def _parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise EosbranchError(f"--seeds: expected comma-separated integers like 1,2,3; got {text!r}") from None


@app.command()
@_user_errors
def sweep(
    spec: Path = typer.Argument(..., help="Spec YAML file."),
    seeds: str = typer.Option(..., "--seeds", help="Comma-separated seeds, e.g. 1,2,3: one job per seed."),
    fork_at: Optional[str] = typer.Option(None, "--fork", help="Fork each run: 'onset' (t*), 'onset K', 'step N' or 'teff T'."),
    branches: str = typer.Option("exit_eos", "--branches", help="A name from interventions/ or a YAML file."),
    until: Optional[str] = typer.Option(None, "--until", help="Branches run to their own t** ('tss')."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps after the fork (default: to the parent's end)."),
    teff: Optional[float] = typer.Option(None, "--teff", help="Branches run to this effective time."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Jobs at once (1: one after another in this process)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads per job (default 1, or the count this sweep ran with)."),
    executor: str = typer.Option("local", "--executor", help="local (process pool), ray or slurm (submitit)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (--executor ray)."),
    folder: Optional[Path] = typer.Option(None, "--folder", help="submitit's folder (--executor slurm; default OUT/.submitit)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory for the run directories and sweep.json."),
    no_limits: bool = typer.Option(False, "--no-limits", help="Skip the memory estimate that refuses a spec this "
                                   "machine cannot hold (size bounds still apply)."),
) -> None:
    """Train SPEC once per seed (and fork each run) through an executor; prints the run directories.
    Re-running the same command redoes only what is missing (failed or unfinished jobs)."""
    options = {k: v for k, v in (("address", address), ("folder", None if folder is None else str(folder)))
               if v is not None}
    seed_list = _parse_seeds(seeds)
    cols = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    bar = Progress(*cols, console=err, transient=False)
    tasks: dict = {}

    def on_start(calls) -> None:  # everything is checked: show the jobs
        tasks["all"] = bar.add_task(f"sweep ({executor}, {jobs} at once)", total=len(calls), status="")
        tasks.update({j.seed: bar.add_task(j.name, total=1, status="waiting") for j in calls})
        bar.start()

    def on_done(res) -> None:
        colour = "red" if res.failed else "green"
        bar.update(tasks[res.seed], completed=1, status=f"[{colour}]{res.status}[/] {res.seconds:.1f} s")
        bar.advance(tasks["all"])

    try:
        result = run_sweep(spec, seed_list, out_dir, fork=_parse_fork(fork_at), branches=branches, until=until,
                           steps=steps, teff=teff, jobs=jobs, executor=executor, threads=threads,
                           on_start=on_start, on_done=on_done, warn=_warn, limits=not no_limits, **options)
    finally:
        bar.stop()
    table = Table("seed", "run", "branches", "status", title=f"sweep of {spec} ({result.threads} torch thread(s) per job)")
    for j in result.jobs:
        status = "[red]failed[/]" if j.failed else j.status
        table.add_row(str(j.seed), Path(j.run).name if j.run else "-", str(len(j.branches)), status)
    err.print(table)
    for j in result.jobs:
        for w in j.warnings:
            _warn(f"seed {j.seed}: {w}")
    for j in result.failed:
        err.print(f"[bold red]failed:[/] {j.describe()}", highlight=False, soft_wrap=True)
    for j in result.jobs:
        if not j.failed:
            print(j.run)
    if result.failed:
        err.print(f"{len(result.failed)} of {len(result.jobs)} jobs failed; fix the cause and re-run the same "
                  "command (finished runs are reused)", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


groups_app = typer.Typer(help="Group specs: sizes and geometry.", no_args_is_help=True)
app.add_typer(groups_app, name="groups")


@groups_app.command("show")
@_user_errors
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


@app.command()
@_user_errors
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


@app.command()
@_user_errors
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


def _summary(run) -> None:
    """A short rich table on stderr: what ran and how it ended (stdout stays machine-readable)."""
    m = run.metrics
    spec = run.spec
    table = Table(title=f"{run.name}", show_header=False)
    table.add_row("data", spec.data["kind"])
    table.add_row("model / loss / optimizer", f"{spec.model['kind']} / {spec.loss['kind']} / "
                  f"{spec.optimizer['kind']} lr={spec.optimizer['lr']}")
    table.add_row("steps", str(spec.steps))
    for metric in ("loss", "accuracy", "sharpness", "threshold"):
        s = m[(m.metric == metric) & (m.group == "all")]
        if len(s):
            table.add_row(f"final {metric}", f"{s.value.iloc[-1]:.6g} (step {s.step.iloc[-1]})")
    ev = run.events
    for _, e in ev.iterrows():
        table.add_row(f"event {e.event}", f"step {e.step}, t_eff {e.t_eff:.4g}")
    err.print(table)


def reference() -> dict[str, str]:
    """The generated documentation in ``cli/``: the command reference (Markdown, from the typer
    app, as ``typer ... utils docs`` makes it) and shell-completion scripts. ``make cli-docs``
    writes them; a test fails when the committed files are stale."""
    command = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="eosbranch")
    ctx.ensure_object(dict)
    head = "<!-- Generated from the typer app by `make cli-docs`; tests/test_cli.py fails when it is stale. -->\n\n"
    tail = ("\n## Shell completion\n\n`eosbranch --install-completion` installs it for the current shell; or "
            "source the script for yours from `cli/completion/` (bash, zsh, fish), e.g. "
            "`source cli/completion/eosbranch.bash`.\n")
    docs = get_docs_for_click(obj=command, ctx=ctx, name="eosbranch").strip() + "\n"
    files = {"README.md": head + docs + tail}
    for shell in ("bash", "zsh", "fish"):  # what `eosbranch --show-completion` prints in that shell
        files[f"completion/eosbranch.{shell}"] = get_completion_script(
            prog_name="eosbranch", complete_var="_EOSBRANCH_COMPLETE", shell=shell) + "\n"
    return files


def write_reference(directory: str = "cli") -> None:
    for name, text in reference().items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
