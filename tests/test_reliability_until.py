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
from eosbranch.experiment import build
from eosbranch.loop import Trainer
from eosbranch.rundir import open_run


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
        tr.run(spec.steps, until=lambda t: t.st.step >= at)
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
    elif isinstance(a, float) and a != a:  # NaN (e.g. fork_params' value): the same if NaN on both sides
        assert isinstance(b, float) and b != b, where
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


# ------------------------------------------------ a killed `fork --until tss`, by the real CLI

import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from eosbranch.catalog import example_path  # noqa: E402

TSS_CMD = ["--at", "onset", "--branches", "enter_eos", "--until", "tss"]
# quick.yaml to 200 steps: t* = 110; enter_eos is past its threshold at once, so t** = 120 and
# the rule stops the branch at 140 (t** + two measurement intervals); measurements at 110..140.
TSS_MEASURED = [120, 130, 140]


def _fork_tss(parent_path, fault=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("EOSBRANCH_FAULT", None)
    if fault:
        env["EOSBRANCH_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "eosbranch.cli", "fork", "--run", str(parent_path), *TSS_CMD],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tss_parent(tmp_path_factory):
    return eosbranch.train(example_path("quick"), tmp_path_factory.mktemp("tss_parent"), steps=200, threads=1)


@pytest.fixture(scope="module")
def tss_reference(tss_parent, tmp_path_factory):
    p = shutil.copytree(tss_parent.path, tmp_path_factory.mktemp("tss_ref") / tss_parent.path.name)
    res = _fork_tss(p)
    assert res.returncode == 0, res.stderr
    (b,) = [d for d in p.parent.iterdir() if d.name.startswith(p.name + "--")]
    ref = eosbranch.load(b)
    assert ref.complete and ref.spec.steps == 140 and ref.lineage["fork_step"] == 110
    return ref


def _killed_then_rerun_equals_reference(tmp_path, parent, reference, fault):
    p = shutil.copytree(parent.path, tmp_path / parent.path.name)
    killed = _fork_tss(p, fault)
    assert killed.returncode == -9, (fault, killed.returncode, killed.stderr)  # the fault point was reached
    b = p.parent / reference.path.name
    assert b.is_dir() and not eosbranch.load(b).complete
    res = _fork_tss(p)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    done = eosbranch.load(b)
    assert done.complete and done.spec.steps == reference.spec.steps
    assert done.checkpoints == reference.checkpoints
    for s in reference.checkpoints:  # every tensor, eig_vectors (the warm start) included
        same_state(reference.checkpoint(s), done.checkpoint(s), f"step_{s}")
    for name in ("metrics", "events", "examples"):
        pd.testing.assert_frame_equal(getattr(reference, name), getattr(done, name), obj=name)


@pytest.mark.parametrize("fault", ["kill@stopping=140",  # the rule fired; the final checkpoint not yet written
                                   pytest.param("kill@measured=140", marks=pytest.mark.slow)])
def test_a_killed_fork_until_tss_reruns_bit_exact(tmp_path, tss_parent, tss_reference, fault):
    """Points 1 and 8 through the real CLI: `fork --until tss` killed at a named point, the same
    command re-run, against an uninterrupted reference (~20 s: the rest are in the slow suite)."""
    _killed_then_rerun_equals_reference(tmp_path, tss_parent, tss_reference, fault)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_killed_fork_until_tss_reruns_bit_exact_seeded(tmp_path, tss_parent, tss_reference, seed):
    rng = random.Random(seed)
    point = rng.choice(["measured", "stopping", "step"])
    step = 140 if point == "stopping" else rng.choice(TSS_MEASURED if point == "measured" else range(111, 140))
    _killed_then_rerun_equals_reference(tmp_path, tss_parent, tss_reference, f"kill@{point}={step}")
