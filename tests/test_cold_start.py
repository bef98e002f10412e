"""The warm/cold choice of each measurement's solve (eosbranch.curvature.warm_start.stale_warm_start,
eosbranch.measure.cold_start): cold where the training loss grew more than LOSS_JUMP times since the
previous measurement, read back from the run's own tables, and the solve it made reproduced."""

import math

import pytest
import torch

import eosbranch
from eosbranch.curvature import LOSS_JUMP, stale_warm_start
from eosbranch.measure import LOSS_KEY, solve_curvature
from eosbranch.train import build, restore_state


def test_stale_warm_start_rule():
    assert LOSS_JUMP == 2.0
    assert stale_warm_start(2.1, 1.0) and stale_warm_start(9.5, 0.093)
    assert not stale_warm_start(1.9, 1.0) and not stale_warm_start(0.5, 1.0) and not stale_warm_start(2.0, 1.0)
    assert not stale_warm_start(5.0, None)  # the first measurement: nothing to compare with
    for loss, prev in ((math.nan, 1.0), (1.0, math.nan), (math.inf, 1.0), (1.0, 0.0), (1.0, -1.0)):
        assert not stale_warm_start(loss, prev)


def test_cold_starts_follow_the_loss_at_measurements_and_reproduce(tmp_path, tiny_spec):
    # Cross-entropy at eta = 1 on the tiny MLP: the loss catapults between measurements (the case
    # of tests/test_eigen_error.py that first showed a cold start).
    tiny_spec["model"]["activation"] = "tanh"
    tiny_spec.update(dtype="float64", loss="ce", steps=30, optimizer={"kind": "gd", "lr": 1.0}, groups="classes",
                     measure={"every": 10, "sharpness": True, "tol": 1e-2}, checkpoint={"every": 10})
    run = eosbranch.train(tiny_spec, tmp_path)
    m = run.metrics
    loss = m[(m.metric == "loss") & (m.group == "all")].set_index("step").value
    measured = sorted(m[m.metric == "sharpness"].step)
    # The oracle: the rule applied to the loss column of the run's own table.
    expected = {s for prev, s in zip(measured, measured[1:]) if loss[s] > LOSS_JUMP * loss[prev]}
    events = run.events[run.events.event == "cold_start"]
    assert set(events.step) == expected and expected, "this setting is chosen to catapult"
    for step in events.step:
        assert events[events.step == step].value.iloc[0] == pytest.approx(loss[step], rel=1e-12)
    for step in measured[1:]:
        exp = build(run.spec)
        st = restore_state(exp, run.checkpoint(step))
        assert st.measured[LOSS_KEY] == pytest.approx(loss[step - 10], rel=1e-12)  # kept in the checkpoint
        recorded = m[(m.metric == "sharpness") & (m.step == step)].value.iloc[0]
        res, _ = solve_curvature(exp, st, cold=step in expected)
        assert res.values[0].item() == recorded  # the solve the measurement made, bit for bit
        if step in expected:
            assert res.start == "cold"
            warm, _ = solve_curvature(exp, st)
            assert warm.start == "warm" and not torch.equal(warm.vectors, res.vectors)
