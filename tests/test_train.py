"""The trainer: determinism, tidy tables, resume bit for bit, extension, divergence."""

import pandas as pd
import pytest
import torch

import eosbranch
from eosbranch.errors import DivergenceError
from eosbranch.store import RunStore
from eosbranch.tables import METRICS_COLUMNS
from eosbranch.rundir import open_run
from eosbranch.state import checkpoint_state
from eosbranch.spec import parse_spec

from conftest import crash_at


def final_params(run):
    return run.checkpoint()["model"]


def assert_same_run(a, b):
    pa, pb = final_params(a), final_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    cols = ["step", "t_eff", "lr", "group", "metric", "value"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols])


def test_metrics_table_contract(tmp_path, tiny_spec):
    run = eosbranch.train(tiny_spec, tmp_path)
    m = run.metrics
    assert list(m.columns) == METRICS_COLUMNS
    assert set(m.metric) >= {"loss", "accuracy"}
    loss = run.metric("loss")
    assert list(loss.index) == list(range(31))  # every step plus the final state
    assert (m.run == run.name).all() and (m.branch == "trunk").all() and (m.seed == 0).all()
    # t_eff = sum of step sizes taken before the step.
    row = m[(m.metric == "loss") & (m.step == 20)].iloc[0]
    assert row.t_eff == pytest.approx(20 * 0.05) and row.lr == 0.05
    assert not m.duplicated(["step", "group", "metric"]).any()
    assert run.checkpoints == [0, 10, 20, 30]
    assert run.complete and run.spec.steps == 30
    assert (run.path / "spec.yaml").is_file() and run.lineage["parent"] is None
    # GD on this problem decreases the loss.
    assert loss.iloc[-1] < loss.iloc[0]


def test_same_seed_twice_identical_and_different_seed_differs(tmp_path, tiny_spec):
    a = eosbranch.train(tiny_spec, tmp_path / "a")
    b = eosbranch.train(tiny_spec, tmp_path / "b")
    assert_same_run(a, b)
    c = eosbranch.train(tiny_spec, tmp_path / "c", seed=1)
    assert not torch.equal(final_params(a)["1.weight"], final_params(c)["1.weight"])



def crash_then_resume(tmp_path, spec_dict, crash_step):
    """Train uninterrupted, then again with a crash at ``crash_step`` and a resume: (ref, resumed, store)."""
    ref = eosbranch.train(spec_dict, tmp_path / "ref")
    spec = parse_spec(spec_dict)
    store = open_run(spec, tmp_path / "crash" / ref.name)
    crash_at(spec, store, crash_step)
    crashed = (store.checkpoint_steps(), int(store.read_table("metrics").step.max()))
    return ref, eosbranch.resume(store.path), crashed


@pytest.mark.parametrize("opt", [
    {"kind": "gd", "lr": 0.05},
    {"kind": "sgd", "lr": 0.05, "batch_size": 16},
    {"kind": "momentum", "lr": 0.02, "beta": 0.9, "dampening": 0.1},
    {"kind": "adam", "lr": 0.001},
    {"kind": "splitsgd", "lr": 0.05, "lr_sign": 0.001, "batch_size": 32},
])
def test_crash_then_resume_is_bit_identical(tmp_path, tiny_spec, opt):
    tiny_spec["optimizer"] = opt
    tiny_spec["checkpoint"] = {"every": 7}
    ref, resumed, (checkpoints, last_row) = crash_then_resume(tmp_path, tiny_spec, 17)
    assert checkpoints == [0, 7, 14]
    assert last_row == 13  # rows of steps < 14 survived the crash
    assert_same_run(ref, resumed)


def test_train_again_finds_the_finished_run_and_extends_it(tmp_path, tiny_spec):
    ref = eosbranch.train({**tiny_spec, "steps": 50}, tmp_path / "ref")
    run = eosbranch.train(tiny_spec, tmp_path / "ext")
    again = eosbranch.train(tiny_spec, tmp_path / "ext")  # no work: already complete
    assert again.path == run.path and again.metrics.equals(run.metrics)
    extended = eosbranch.resume(run.path, steps=50)
    assert extended.path == run.path and extended.spec.steps == 50
    assert_same_run(ref, extended)


def test_divergence_stops_cleanly_with_event(tmp_path, tiny_spec):
    tiny_spec["optimizer"] = {"kind": "gd", "lr": 50.0}
    tiny_spec["steps"] = 200
    with pytest.raises(DivergenceError, match=r"loss became (nan|inf) at step \d+.*Last good checkpoint: step \d+"):
        eosbranch.train(tiny_spec, tmp_path)
    (path,) = tmp_path.iterdir()
    run = eosbranch.load(path)
    ev = run.events
    assert list(ev.event) == ["diverged"]
    t = int(ev.step.iloc[0])
    assert run.metric("loss").index.max() == t - 1  # the rows before divergence are kept
    ck = run.checkpoint()  # the last good checkpoint is still valid and finite
    assert ck["step"] <= t and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not run.complete


@pytest.mark.parametrize("model", [
    {"kind": "cnn", "channels": [4]},
    {"kind": "resnet", "widths": [4, 8]},
    {"kind": "resnet", "widths": [4], "batchnorm": True},
])
def test_conv_models_train_on_digits(tmp_path, tiny_spec, model):
    tiny_spec.update(model=model, steps=3)
    run = eosbranch.train(tiny_spec, tmp_path)
    assert run.complete and len(run.metric("loss")) == 4


def test_regression_data_and_float64(tmp_path, tiny_spec):
    tiny_spec.update(data={"kind": "chebyshev", "n": 20, "degree": 3}, dtype="float64", steps=5)
    run = eosbranch.train(tiny_spec, tmp_path)
    assert "accuracy" not in set(run.metrics.metric)
    assert run.checkpoint()["model"]["1.weight"].dtype == torch.float64


def test_sgd_records_batch_loss_and_full_loss(tmp_path, tiny_spec):
    tiny_spec["optimizer"] = {"kind": "sgd", "lr": 0.05, "batch_size": 16}
    m = eosbranch.train(tiny_spec, tmp_path).metrics
    assert set(m[m.metric == "batch_loss"].step) == set(range(30))
    assert set(m[m.metric == "loss"].step) == {0, 10, 20, 30}


def test_checkpoint_holds_full_state(tmp_path, tiny_spec):
    tiny_spec["optimizer"] = {"kind": "adam", "lr": 0.01, "batch_size": 16}
    run = eosbranch.train(tiny_spec, tmp_path)
    ck = run.checkpoint(20)
    assert ck["step"] == 20 and ck["t_eff"] == pytest.approx(0.2) and ck["lr"] == 0.01
    assert set(ck["optimizer"]) == {"step", "m", "v"} and int(ck["optimizer"]["step"]) == 20
    assert set(ck["rng"]) >= {"python", "numpy", "torch"}
    assert ck["cursor"]["epoch"] >= 1
