"""A stop rule (`fork --until tss`, `--teff`) ends a run exactly (issue 17, points 1 and 8): the
final checkpoint holds the state *before* the stop step's measurement, as every checkpoint does,
so a run stopped by the rule equals a run that was told to end at that step, in every tensor of
the checkpoint (the warm-start eig_vectors included) and in every row; a kill right after that
measurement, or right where the rule fires, resumes to the same."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

import eosbranch
from conftest import TINY
from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.train import Trainer, build, open_run


def _spec(steps):
    s = copy.deepcopy(TINY)
    s.update(steps=steps, measure={"every": 5, "sharpness": True}, checkpoint={"every": 10})
    return parse_spec(s)


def _stopped_by_rule(path, at=15):
    spec = _spec(30)
    store, _ = RunStore(path).new_locked()
    try:
        open_run(spec, path, store=store)
        tr = Trainer(build(spec), store)
        tr.start_fresh()
        tr.until = lambda t: t.st.step >= at
        tr.run(spec.steps)
    finally:
        store.unlock()
    return eosbranch.load(path)


def same_state(a, b, where="checkpoint"):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_a_run_stopped_by_its_rule_equals_one_told_to_end_there(tmp_path):
    told = eosbranch.train(_spec(15), tmp_path / "told")
    stopped = _stopped_by_rule(tmp_path / "stopped" / told.name)
    assert stopped.complete and stopped.spec.steps == 15
    a, b = told.checkpoint(), stopped.checkpoint()
    assert a["eig_vectors"] is not None
    same_state(a, b)  # eig_vectors included: the state before step 15's measurement
    cols = ["step", "t_eff", "lr", "group", "metric", "value"]
    pd.testing.assert_frame_equal(told.metrics[cols], stopped.metrics[cols])
    # Extended from there: step 15 is measured again, bit for bit (no row already reported changes).
    longer = eosbranch.train(_spec(25), tmp_path / "longer")
    ext = eosbranch.train(_spec(25), run_dir=stopped.path)
    m = longer.metrics[cols]
    pd.testing.assert_frame_equal(m.reset_index(drop=True), ext.metrics[cols].reset_index(drop=True))
