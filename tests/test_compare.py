"""Comparing branches: t** interpolation, the sign convention of Δl_k, compare on real forks."""

import copy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import eosbranch
from conftest import TINY
from eosbranch import tables
from eosbranch.cli import app
from eosbranch.compare import CURVE_COLUMNS, branch_effect, crossing, curves, effect
from eosbranch.errors import EosbranchError
from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.train import run_dir_for


def test_crossing_is_interpolated_between_measurements():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    s = np.array([1.0, 2.0, 4.0, 5.0])
    assert crossing(t, s, np.full(4, 3.0)) == pytest.approx(1.5)
    assert crossing(t, s, np.full(4, 0.5)) == 0.0
    assert np.isnan(crossing(t, s, np.full(4, 9.0)))
    assert crossing(t, [5, 1, 1, 7], np.full(4, 4.0), after=0.5) == pytest.approx(2 + 3 / 6)


def test_delta_sign_convention_on_hand_made_curves():
    t = np.linspace(0, 2, 5)
    eos, exit_ = 1 - 0.4 * t, 1 - 0.2 * t  # the group's loss falls faster at the EoS
    delta = branch_effect(t, exit_, t, eos, 0.0, 2.0, grid=3)
    assert delta == pytest.approx([0.0, 0.2, 0.4])
    assert effect(delta[-1]) == "learns faster at EoS"
    assert effect(branch_effect(t, eos, t, exit_, 0, 2)[-1]) == "learns slower at EoS"
    # Different clocks: the other branch is sampled more sparsely in t_eff, interpolation aligns them.
    assert branch_effect([0, 2], [1, 0.6], t, eos, 0, 2, grid=2) == pytest.approx([0.0, 0.4])


def private_parent(run, root: Path):
    """A copy of ``run`` without its branches (other tests fork the session's quick run too)."""
    return eosbranch.load(shutil.copytree(run.path, root / run.name, ignore=shutil.ignore_patterns("*--*")))


def test_compare_on_forks_at_onset(quick_run, tmp_path):
    quick_run = private_parent(quick_run, tmp_path)
    eosbranch.fork(quick_run, at=("onset", 0), branches={"branches": [
        {"name": "eos"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.1}]}]}, steps=100)
    df = eosbranch.compare(quick_run)
    assert set(df.branch) == {"exit"}
    assert set(df.group) == {"all", "inlier", "boundary", "input_outlier", "output_outlier"}
    t_star = quick_run.events.query("event == 't_star'").t_eff.iloc[0]
    assert (df.t_star == t_star).all() and (df.t_fork == t_star).all()
    # The exit branch (threshold 10x higher) never reaches it in 100 steps: the window ends with it.
    assert df.t_star_star.isna().all() and df.t_end.tolist() == pytest.approx([t_star + 100 * 0.012] * len(df))
    assert (quick_run.path / "comparison.parquet").is_file()
    res = CliRunner().invoke(app, ["compare", str(quick_run.path)])
    assert res.exit_code == 0 and res.stdout.strip().splitlines()[-1].endswith("comparison.parquet")
    # compare shows the integrity certificate the fork stored: the eos branch equals the parent.
    assert "integrity certificate" in res.stderr and "null" in res.stderr and "fork_state" in res.stderr
    # The curves themselves: 3,000 grid points per group over [t_fork, t_end].
    c = curves(quick_run)
    assert list(c.columns) == CURVE_COLUMNS and len(c) == 3000 * len(df)
    for g, d in c.groupby("group"):
        row = df[df.group == g].iloc[0]
        assert d.t_eff.iloc[0] == row.t_fork and d.t_eff.iloc[-1] == pytest.approx(row.t_end)
        assert d.delta.iloc[-1] == pytest.approx(row.delta_at_end, rel=1e-12, abs=1e-15)
        # delta_mean is the exact mean of the piecewise-linear Δ: the grid's trapezoid rule approaches it.
        trap = np.trapezoid(d.delta, d.t_eff) / (row.t_end - row.t_fork)
        assert trap == pytest.approx(row.delta_mean, rel=1e-3, abs=1e-9)


def synthetic_parent(root: Path) -> Path:
    """A parent with an ``eos`` and an ``exit`` branch forked at t_eff 0, on different clocks:
    eos measured every 0.1 in t_eff with l = 1 - 2t; exit every 0.25 with l = 1 - t, and its
    sharpness 9 at t = 0.5 and 11 at t = 0.75 against the threshold 10, so t** = 0.625 (linear
    interpolation) and Δl(t) = (1 - t) - (1 - 2t) = t exactly on [0, 0.625]."""
    return write_series(root, {
        (None, None): [(0.0, {"loss": 1.0})],
        ("eos", 0): [(t, {"loss": 1 - 2 * t, "sharpness": 10.5, "threshold": 10.0}) for t in np.linspace(0, 1, 11)],
        ("exit", 0): [(t, {"loss": 1 - t, "sharpness": s, "threshold": 10.0})
                      for t, s in zip(np.linspace(0, 1, 5), [5.0, 7.0, 9.0, 11.0, 12.0])],
    })


def write_series(root: Path, series: dict) -> Path:
    """A parent (key ``(None, None)``) and branches ``(name, fork_step)`` whose metrics are the
    given ``[(t_eff, {metric: value})]`` series (loss for groups "all" and "a")."""
    spec = parse_spec(copy.deepcopy(TINY))
    parent = run_dir_for(spec, root)
    for (branch, fork_step), points in series.items():
        path = parent if branch is None else Path(f"{parent}--{branch}-at{fork_step}-00000000")
        store = RunStore(path)
        path.mkdir(parents=True)
        store.create(spec.to_yaml(), {"parent": None if branch is None else parent.name,
                                      "branch": branch or "trunk", "fork_step": fork_step})
        rows = [(i, float(t), 0.1, g, m, float(v)) for i, (t, values) in enumerate(points)
                for m, v in values.items() for g in (["all", "a"] if m == "loss" else ["all"])]
        store.write_table("metrics", tables.frame("metrics", rows, path.name, branch or "trunk", 0))
        if branch is None:
            store.write_table("events", tables.frame("events", [("t_star", 0, 0.0, 10.5, "")], path.name, "trunk", 0))
        store.mark_complete(spec.steps)  # finished runs (compare refuses unfinished ones)
    return parent


def test_each_branch_is_compared_with_the_eos_branch_of_its_own_fork_step(tmp_path):
    """One parent forked at two steps: exit@5 is read against eos@5 (Δl = 0.5 (t - 0.5) on
    [0.5, 1]), never against eos@0 (which would give 4 + ...); exit@0 against eos@0 (Δl = t)."""
    ts0, ts5 = np.linspace(0, 1, 11), np.linspace(0.5, 1, 6)
    below = {"sharpness": 1.0, "threshold": 10.0}  # no t**: the window runs to the curves' end
    parent = write_series(tmp_path, {
        (None, None): [(0.0, {"loss": 1.0})],
        ("eos", 0): [(t, {"loss": 1 - 2 * t, **below}) for t in ts0],
        ("exit", 0): [(t, {"loss": 1 - t, **below}) for t in ts0],
        ("eos", 5): [(t, {"loss": 5 - t, **below}) for t in ts5],
        ("exit", 5): [(t, {"loss": 5 - 0.5 * t - 0.25, **below}) for t in ts5],
    })
    df = eosbranch.compare(parent).query("group == 'all'").set_index("fork_step")
    assert sorted(df.index) == [0, 5] and set(df.branch) == {"exit"}
    assert df.loc[0, "delta_at_end"] == pytest.approx(1.0, abs=1e-12)
    assert df.loc[5, "t_fork"] == 0.5 and df.loc[5, "delta_at_end"] == pytest.approx(0.25, abs=1e-12)
    c = curves(parent).query("group == 'all' and fork_step == 5")
    assert np.allclose(c.delta, 0.5 * (c.t_eff - 0.5), rtol=0, atol=1e-12)


def test_compare_on_synthetic_series_interpolates_t_star_star_and_saves_the_curves(tmp_path):
    parent = synthetic_parent(tmp_path)
    df = eosbranch.compare(parent)
    assert set(df.branch) == {"exit"} and sorted(df.group) == ["a", "all"]
    assert (df.t_star == 0.0).all() and (df.t_fork == 0.0).all()
    assert df.t_star_star.tolist() == pytest.approx([0.625, 0.625]) and df.t_end.tolist() == pytest.approx([0.625] * 2)
    # Δl(t) = t: at the window's end 0.625, its mean over [0, 0.625] is 0.3125; positive: faster at EoS.
    assert df.delta_at_end.tolist() == pytest.approx([0.625] * 2, abs=1e-12)
    assert df.delta_mean.tolist() == pytest.approx([0.3125] * 2, abs=1e-12)
    assert set(df.effect) == {"learns faster at EoS"}
    c = curves(parent)
    assert len(c) == 2 * 3000 and set(c.branch) == {"exit"}
    for _, d in c.groupby("group"):
        assert np.allclose(d.t_eff, np.linspace(0, 0.625, 3000), rtol=0, atol=1e-15)
        assert np.allclose(d.delta, d.t_eff, rtol=0, atol=1e-12)
    pd.testing.assert_frame_equal(pd.read_parquet(parent / "comparison_curves.parquet"), c)


def test_t_star_and_t_star_star_on_a_synthetic_sharpness_series(tmp_path, monkeypatch):
    """The trainer, fork and compare on a sharpness series written here (the eigen-solver replaced
    by a table lookup). GD, lr 0.05: threshold 40; warm-up 12; measured every 5. S = 50 at step 5
    (before the warm-up: ignored), 35 at 15, 41 at 20, so t* = step 20. The exit branch (lr x 0.5,
    threshold 80) measures 70 at 25 and 90 at 30: its t** event is step 30 and compare interpolates
    t** = t_eff(25) + (80 - 70) / (90 - 70) * (t_eff(30) - t_eff(25)); --until tss stops it two
    measurement intervals later, at step 40."""
    import importlib
    from types import SimpleNamespace

    import torch

    measure = importlib.import_module("eosbranch.measure")
    parent_series = {0: 10.0, 5: 50.0, 10: 30.0, 15: 35.0, 20: 41.0, 25: 39.0, 30: 45.0, 35: 44.0, 40: 43.0}
    exit_series = {20: 41.0, 25: 70.0, 30: 90.0, 35: 95.0, 40: 99.0}

    def fake(exp, st, k=1, v0=None, preconditioned=True, H=None, cold=False):
        dim = sum(p.numel() for p in exp.params)
        v = torch.zeros(dim, k, dtype=exp.dtype)
        v[0, 0] = 1.0
        value = (exit_series if st.lr == 0.025 else parent_series)[st.step]
        return SimpleNamespace(values=torch.tensor([value] * k, dtype=torch.float64), vectors=v,
                               residuals=torch.zeros(k, dtype=torch.float64), n_matvecs=0,
                               gaps=torch.full((k,), float("nan"), dtype=torch.float64)), None

    monkeypatch.setattr(measure, "solve_curvature", fake)
    spec = copy.deepcopy(TINY)
    spec.update(steps=40, measure={"every": 5, "warmup": 12, "sharpness": True}, checkpoint={"every": 10})
    parent = eosbranch.train(spec, tmp_path)
    ev = parent.events.query("event == 't_star'")
    assert ev.step.tolist() == [20] and ev.value.tolist() == [41.0]
    t = parent.metrics.query("metric == 'loss' and group == 'all'").set_index("step").t_eff
    assert ev.t_eff.iloc[0] == t[20]

    eos, exit_ = eosbranch.fork(parent, at=("onset", 0), until="tss", branches={"branches": [
        {"name": "eos"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.5}]}]})
    assert exit_.events.query("event == 't_star_star'").step.tolist() == [30]
    assert exit_.spec.steps == 40 and exit_.complete
    te = exit_.metrics.query("metric == 'loss' and group == 'all'").set_index("step").t_eff
    df = eosbranch.compare(parent)
    assert (df.t_star == t[20]).all() and (df.t_fork == t[20]).all() and (df.fork_step == 20).all()
    assert df.t_star_star.iloc[0] == pytest.approx(te[25] + 0.5 * (te[30] - te[25]), rel=1e-12)
    assert df.t_end.iloc[0] == df.t_star_star.iloc[0]
    # The EoS reference ran as far in t_eff as the exit branch (lr 0.05 vs 0.025: half the steps).
    assert eos.metrics.t_eff.max() >= te[40] - 1e-12 and eos.spec.steps == 30


# -------------------------------------------------- unfinished or unreadable branches (issue 17)

def _unfinish(path: Path) -> None:
    from eosbranch.store import RunStore

    s = RunStore(path)
    m = s.manifest()
    m["complete"] = None
    s._write_manifest(m)


@pytest.mark.parametrize("which", ["exit", "eos", "parent"])
def test_compare_refuses_an_unfinished_branch_or_reference_unless_told(tmp_path, which):
    from typer.testing import CliRunner
    from eosbranch.cli import app

    ts = np.linspace(0, 1, 11)
    parent = write_series(tmp_path, {(None, None): [(t, {"loss": 1.0}) for t in ts],
                                     ("eos", 0): [(t, {"loss": 1 - 2 * t}) for t in ts],
                                     ("exit", 0): [(t, {"loss": 1 - t}) for t in ts]})
    victim = parent if which == "parent" else Path(f"{parent}--{which}-at0-00000000")
    _unfinish(victim)
    for cmd in (["compare", str(parent)], ["report", str(parent)]):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        (error,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert victim.name in error and "not complete" in error and "--incomplete" in error
    res = CliRunner().invoke(app, ["compare", str(parent), "--incomplete"])
    assert res.exit_code == 0, res.output
    assert "not complete; its comparison rows are marked incomplete" in res.stderr
    df = pd.read_parquet(parent / "comparison.parquet")
    assert df.incomplete.all()  # exit's rows depend on the unfinished run, whichever it is


def test_a_branch_without_lineage_is_reported_not_an_empty_table(tmp_path):
    ts = np.linspace(0, 1, 11)
    parent = write_series(tmp_path, {(None, None): [(t, {"loss": 1.0}) for t in ts],
                                     ("exit", 0): [(t, {"loss": 1 - t}) for t in ts]})
    branch = Path(f"{parent}--exit-at0-00000000")
    (branch / "lineage.json").unlink()
    with pytest.raises(EosbranchError, match=r"lineage.json: missing"):
        eosbranch.compare(parent)


def test_summarize_refuses_rows_marked_incomplete():
    from eosbranch.compare import summarize
    from eosbranch.completeness import allow_incomplete

    df = pd.DataFrame({"seed": [0, 1], "branch": "exit", "group": "all", "delta_at_end": [1.0, 2.0],
                       "delta_mean": [0.5, 1.0], "incomplete": [False, True]})
    with pytest.raises(EosbranchError, match="incomplete runs"):
        summarize(df)
    with allow_incomplete():
        assert summarize(df).n_seeds.tolist() == [2]
