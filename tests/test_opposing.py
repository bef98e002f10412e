"""Opposing signals: antiphase statistics on synthetic series, detection on a run at the EoS."""

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from eosbranch.cli import app
from eosbranch.errors import EosbranchError
from eosbranch.opposing import find, pair_statistics


def test_pair_statistics_on_synthetic_antiphase_and_inphase():
    t = np.arange(21)
    wave = 0.1 * (-1.0) ** t
    anti = pair_statistics(1.0 + wave, 2.0 - 0.5 * wave)
    assert anti["alternation_rate"] == 1.0 and anti["correlation"] == pytest.approx(-1.0)
    assert anti["amplitude_a"] == pytest.approx(0.2) and anti["amplitude_b"] == pytest.approx(0.1)
    same = pair_statistics(1.0 + wave, 2.0 + wave)
    assert same["alternation_rate"] == 0.0 and same["correlation"] == pytest.approx(1.0)
    # Half the steps opposite.
    a = np.array([0, 1, 0, 1, 0.0])
    b = np.array([0, 1, 0, -1, 0.0])  # diffs a: +,-,+,- ; b: +,-,-,+
    assert pair_statistics(a, b)["alternation_rate"] == 0.5


def test_find_on_a_run_at_the_eos(quick_run):
    res = find(quick_run, "onset", top=5, window=20)
    ev = quick_run.events
    assert res.step == int(ev.loc[ev.event == "t_star", "step"].iloc[0])
    pts = res.points
    rise, fall = pts[pts.role == "rise"], pts[pts.role == "fall"]
    assert len(rise) == len(fall) == 5
    assert (rise.loss_change > 0).all() and (fall.loss_change < 0).all()
    assert rise.loss_change.min() >= pts.loss_change.quantile(0.5)
    # The ranking is exact: recompute l_i(T+1) - l_i(T) for the top point.
    top = rise.iloc[0]
    assert top.loss_after - top.loss_before == pytest.approx(top.loss_change)
    pair = res.pairs.set_index("pair").loc["opposing"]
    assert pair.correlation < 0 and pair.alternation_rate > 0.5  # antiphase at the EoS
    assert 0 < pair.fraction_loss_increased < 1
    assert sorted(res.group_spec["indices_rise"]) == sorted(rise["index"].tolist())


def test_cli_saves_tables_and_group_entry(quick_run):
    res = CliRunner().invoke(app, ["opposing", str(quick_run.path), "--step", "200", "--top", "4", "--window", "5"])
    assert res.exit_code == 0, res.output
    assert (quick_run.path / "opposing_pairs.parquet").is_file()
    (entry,) = yaml.safe_load((quick_run.path / "opposing_groups.yaml").read_text())
    assert entry["kind"] == "opposing" and len(entry["indices_rise"]) == 4
    assert (entry["step"], entry["top"]) == (200, 4) and len(entry["data_sha256"]) == 64  # what the kind checks


def test_bad_requests_are_clear(quick_run):
    with pytest.raises(EosbranchError, match="outside the run"):
        find(quick_run, quick_run.spec.steps, top=3, window=5)
    with pytest.raises(EosbranchError, match="'onset'"):
        find(quick_run, "later")


def test_the_opposing_group_kind_reads_the_pair_the_command_saved(quick_run, tmp_path):
    from eosbranch.data import load_data
    from eosbranch.errors import SpecError
    from eosbranch.groups import resolve

    def saved(step, top):
        res = CliRunner().invoke(app, ["opposing", str(quick_run.path), "--step", str(step), "--top", str(top),
                                       "--window", "2"])
        assert res.exit_code == 0, res.output

    data = load_data(quick_run.spec.data)
    entry = {"kind": "opposing", "run": str(quick_run.path), "step": "onset", "top": 5}
    # On the data the run trained on (its prototype groups first), the kind finds what `opposing` finds.
    saved("onset", 5)
    r = resolve([*quick_run.spec.groups, entry], data.X, data.y)
    pts = find(quick_run, "onset", top=5, window=2).points
    assert r.groups["opposing_rise"].tolist() == sorted(pts[pts.role == "rise"]["index"])
    assert r.groups["opposing_fall"].tolist() == sorted(pts[pts.role == "fall"]["index"])
    step = find(quick_run, "onset", top=5).step + 3
    # A saved pair of another step (or size) is not taken for this one: the error names the command.
    with pytest.raises(SpecError, match=rf"holds the pair of step {step - 3} with top 5, not step {step} with top 5; "
                                        rf"run `eosbranch opposing {quick_run.path} --step {step} --top 5`"):
        resolve([*quick_run.spec.groups, {**entry, "step": step}], data.X, data.y)
    with pytest.raises(SpecError, match=r"not step \d+ \(onset\) with top 4"):
        resolve([*quick_run.spec.groups, {**entry, "top": 4}], data.X, data.y)
    saved(step, 5)
    at_step = resolve([*quick_run.spec.groups, {**entry, "step": step}], data.X, data.y)
    pts = find(quick_run, step, top=5, window=2).points
    assert at_step.groups["opposing_rise"].tolist() == sorted(pts[pts.role == "rise"]["index"])
    # Other data: the indices would name other points, so it is refused, naming the field.
    with pytest.raises(SpecError, match=r"groups\[0\]\.run: .* other data"):
        resolve([{**entry, "step": step}], data.X, data.y)
    (pair,) = yaml.safe_load((quick_run.path / "opposing_groups.yaml").read_text())
    with pytest.raises(SpecError, match=r"groups\[0\]\.data_sha256: .* other data"):
        resolve([pair], data.X, data.y)  # the saved entry, used as a group spec itself
    assert resolve([*quick_run.spec.groups, pair], data.X, data.y).groups["opposing_fall"].tolist() == \
        at_step.groups["opposing_fall"].tolist()
    with pytest.raises(SpecError, match=r"\.run: no run directory"):
        resolve([{**entry, "run": str(tmp_path / "nowhere")}], data.X, data.y)
    (tmp_path / "unsearched").mkdir()
    (tmp_path / "unsearched" / "spec.yaml").write_text(quick_run.spec.to_yaml())
    with pytest.raises(SpecError, match=r"\.run: .* has no opposing_groups.yaml; run `eosbranch opposing .*unsearched "
                                        r"--step onset --top 5` first"):
        resolve([{**entry, "run": str(tmp_path / "unsearched")}], data.X, data.y)
    with pytest.raises(SpecError, match=r"\.indices_rise: give either a run"):
        resolve([{**entry, "indices_rise": [1]}], data.X, data.y)
    with pytest.raises(SpecError, match=r"\.indices_fall: missing"):
        resolve([{"kind": "opposing", "indices_rise": [1]}], data.X, data.y)


def test_only_training_points_are_ranked_when_groups_are_held_out(tmp_path, tiny_spec):
    import eosbranch
    from conftest import write_spec
    from eosbranch.train import build

    tiny_spec.update(steps=10, groups={"kind": "prototypes", "per_class": 3, "mode": "heldout"})
    run = eosbranch.train(write_spec(tmp_path / "s.yaml", tiny_spec), tmp_path / "runs")
    exp = build(run.spec)
    trained = set(exp.train_index.tolist())
    held = set(range(len(exp.data.X))) - trained
    assert held  # the prototype groups are not trained on
    res = find(run, 4, top=8, window=3)
    assert set(res.points["index"]) <= trained
    # The fraction is over training points: recompute it from a replay.
    from eosbranch.opposing import loss_trajectory

    losses, _, _ = loss_trajectory(run, 4, 3)
    idx = sorted(trained)
    want = float(((losses[1] - losses[0])[idx] > 0).mean())
    assert res.pairs["fraction_loss_increased"].iloc[0] == pytest.approx(want)
