"""What a new user trips on (issue 18), each checked where it shows: the documented API call, one
name per branch spec, figures that show what the table reports (read on the rendered axes),
warnings for saturated and collapsed runs, `--threads`, `runs` on nested directories, one-line
errors, and the README's claims."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import eosbranch
from conftest import TINY, write_spec
from eosbranch import figure_style, plots
from eosbranch.cli import app
from eosbranch.plots import StudyRun

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture
def tiny_run(tmp_path):
    return eosbranch.train(copy.deepcopy(TINY), tmp_path / "runs")


# 1. The documented API ------------------------------------------------------------------------

def test_compare_is_callable_and_the_module_of_curves(tiny_run):
    eosbranch.fork(tiny_run, at=("step", 10), branches="exit_eos", steps=10)
    df = eosbranch.compare(tiny_run)  # the function, through the module
    assert isinstance(df, pd.DataFrame) and set(df.branch) == {"exit_eos"}
    curves = eosbranch.compare.curves(tiny_run)  # README: eosbranch.compare.curves(run)
    assert list(curves.columns) == eosbranch.compare.CURVE_COLUMNS and len(curves) == 3000 * len(df)
    import eosbranch.compare as c

    assert c is eosbranch.compare and c.curves is eosbranch.compare.curves
    from eosbranch import compare

    assert compare(tiny_run).equals(df)
    for name in ("train", "fork", "sweep", "report"):  # the other API names that share a module's name
        module = getattr(eosbranch, name)
        assert callable(module) and module.__name__ == f"eosbranch.{name}"


# 2. One name, one branch spec ------------------------------------------------------------------

def test_a_branch_name_is_not_reused_for_another_branch_spec(tiny_run, tmp_path):
    half = {"name": "exit_eos", "interventions": [{"kind": "lr", "factor": 0.5}]}
    eosbranch.fork(tiny_run, at=("step", 10), branches=half, steps=5)
    error = one_line_error(cli("fork", "--run", tiny_run.path, "--at", "step", 10, "--branches", "exit_eos",
                               "--steps", 5))  # the catalog's exit_eos is lr x 0.1
    assert "'exit_eos' is taken by a different branch" in error and "factor: 0.5" in error
    assert sorted(p.name.split("--")[1].split("-at")[0] for p in tiny_run.path.parent.glob("*--*")) == ["exit_eos"]
    # the same spec again is the same branch (reused), and another name is fine
    assert cli("fork", "--run", tiny_run.path, "--at", "step", 10, "--branches", write_spec(
        tmp_path / "b.yaml", half), "--steps", 5).exit_code == 0
    assert eosbranch.fork(tiny_run, at=("step", 10), branches={**half, "name": "exit_half"}, steps=5)
    # the catalog and the example files give the x0.5 and x0.1 exits different names
    from eosbranch.fork import load_branches

    names = {b.name: b.interventions for f in ("exit_half", "exit_tenth")
             for b in load_branches(ROOT / "examples" / "branches" / f"{f}.yaml")}
    assert names["exit"] != names["exit_tenth"]


# 3. Figures: read on the rendered axes ---------------------------------------------------------

def _rows(label, t, values, metric, group="all", step0=0):
    return pd.DataFrame({"step": np.arange(len(t)) + step0, "t_eff": t, "group": group, "metric": metric,
                         "value": values})


def _study(branches: dict, window=(3.0, 200.0), parent_end=30.0) -> StudyRun:
    """A parent (t_eff 0..parent_end, sharpness rising to its threshold 2/0.1) and branches from t_eff
    3.0: ``branches`` maps a name to (metric, level, threshold, end)."""
    t = np.linspace(0.0, parent_end, 31)
    lines = {"trunk": pd.concat([_rows("trunk", t, np.minimum(2 + t, 20.0), "sharpness"),
                                 _rows("trunk", t, np.full_like(t, 20.0), "threshold")])}
    rows = []
    for b, (metric, level, thr, end) in branches.items():
        tb = np.linspace(window[0], end, 60)
        wobble = level * (1 + 0.02 * np.sin(tb))
        lines[b] = pd.concat([_rows(b, tb, wobble, metric), _rows(b, tb, np.full_like(tb, thr), "threshold")])
        if b != "eos":
            rows.append({"branch": b, "group": "all", "fork_step": 3, "t_star": 3.0, "t_fork": window[0],
                         "t_star_star": float("nan"), "t_end": window[1], "delta_at_end": 0.1, "delta_mean": 0.1,
                         "effect": "learns faster at EoS"})
    return StudyRun(name="synthetic", seed=0, parent="trunk", lines=lines, reference="eos",
                    comparison=pd.DataFrame(rows), events=pd.DataFrame(), t_star=3.0, t_star_step=3,
                    fork_t={b: window[0] for b in branches})


def _drawn(monkeypatch):
    drawn = {}
    monkeypatch.setattr(figure_style, "save", lambda fig, path: drawn.setdefault("fig", fig))
    return drawn


def test_figure_3_gives_each_group_its_own_scale(monkeypatch, tmp_path):
    x = np.linspace(3.0, 200.0, 3000)
    size = {"output_outlier": 0.07, "inlier": 3e-3, "boundary": 1e-3, "all": 2e-3}
    bands = pd.concat([pd.DataFrame({"branch": "exit", "group": g, "x": x, "median": -a * np.sin(x / 20),
                                     "q25": -a * np.sin(x / 20), "q75": -a * np.sin(x / 20), "n_seeds": 1})
                       for g, a in size.items()])
    drawn = _drawn(monkeypatch)
    plots.plot_branch_effect(bands, tmp_path / "f3.png", plots.group_colors(size))
    fig = drawn["fig"]
    fig.canvas.draw()
    seen = set()
    for ax in fig.axes:
        for line in ax.get_lines():
            t = plots.tags(line)
            if t.get("metric") != "delta":
                continue
            seen.add(t["group"])
            lo, hi = ax.get_ylim()
            peak = float(np.max(np.abs(line.get_ydata())))
            # visible: the curve spans at least half of its axis's half-height (old: one axis of +-0.1 for all)
            assert lo < 0 < hi and peak / max(-lo, hi) > 0.5, (t["group"], peak, (lo, hi))
    assert seen == set(size)


def test_figure_1_draws_every_optimizer_each_on_its_own_scale(monkeypatch, tmp_path):
    run = _study({"eos": ("sharpness", 20.0, 20.0, 40.0), "sgd": ("sharpness", 18.0, 20.0, 40.0),
                  "momentum": ("sharpness", 30.0, 38.0, 40.0),
                  "adam": ("preconditioned_sharpness", 2e9, 3.8e9, 40.0)}, window=(3.0, 40.0))
    drawn = _drawn(monkeypatch)
    plots.plot_sharpness(run, tmp_path / "f1.png")
    fig = drawn["fig"]
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            t = plots.tags(line)
            if t.get("metric") in ("sharpness", "preconditioned_sharpness"):
                found.setdefault(t["branch"], []).append((ax, t["metric"], float(np.max(line.get_ydata()))))
    assert {"eos", "sgd", "momentum", "adam", "trunk"} <= set(found)
    for b, drawn_on in found.items():
        for ax, metric, peak in drawn_on:
            lo, hi = ax.get_ylim()
            assert metric == ("preconditioned_sharpness" if b == "adam" else "sharpness")
            assert hi < 20 * peak, (b, hi, peak)  # a sensible scale: not 1e9 for a sharpness of 30
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    for b in ("eos", "sgd", "momentum", "adam"):
        assert any(b in text for text in legend), (b, legend)


def test_figure_1_zoom_panel_zooms_and_starts_at_the_run(monkeypatch, tmp_path):
    # the window [3, 200] fills most of the run, as in the README's tour
    run = _study({"eos": ("sharpness", 20.0, 20.0, 200.0), "exit": ("sharpness", 19.0, 40.0, 200.0)})
    drawn = _drawn(monkeypatch)
    plots.plot_sharpness(run, tmp_path / "f1.png")
    whole, zoom = drawn["fig"].axes[:2]
    (w0, w1), (z0, z1) = whole.get_xlim(), zoom.get_xlim()
    assert z0 >= 0.0 and z0 <= 3.0 < z1, (z0, z1)  # the fork in view, nothing before t_eff = 0
    assert (z1 - z0) <= 0.5 * (w1 - w0), ((z0, z1), (w0, w1))


def _on_segments(line) -> list[float]:
    offset, dashes = line._unscaled_dash_pattern
    return [] if dashes is None else list(dashes[::2])


def test_dotted_lines_mark_times_and_never_a_branch(monkeypatch, tmp_path):
    run = _study({"eos": ("sharpness", 20.0, 20.0, 200.0), "exit": ("sharpness", 19.0, 40.0, 200.0),
                  "mild": ("sharpness", 19.5, 21.0, 200.0), "third": ("sharpness", 19.2, 25.0, 200.0)})
    run.comparison.loc[run.comparison.branch == "mild", "t_star_star"] = 50.0
    drawn = _drawn(monkeypatch)
    plots.plot_sharpness(run, tmp_path / "f1.png")
    markers, branches = set(), {}
    for ax in drawn["fig"].axes:
        for line in ax.get_lines():
            t = plots.tags(line)
            if t.get("marker") in ("t_star", "t_star_star"):
                assert _on_segments(line) and max(_on_segments(line)) <= 1.0, t  # dots
                markers.add(t["marker"])
            elif "branch" in t and t.get("metric") == "sharpness":
                on = _on_segments(line)
                assert not on or max(on) >= 3.0, (t, on)  # solid or dashed: never only dots
                branches.setdefault(t["branch"], set()).add(str(line._unscaled_dash_pattern))
    assert markers == {"t_star", "t_star_star"}
    others = [next(iter(v)) for b, v in branches.items() if b in ("exit", "mild", "third")]
    assert len(set(others)) == 3  # one style per branch


def test_figure_6_labels_tensors_by_layer(monkeypatch, tmp_path):
    run = _study({"eos": ("sharpness", 20.0, 20.0, 200.0), "exit": ("sharpness", 19.0, 40.0, 200.0)})
    tensors = ["1.weight", "1.bias", "3.weight", "3.bias"]
    for b in ("eos", "exit"):
        t = run.lines[b].t_eff.unique()
        extra = [_rows(b, t, np.full(len(t), 0.25), "curvature_fraction", group=p) for p in tensors]
        run.lines[b] = pd.concat([run.lines[b], *extra])
    drawn = _drawn(monkeypatch)
    plots.plot_curvature_fraction(run, tmp_path / "f6.png")
    ax = drawn["fig"].axes[0]
    drawn["fig"].canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["layer 1 weights (1.weight)", "layer 1 biases (1.bias)",
                      "output layer weights (3.weight)", "output layer biases (3.bias)"]


# 4. Warnings and --threads -----------------------------------------------------------------------

def _spec(tmp_path, name, **over):
    spec = copy.deepcopy(TINY)
    spec.update(name=name, **over)
    return write_spec(tmp_path / f"{name}.yaml", spec)


def test_a_saturated_run_is_named_while_it_trains(tmp_path):
    # CE on digits (0, 1) with momentum: the loss reaches ~0 within 20 steps
    path = _spec(tmp_path, "sat", loss="ce", steps=40, data={"kind": "digits", "classes": [0, 1], "n_per_class": 40},
                 model={"kind": "mlp", "width": 16, "depth": 1, "init_scale": 3.0},
                 optimizer={"kind": "momentum", "lr": 0.5, "beta": 0.9})
    res = cli("train", path, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run = eosbranch.load(res.stdout.strip().splitlines()[-1])
    first = int(run.metric("loss")[run.metric("loss") <= 1e-6].index.min())  # the oracle: the table
    warned = [ln for ln in res.output.splitlines() if ln.startswith("warning: saturated")]
    assert len(warned) == 1 and f"at step {first}:" in warned[0], res.output


def test_a_collapsed_run_is_named_and_forking_it_warns(tmp_path):
    path = _spec(tmp_path, "col", steps=30, model={"kind": "mlp", "width": 16, "depth": 1, "init_scale": 10.0},
                 optimizer={"kind": "gd", "lr": 1.0})
    res = cli("train", path, "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    run = eosbranch.load(res.stdout.strip().splitlines()[-1])
    acc, loss = run.metric("accuracy"), run.metric("loss")
    at = int(next(s for s in acc.index if s > 0 and acc[s] <= 0.5 + 0.02 and loss[s] >= loss[0]))
    assert f"warning: collapsed at step {at}:" in res.output, res.output
    res = cli("fork", "--run", run.path, "--at", "step", 20, "--steps", 3)
    assert res.exit_code == 0 and "warning: the parent at the fork step 20: collapsed" in res.output, res.output


def test_a_healthy_run_trains_without_warnings(tmp_path):
    res = cli("train", _spec(tmp_path, "ok"), "--out", tmp_path / "runs")
    assert res.exit_code == 0 and "warning" not in res.output, res.output


def test_threads_on_train_and_fork_are_recorded(tmp_path):
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # what torch would use on a 2-core machine
    try:
        res = cli("train", _spec(tmp_path, "th"), "--out", tmp_path / "runs")
        run = eosbranch.load(res.stdout.strip().splitlines()[-1])
        assert run.lineage["threads"] == 1  # the documented default for a new run
        assert torch.get_num_threads() == 2  # restored after the run
        res = cli("train", _spec(tmp_path, "th2"), "--out", tmp_path / "runs", "--threads", 2)
        assert eosbranch.load(res.stdout.strip().splitlines()[-1]).lineage["threads"] == 2
        res = cli("fork", "--run", run.path, "--at", "step", 10, "--steps", 3)
        assert res.exit_code == 0, res.output
        assert eosbranch.load(res.stdout.strip().splitlines()[-1]).lineage["threads"] == 1  # the parent's
        res = cli("fork", "--run", run.path, "--at", "step", 10, "--steps", 3, "--branches", "eos", "--threads", 1)
        assert res.exit_code == 0 and eosbranch.load(res.stdout.strip().splitlines()[-1]).lineage["threads"] == 1
        error = one_line_error(cli("train", "--resume", run.path, "--steps", 40, "--threads", 2))
        assert "lineage.json: threads: the run was started with 1" in error
        assert "'--threads'" not in one_line_error(cli("train", _spec(tmp_path, "t0"), "--threads", 0))
    finally:
        torch.set_num_threads(previous)
    reference = (ROOT / "cli" / "README.md").read_text()
    for command in ("train", "fork", "sweep"):
        section = reference.split(f"## `eosbranch {command}`")[1].split("\n## ")[0]
        assert "--threads" in section, command
    assert "**Threads.**" in README and "`train` 1 for a new run" in README


# 5. Listing and tables ----------------------------------------------------------------------------

def test_runs_lists_nested_runs_with_whole_paths(tmp_path):
    long = "an_example_with_a_long_name_that_overflows_eighty_columns"
    nested = eosbranch.train({**copy.deepcopy(TINY), "name": long}, tmp_path / "runs" / "some_example")
    top = eosbranch.train(copy.deepcopy(TINY), tmp_path / "runs")
    res = cli("runs", "--out", tmp_path / "runs")
    assert res.exit_code == 0, res.output
    for run in (nested, top):
        assert str(run.path) in res.stdout, res.stdout  # whole, on one line: copyable


def test_metrics_group_holds_example_groups_and_parameter_tensors_as_documented(quick_run):
    m = quick_run.metrics
    tensors = set(m.loc[m.metric == "curvature_fraction", "group"])
    from eosbranch.experiment import build

    assert tensors == {n for n, _ in build(quick_run.spec).model.named_parameters()}
    assert not tensors & set(m.loc[m.metric != "curvature_fraction", "group"])
    assert "`m[m.metric == \"curvature_fraction\"]` holds only tensors" in README
    assert not (m.metric == "test_loss").any()  # digits without test_fraction: no held-out split
    assert "`digits` `test_fraction` (default 0: none, so a digits run has no `test_*` rows)" in README


def test_digits_with_a_test_fraction_records_test_metrics(tmp_path):
    spec = copy.deepcopy(TINY)
    spec["data"]["test_fraction"] = 0.25
    m = eosbranch.train(spec, tmp_path).metrics
    assert {"test_loss", "test_accuracy"} <= set(m.metric)


# 6. Syntax and messages ---------------------------------------------------------------------------

def test_fork_at_onset_without_k_is_onset_0(quick_run, tmp_path):
    run = eosbranch.load(shutil.copytree(quick_run.path, tmp_path / quick_run.name))
    res = cli("fork", "--run", run.path, "--at", "onset", "--branches", "eos", "--steps", 2)
    assert res.exit_code == 0, res.output
    t_star = int(run.events.query("event == 't_star'").step.iloc[0])
    assert eosbranch.load(res.stdout.strip().splitlines()[-1]).lineage["fork_step"] == t_star
    error = one_line_error(cli("fork", "--run", run.path, "--at", "step", "--steps", 2))
    assert "--at: expected 'onset', 'onset K', 'step N' or 'teff T'" in error


def test_an_unknown_group_names_the_file_and_the_field(tiny_run, tmp_path):
    spec = copy.deepcopy(TINY)
    spec["groups"] = ["prototypes", {"kind": "random", "size_like": "inlierr"}]
    path = write_spec(tmp_path / "g.yaml", spec)
    error = one_line_error(cli("train", path, "--out", tmp_path / "runs"))
    assert error.startswith(f"error: {path}: groups[1].size_like: no group named 'inlierr'"), error
    branch = write_spec(tmp_path / "b.yaml", {"name": "rw", "interventions": [
        {"kind": "reweight", "group": "inlierr", "weight": 2.0}]})
    error = one_line_error(cli("fork", "--run", tiny_run.path, "--at", "step", 10, "--branches", branch,
                               "--steps", 3))
    assert error.startswith(f"error: {branch}: interventions[0]: reweight.group: no group 'inlierr'"), error
    assert not list(tiny_run.path.parent.glob("*--rw-*"))  # refused before anything ran


def test_compare_never_prints_a_raw_nan(tiny_run):
    eosbranch.fork(tiny_run, at=("step", 10), branches="exit_eos", steps=10)  # no sharpness: no t*, no t**
    res = cli("compare", tiny_run.path)
    assert res.exit_code == 0, res.output
    assert not re.search(r"\bnan\b", res.output, re.I), res.output
    assert "fork step 10, no t*" in res.output and "│ not reached │" in res.output
    assert "t** not reached: the branch's sharpness never reached its threshold" in res.output


def test_the_indices_kind_and_every_group_kind_field_are_documented():
    from eosbranch.groups import GROUP_KINDS

    table = README.split("| kind | fields |")[1].split("\n\n")[0]
    for kind in ("prototypes", "class", "indices", "random", "opposing", "token"):
        row = next(ln for ln in table.splitlines() if ln.startswith(f"| `{kind}` |"))
        for field in GROUP_KINDS[kind].params.model_fields:
            assert f"`{field}`" in row, (kind, field)


def test_docs_cite_only_files_the_repository_ships():
    cited = set()
    for path in [*ROOT.glob("*.md"), *ROOT.glob("examples/*.md"), *ROOT.glob("eosbranch/*.py"),
                 *ROOT.glob("groups/*.yaml"), *ROOT.glob("interventions/*.yaml")]:
        cited |= {int(n) for n in re.findall(r"DESIGN §(\d)", path.read_text())}
    design = (ROOT / "DESIGN.md").read_text()
    assert cited and all(f"\n## {n}. " in design for n in cited), cited
    assert "(DESIGN.md)" in README
