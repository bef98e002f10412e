"""Comparing branches: t** interpolation, the sign convention of Δl_k, compare on real forks."""

import numpy as np
import pytest
from typer.testing import CliRunner

import eosbranch
from eosbranch.cli import app
from eosbranch.compare import branch_effect, crossing, effect


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


def test_compare_on_forks_at_onset(quick_run):
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
