"""Every-step group losses (eosbranch.step_losses): each step's group loss and accuracy equal the
group's mean of per-example losses and correctness recomputed from that step's checkpointed
parameters; held-out groups included; minibatch runs get batch rows and full-data rows at their
cadence; the probes do not duplicate them."""

from __future__ import annotations

import copy

import pytest
import torch

import eosbranch
from eosbranch.experiment import build

from conftest import TINY


def spec(**over) -> dict:
    s = copy.deepcopy(TINY)
    s.update({"dtype": "float64", "steps": 12, "checkpoint": {"every": 1},
              "groups": [{"kind": "class", "name": "class_0", "label": 0},
                         {"kind": "random", "name": "some", "size": 9, "seed": 3}]})
    s.update(over)
    return s


def oracle(run, step: int, group_rows) -> tuple[float, float]:
    exp = build(run.spec)
    exp.model.load_state_dict(run.checkpoint(step)["model"])
    with torch.no_grad():
        out = exp.model(exp.data.X[group_rows])
        per = exp.loss_fn(out, exp.data.y[group_rows], reduction="none")
    return per.mean().item(), (out.argmax(1) == exp.data.y[group_rows]).double().mean().item()


def test_every_step_group_rows_equal_the_groups_mean_loss_and_accuracy(tmp_path):
    run = eosbranch.train(spec(), tmp_path)
    exp = build(run.spec)
    m = run.metrics
    for name, rows in exp.groups.items():
        loss = m[(m.group == name) & (m.metric == "loss")].set_index("step").value
        acc = m[(m.group == name) & (m.metric == "accuracy")].set_index("step").value
        assert list(loss.index) == list(range(13)) and list(acc.index) == list(range(13))  # every step, once
        for step in (0, 5, 12):
            want_loss, want_acc = oracle(run, step, rows)
            assert loss[step] == pytest.approx(want_loss, rel=1e-12)
            assert acc[step] == pytest.approx(want_acc, abs=1e-12)


def test_a_heldout_group_has_every_step_rows_too(tmp_path):
    s = spec(groups={"kind": "prototypes", "per_class": 2, "mode": "heldout", "knn_k": 8})
    run = eosbranch.train(s, tmp_path)
    exp = build(run.spec)
    assert exp.train_index is not None  # the groups are not trained on
    m = run.metrics
    for name, rows in exp.groups.items():
        loss = m[(m.group == name) & (m.metric == "loss")].set_index("step").value
        assert list(loss.index) == list(range(13))
        assert loss[7] == pytest.approx(oracle(run, 7, rows)[0], rel=1e-12)


def test_minibatch_runs_get_batch_rows_and_full_data_rows_at_their_cadence(tmp_path):
    s = spec(optimizer={"kind": "sgd", "lr": 0.05, "batch_size": 16}, measure={"every": 6, "sharpness": False},
             groups=[{"kind": "class", "name": "class_0", "label": 0}])
    s["measure"]["group_loss_every"] = 4
    run = eosbranch.train(s, tmp_path)
    m = run.metrics
    full = m[(m.group == "class_0") & (m.metric == "loss")]
    # Full-data rows every 4 steps (from the trainer) and at measurements (the probes), once per step.
    assert sorted(full.step) == [0, 4, 6, 8, 12]
    assert not full.step.duplicated().any()
    exp = build(run.spec)
    assert full.set_index("step").value[8] == pytest.approx(oracle(run, 8, exp.groups["class_0"])[0], rel=1e-12)
    batch = m[(m.group == "class_0") & (m.metric == "batch_loss")]
    assert 0 < len(batch) <= 12 and batch.step.max() < 12  # a row where the batch holds members


def test_full_batch_probes_do_not_duplicate_the_step_rows(tmp_path):
    run = eosbranch.train(spec(measure={"every": 4, "sharpness": True}), tmp_path)
    m = run.metrics
    rows = m[(m.group == "class_0") & m.metric.isin(["loss", "accuracy"])]
    assert not rows.duplicated(["step", "metric"]).any()
    assert (m[(m.group == "class_0")].metric == "cos2_v1").sum() == 4  # the probes still ran (steps 0, 4, 8, 12)
