"""The commands that make runs: ``train``, ``demo``, ``runs``, ``fork`` and ``sweep`` (registered on the
app in cli.py), with the parsing of their options and the summary a finished run prints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .catalog import example_path
from .cli_console import err, out, warn
from .cli_study import print_certificate, print_comparison
from .compare import compare as compare_run
from .errors import EosbranchError
from .fork import fork as fork_run
from .run import Run
from .spec import load_spec
from .sweep import sweep as run_sweep
from .train import resume as resume_run
from .rundir import run_dir_for
from .train import train as train_run


# torch threads of a new run trained from the command line (`train --threads`; `sweep --threads` has
# the same default): one thread is never oversubscribed by another busy process, and a sweep's runs
# then equal the same `train` + `fork` calls made one by one.
DEFAULT_THREADS = 1


def threads_for(spec, out_dir: Path, threads: Optional[int]) -> Optional[int]:
    """--threads as given; else DEFAULT_THREADS for a new run, and None (its recorded count) for a
    run that exists."""
    if threads is None and not (run_dir_for(spec, out_dir) / "spec.yaml").exists():
        return DEFAULT_THREADS
    return threads


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
        run = resume_run(resume, steps=steps, progress=True, warn=warn, threads=threads)
    elif spec is None:
        raise EosbranchError("give a SPEC.yaml to train, or --resume RUN")
    else:
        threads = threads_for(load_spec(spec, steps=steps, seed=seed), out_dir, threads)
        run = train_run(spec, out_dir, steps=steps, seed=seed, progress=True, warn=warn, threads=threads,
                        limits=not no_limits)
    summary(run)
    print(run.path)


def demo(
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total number of steps (overrides the default)."),
) -> None:
    """Run the embedded default offline: train digits 3 vs 5 with the prototype groups, fork at
    the EoS onset into `eos` and `exit_half` (lr x 0.5, the 2026 study's factor for this class
    pair), run the exit branch to its own t** and the EoS branch as far in effective time, then
    print the per-group comparison on effective time and the integrity certificate."""
    s = load_spec(example_path("quick"), steps=steps)
    run = train_run(s, out_dir, progress=True, warn=warn, threads=threads_for(s, out_dir, None))
    summary(run)
    if (run.events.event == "t_star").any():
        branches = {"branches": [{"name": "eos"}, {"name": "exit_half", "interventions": [{"kind": "lr", "factor": 0.5}]}]}
        for b in fork_run(run, at=("onset", 0), branches=branches, until="tss", progress=True, warn=warn):
            err.print(f"branch {b.lineage['branch']}: {b.path}")
        print_comparison(run, compare_run(run))
    else:
        err.print("the run did not reach the EoS (no t*), so there is nothing to fork")
    print(run.path)


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
            warn(str(e))
            table.add_row(str(path), "?", "?", "?", "?", "damaged")
            continue
        table.add_row(str(path), str(lin.get("branch")), str(lin.get("parent") or "-"),
                      "-" if lin.get("fork_step") is None else str(lin["fork_step"]),
                      f"{max(ck) if ck else 0}/{steps}", "yes" if complete else "no")
    # Wider than the terminal if need be: a path cut to "runs/quick-s0-2c…" cannot be copied.
    need = Measurement.get(out, out.options.update(width=10_000), table).maximum
    Console(width=max(out.width, need)).print(table)


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
    kind, value = parse_at(at if at_value is None else f"{at} {at_value}", "--at")
    if run_dir is None:
        # Parent runs only: a branch is written after its parent, but forking it again is rarely meant.
        candidates = [p.parent for p in Path("runs").rglob("spec.yaml") if p.is_file() and not is_branch(p.parent)]
        if not candidates:
            raise EosbranchError("no runs under ./runs; pass --run RUN")
        run_dir = max(candidates, key=lambda p: (p / "spec.yaml").stat().st_mtime)
    done = fork_run(run_dir, at=(kind, value), branches=branches, steps=steps, until=until, teff=teff,
                    max_steps=max_steps, progress=True, warn=warn, threads=threads)
    print_certificate(done[0].path.parent / done[0].lineage["parent"], {b.lineage["fork_step"] for b in done})
    for b in done:
        print(b.path)


def is_branch(path: Path) -> bool:
    try:
        return Run(path).lineage.get("parent") is not None
    except Exception:  # an unreadable lineage is not a branch's: the listing must not fail on it
        return False


def parse_fork(text: Optional[str]) -> Optional[tuple]:
    """'onset' -> (onset, 0); 'onset 5', 'step 500', 'teff 4.0' -> (kind, value)."""
    if text is None:
        return None
    return parse_at(text, "--fork")


def parse_at(text: str, option: str) -> tuple:
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


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise EosbranchError(f"--seeds: expected comma-separated integers like 1,2,3; got {text!r}") from None


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
    seed_list = parse_seeds(seeds)
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
        result = run_sweep(spec, seed_list, out_dir, fork=parse_fork(fork_at), branches=branches, until=until,
                           steps=steps, teff=teff, jobs=jobs, executor=executor, threads=threads,
                           on_start=on_start, on_done=on_done, warn=warn, limits=not no_limits, **options)
    finally:
        bar.stop()
    table = Table("seed", "run", "branches", "status", title=f"sweep of {spec} ({result.threads} torch thread(s) per job)")
    for j in result.jobs:
        status = "[red]failed[/]" if j.failed else j.status
        table.add_row(str(j.seed), Path(j.run).name if j.run else "-", str(len(j.branches)), status)
    err.print(table)
    for j in result.jobs:
        for w in j.warnings:
            warn(f"seed {j.seed}: {w}")
    for j in result.failed:
        err.print(f"[bold red]failed:[/] {j.describe()}", highlight=False, soft_wrap=True)
    for j in result.jobs:
        if not j.failed:
            print(j.run)
    if result.failed:
        err.print(f"{len(result.failed)} of {len(result.jobs)} jobs failed; fix the cause and re-run the same "
                  "command (finished runs are reused)", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


def summary(run) -> None:
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
