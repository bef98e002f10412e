"""The command line: a thin skin over the API (typer + rich).

Results go to stdout (the run directory on the last line); progress and one-line errors go to
stderr. User mistakes exit with code 2 and no traceback; set ``EOSBRANCH_DEBUG=1`` to see it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import EosbranchError

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
        try:
            return fn(*args, **kwargs)
        except EosbranchError as e:
            if os.environ.get("EOSBRANCH_DEBUG"):
                raise
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(130 if type(e).__name__ == "Interrupted" else 2)

    return wrapper


def _warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def train(
    spec: Optional[Path] = typer.Argument(None, help="Spec YAML file."),
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total number of steps (overrides the spec)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed (overrides the spec)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run from its last checkpoint."),
) -> None:
    """Train SPEC into a new run directory (or continue one) and print its path."""
    from .train import resume as resume_run, train as train_run

    if resume is not None:
        if spec is not None or seed is not None:
            raise EosbranchError("--resume takes the run's own spec; pass only --steps to extend it")
        run = resume_run(resume, steps=steps, progress=True, warn=_warn)
    elif spec is None:
        raise EosbranchError("give a SPEC.yaml to train, or --resume RUN")
    else:
        run = train_run(spec, out_dir, steps=steps, seed=seed, progress=True, warn=_warn)
    _summary(run)
    print(run.path)


@app.command()
@_user_errors
def demo(
    out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total number of steps (overrides the default)."),
) -> None:
    """Run the embedded default offline: train digits 3 vs 5 with the prototype groups, fork at
    the EoS onset into `eos` and `exit_eos` (lr x 0.1), and compare the groups on effective time."""
    from .catalog import example_path
    from .compare import compare as compare_run
    from .fork import fork as fork_run
    from .train import train as train_run

    run = train_run(example_path("quick"), out_dir, steps=steps, progress=True, warn=_warn)
    _summary(run)
    if (run.events.event == "t_star").any():
        branches = {"branches": [{"name": "eos"}, {"name": "exit_eos", "interventions": [{"kind": "lr", "factor": 0.1}]}]}
        for b in fork_run(run, at=("onset", 0), branches=branches, steps=200, progress=True, warn=_warn):
            err.print(f"branch {b.lineage['branch']}: {b.path}")
        _print_comparison(run, compare_run(run))
    else:
        err.print("the run did not reach the EoS (no t*), so there is nothing to fork")
    print(run.path)


@app.command()
@_user_errors
def runs(out_dir: Path = typer.Option(Path("runs"), "--out", help="Directory that holds run directories.")) -> None:
    """List the runs under --out with their lineage and progress."""
    from .run import Run

    table = Table("run", "branch", "parent", "fork step", "steps", "complete")
    for path in sorted(p for p in out_dir.glob("*") if (p / "spec.yaml").is_file()):
        r = Run(path)
        lin = r.lineage
        ck = r.checkpoints
        table.add_row(r.name, str(lin.get("branch")), str(lin.get("parent") or "-"), "-" if lin.get("fork_step") is None else str(lin["fork_step"]),
                      f"{max(ck) if ck else 0}/{r.spec.steps}", "yes" if r.complete else "no")
    out.print(table)


@app.command()
@_user_errors
def fork(
    at: tuple[str, float] = typer.Option(..., "--at", help="Where to fork: 'step N', 'onset K' (t* + K) or 'teff T'."),
    run_dir: Optional[Path] = typer.Option(None, "--run", help="Parent run (default: the newest run under ./runs)."),
    branches: str = typer.Option("exit_eos", "--branches", help="A name from interventions/ or a YAML file."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps after the fork (default: to the parent's end)."),
) -> None:
    """Fork a run's exact state into branches; prints each branch's run directory."""
    from .fork import fork as fork_run

    if run_dir is None:
        candidates = [p for p in Path("runs").glob("*") if (p / "spec.yaml").is_file()]
        if not candidates:
            raise EosbranchError("no runs under ./runs; pass --run RUN")
        run_dir = max(candidates, key=lambda p: (p / "spec.yaml").stat().st_mtime)
    kind, value = at
    done = fork_run(run_dir, at=(kind, value), branches=branches, steps=steps, progress=True, warn=_warn)
    for b in done:
        print(b.path)


@app.command()
@_user_errors
def compare(run_dir: Path = typer.Argument(..., help="Parent run whose branches to compare.")) -> None:
    """Per branch and group: t*, t**, the branch effect Δl_k on effective time; saves comparison.parquet."""
    from .compare import compare as compare_run
    from .run import Run

    run = Run(run_dir)
    _print_comparison(run, compare_run(run))
    print(run.path / "comparison.parquet")


def _print_comparison(run, df) -> None:
    head = df.iloc[0] if len(df) else None
    where = "" if head is None else f", fork step {head.fork_step}, t* = {head.t_star:.4g} (t_eff)"
    table = Table("branch", "group", "t**", "Δl at end", "mean Δl", "effect",
                  title=f"{run.name} branches vs EoS{where}; Δl > 0: learns faster at EoS")
    for r in df.itertuples(index=False):
        table.add_row(r.branch, r.group, f"{r.t_star_star:.4g}", f"{r.delta_at_end:+.2e}", f"{r.delta_mean:+.2e}",
                      r.effect.replace("learns ", ""))
    err.print(table)


groups_app = typer.Typer(help="Group specs: sizes and geometry.", no_args_is_help=True)
app.add_typer(groups_app, name="groups")


@groups_app.command("show")
@_user_errors
def groups_show(spec: Path = typer.Argument(..., help="Spec YAML file with a groups section.")) -> None:
    """Each group's size, class mix and median centroid distance (and, for the random-orthogonal
    control, the distance ratio to the coherent construction)."""
    import math

    from .data import load_data
    from .groups import describe, resolve
    from .spec import load_spec

    s = load_spec(spec)
    if not s.groups:
        raise EosbranchError(f"{spec}: groups: the spec defines no groups")
    data = load_data(s.data, str(spec))
    df = describe(resolve(s.groups, data.X, data.y, str(spec)))
    table = Table(*df.columns, title=f"groups of {spec}")
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
    window: int = typer.Option(20, "--window", help="Steps over which the pair's antiphase is measured."),
) -> None:
    """Find opposing signals: the M points whose loss rises most and falls most on one step."""
    import yaml

    from .opposing import find
    from .run import Run

    run = Run(run_dir)
    res = find(run, step, top=top, window=window)
    pts = Table("role", "index", "label", "loss before", "loss after", "change", "pred before", "pred after",
                title=f"opposing signals at step {res.step}")
    for r in res.points.itertuples():
        pts.add_row(r.role, str(r.index), str(r.label), f"{r.loss_before:.4g}", f"{r.loss_after:.4g}",
                    f"{r.loss_change:+.4g}", f"{r.pred_before:.4g}", f"{r.pred_after:.4g}")
    err.print(pts)
    pairs = Table("pair", "size", "alternation", "amplitude a", "amplitude b", "correlation",
                  title=f"antiphase over steps {res.step}..{res.step + window}")
    for r in res.pairs.itertuples():
        pairs.add_row(r.pair, str(r.size), f"{r.alternation_rate:.2f}", f"{r.amplitude_a:.3g}",
                      f"{r.amplitude_b:.3g}", f"{r.correlation:+.2f}")
    err.print(pairs)
    err.print(f"fraction of points whose loss rose on step {res.step}: {res.pairs.fraction_loss_increased.iloc[0]:.3f}")
    run.store.write_frame("opposing_points", res.points.assign(step=res.step))
    run.store.write_frame("opposing_pairs", res.pairs)
    run.store.write_text("opposing_groups.yaml", yaml.safe_dump([res.group_spec], sort_keys=False))
    print(run.path / "opposing_pairs.parquet")


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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
