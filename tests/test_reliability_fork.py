"""Faults during `eosbranch fork` (issue 8), injected for real: SIGKILL and SIGINT at seeded
moments of a real subprocess, then the same fork command again must end bit-identical to an
uninterrupted fork; a second fork into the same branch fails fast; a failed fork leaves nothing."""

from __future__ import annotations

import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

import eosbranch
from conftest import TINY, fault_env
from eosbranch.cli import app
from eosbranch.fork import load_branches
from eosbranch.store import RunStore

CLI = [sys.executable, "-m", "eosbranch.cli"]
AT, STEPS = 120, 1500  # fork at 120 (replayed from the parent's checkpoint at 100), then 1500 steps
KEYS = {"metrics": ["step", "t_eff", "lr", "group", "metric", "value"],
        "events": ["event", "step", "t_eff", "value", "detail"],
        "examples": ["step", "index", "group", "loss", "loss_change", "cos2_v1", "centroid_distance"]}


def _env(fault=None):
    return fault_env(fault, threads=2)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    spec = copy.deepcopy(TINY)
    spec.update(steps=200, groups="classes", checkpoint={"every": 50}, measure={"every": 50, "sharpness": False})
    spec["data"]["n_per_class"] = 150
    spec["model"]["width"] = 64
    return eosbranch.train(spec, tmp_path_factory.mktemp("parent"))


def fork_cmd(parent_path, steps=STEPS, branches="exit_eos"):
    return CLI + ["fork", "--run", str(parent_path), "--at", "step", str(AT), "--branches", branches,
                  "--steps", str(steps)]


def copy_parent(parent, root):
    return shutil.copytree(parent.path, root / parent.path.name)


def branch_dir(parent_path):
    (b,) = load_branches("exit_eos")
    return parent_path.parent / f"{parent_path.name}--{b.name}-at{AT}-{b.digest()}"


@pytest.fixture(scope="module")
def reference(parent, tmp_path_factory):
    """The uninterrupted fork, in its own process."""
    p = copy_parent(parent, tmp_path_factory.mktemp("ref"))
    res = subprocess.run(fork_cmd(p), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    return eosbranch.load(branch_dir(p)), None


def wait_for_pause(flag, proc, timeout=900):
    """The pid of ``proc`` once it pauses at its ``pause@...:flag`` point (see eosbranch/faults.py);
    the bound only turns a hang into a failure, it never decides the outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = list(flag.parent.glob(flag.name + ".[0-9]*"))
        hits = [h for h in hits if not h.name.endswith(".part")]
        if hits:
            return hits[0]
        if proc.poll() is not None:
            raise AssertionError(f"the fork ended (code {proc.returncode}) before it paused at {flag}")
        time.sleep(0.01)
    raise AssertionError(f"no pause at {flag} after {timeout} s")


def rerun_and_compare(p, reference):
    res = subprocess.run(fork_cmd(p), env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    ref, done = reference[0], eosbranch.load(branch_dir(p))
    assert done.complete
    a, b = ref.checkpoint()["model"], done.checkpoint()["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, cols in KEYS.items():
        pd.testing.assert_frame_equal(getattr(ref, name)[cols], getattr(done, name)[cols], obj=name)
    assert not done.metrics.duplicated(["step", "group", "metric"]).any()
    return res


def _kill_at(tmp_path, parent, fault):
    """Run the fork command with a fault at a named step (eosbranch/faults.py), to its end."""
    p = copy_parent(parent, tmp_path)
    proc = subprocess.run(fork_cmd(p), env=_env(fault), capture_output=True, text=True, timeout=900)
    return p, proc.returncode, proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [0])
def test_sigkill_mid_branch_then_the_same_fork_command_is_bit_identical(tmp_path, parent, reference, kill_seed):
    k = random.Random(kill_seed).randrange(201, AT + STEPS)
    p, code, _ = _kill_at(tmp_path, parent, f"kill@step={k}")
    assert code == -signal.SIGKILL and not eosbranch.load(branch_dir(p)).complete
    rerun_and_compare(p, reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [1, 2, 3])
def test_sigkill_mid_branch_more_seeds(tmp_path, parent, reference, kill_seed):
    test_sigkill_mid_branch_then_the_same_fork_command_is_bit_identical(tmp_path, parent, reference, kill_seed)


@pytest.mark.slow
@pytest.mark.parametrize("k", [110, 121])
def test_sigkill_at_the_start_of_the_branch(tmp_path, parent, reference, k):
    """Killed during the replay to the fork step (110), or right after the branch's first checkpoint (121)."""
    p, code, _ = _kill_at(tmp_path, parent, f"kill@step={k}")
    assert code == -signal.SIGKILL
    rerun_and_compare(p, reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill_seed", [0, 1])
def test_sigint_saves_exits_cleanly_and_the_same_fork_command_finishes_it(tmp_path, parent, reference, kill_seed):
    k = random.Random(100 + kill_seed).randrange(201, AT + STEPS)
    p, code, stderr = _kill_at(tmp_path, parent, f"int@step={k}")
    assert code == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stderr
    b = eosbranch.load(branch_dir(p))
    last = max(b.checkpoints)
    assert last == k and not b.complete
    assert b.metrics.step.max() == last - 1  # rows up to the interrupt, none after
    rerun_and_compare(p, reference)


@pytest.mark.slow
def test_a_second_fork_into_the_same_branch_fails_fast(tmp_path, parent, reference):
    p = copy_parent(parent, tmp_path)
    flag = tmp_path / "paused"
    first = subprocess.Popen(fork_cmd(p), env=_env(f"pause@step=200:{flag}"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    marker = wait_for_pause(flag, first)  # the first fork holds the lock, paused at step 200
    second = subprocess.run(fork_cmd(p), env=_env(), capture_output=True, text=True, timeout=300)
    assert first.poll() is None
    marker.unlink()  # let the first go on
    assert second.returncode == 2, second.stderr
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another process is writing this run (lock held)" in errors[0]
    assert "Traceback" not in second.stderr
    _, stderr = first.communicate(timeout=900)
    assert first.returncode == 0, stderr
    ref, done = reference[0], eosbranch.load(branch_dir(p))
    a, b = ref.checkpoint()["model"], done.checkpoint()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(ref.metrics[KEYS["metrics"]], done.metrics[KEYS["metrics"]])


# ------------------------------------------------- in-process, deterministic (the default suite)

SMALL_AT, SMALL_STEPS = 25, 30  # parent checkpoints every 10: replay 20 -> 25; branch 25..55


@pytest.fixture(scope="module")
def small_parent(tmp_path_factory):
    spec = copy.deepcopy(TINY)
    spec.update(steps=40, groups="classes", checkpoint={"every": 10}, measure={"every": 5, "sharpness": False})
    return eosbranch.train(spec, tmp_path_factory.mktemp("small"))


def small_fork(parent_path, *extra):
    return CliRunner().invoke(app, ["fork", "--run", str(parent_path), "--at", "step", str(SMALL_AT),
                                    "--branches", "exit_eos", "--steps", str(SMALL_STEPS), *map(str, extra)])


def small_branch(parent_path):
    (b,) = load_branches("exit_eos")
    return parent_path.parent / f"{parent_path.name}--{b.name}-at{SMALL_AT}-{b.digest()}"


@pytest.fixture(scope="module")
def small_reference(small_parent, tmp_path_factory):
    p = copy_parent(small_parent, tmp_path_factory.mktemp("small_ref"))
    res = small_fork(p)
    assert res.exit_code == 0, res.output
    return eosbranch.load(small_branch(p))


def rewind(path, c):
    """The branch as a kill between its checkpoint at ``c`` and the next leaves it: the manifest
    commits checkpoints up to ``c``; the tables hold the rows of steps before ``c`` (later files
    stay on disk, uncommitted)."""
    store = RunStore(path)
    m = store.manifest()
    m["checkpoints"] = [e for e in m["checkpoints"] if e["step"] <= c]
    m["complete"] = None
    m.pop("tail", None)
    (path / "checkpoints" / "manifest.json").write_text(__import__("json").dumps(m))
    (path / "checkpoints" / "end.json").unlink(missing_ok=True)
    run = eosbranch.load(path)
    for name in KEYS:
        df = getattr(run, name)
        store.write_table(name, df[df.step < c].reset_index(drop=True))


@pytest.mark.parametrize("c", [SMALL_AT, 30, 50])
def test_a_fork_stopped_after_any_of_its_checkpoints_reruns_bit_identical(tmp_path, small_parent, small_reference, c):
    """Deterministic twin of the SIGKILL tests: at c = 25 (the fork step's own checkpoint) the
    branch's fork events (fork_state, fork_params, fork_step, certificate rows) are only in that
    checkpoint; a resume must keep them."""
    p = copy_parent(small_parent, tmp_path)
    assert small_fork(p).exit_code == 0
    rewind(small_branch(p), c)
    assert not eosbranch.load(small_branch(p)).complete
    res = small_fork(p)
    assert res.exit_code == 0, res.output
    ref, done = small_reference, eosbranch.load(small_branch(p))
    assert done.complete
    a, b = ref.checkpoint()["model"], done.checkpoint()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name, cols in KEYS.items():
        pd.testing.assert_frame_equal(getattr(ref, name)[cols], getattr(done, name)[cols], obj=name)


def test_a_fork_into_a_branch_being_written_fails_fast_and_changes_nothing(tmp_path, small_parent):
    p = copy_parent(small_parent, tmp_path)
    assert small_fork(p).exit_code == 0
    d = small_branch(p)
    rewind(d, 30)  # the first writer is mid-branch
    before = {f: f.read_bytes() for f in d.rglob("*") if f.is_file()}
    holder = RunStore(d)
    holder.lock()
    try:
        res = small_fork(p)  # the lock is taken non-blocking (LOCK_NB): it fails, never waits
    finally:
        holder.unlock()
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another process is writing this run (lock held)" in errors[0]
    assert {f: f.read_bytes() for f in d.rglob("*") if f.is_file()} == before


# -------------------------------------------------------------- a second fork, a failed fork

def test_a_refused_second_fork_writes_nothing(tmp_path, small_parent):
    p = copy_parent(small_parent, tmp_path)
    d = small_branch(p)
    d.mkdir()
    # The first writer's state while it replays to the fork step: its files, its lock, no checkpoint.
    (d / "spec.yaml").write_text(yaml.safe_dump({**eosbranch.load(p).spec.model_dump(mode="json"),
                                                 "steps": SMALL_AT + SMALL_STEPS}, sort_keys=False))
    (d / "lineage.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}
    holder = RunStore(d)
    holder.lock()
    try:
        res = CliRunner().invoke(app, ["fork", "--run", str(p), "--at", "step", str(SMALL_AT), "--branches",
                                       "exit_eos", "--steps", "5"])
    finally:
        holder.unlock()
    assert res.exit_code == 2 and "another process is writing this run" in res.stderr
    assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file() and f.name != ".lock"} == before


MISFITS = [  # valid branch files whose interventions do not fit this run (groups class_0, class_1; 2 classes)
    ([{"kind": "reweight", "group": "nosuch", "weight": 2.0}], "reweight.group: no group 'nosuch'"),
    ([{"kind": "label_flip", "group": "nosuch"}], "label_flip.group: no group 'nosuch'"),
    ([{"kind": "label_flip", "group": "class_0", "to": 5}], "label_flip.to: 5 is not a class"),
    ([{"kind": "gradient_surgery", "group": "nosuch"}], "gradient_surgery.group: no group 'nosuch'"),
    ([{"kind": "random_direction"}], "random_direction.group: no group 'input_outlier'"),
    ([{"kind": "random_direction", "group": "class_0"}], "not a coherent input-outlier group"),
    ([{"kind": "reweight", "group": "class_0", "weight": 0.0}, {"kind": "reweight", "group": "class_1", "weight": 0.0}],
     "every training point would have weight 0"),
    ([{"kind": "optimizer_switch", "to": {"kind": "adam", "lr": 0.01}, "state": "carried"}],
     "optimizer_switch.state: cannot carry"),
]


@pytest.mark.parametrize("interventions,message", MISFITS, ids=[m[1].split(":")[0] for m in MISFITS])
def test_a_fork_that_fails_at_the_fork_step_leaves_no_branch_directory(tmp_path, small_parent, interventions,
                                                                       message):
    p = copy_parent(small_parent, tmp_path)
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"name": "bad", "interventions": interventions}))
    siblings = set(p.parent.iterdir())
    res = CliRunner().invoke(app, ["fork", "--run", str(p), "--at", "step", str(SMALL_AT), "--branches", str(f),
                                   "--steps", "5"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], res.stderr
    assert set(p.parent.iterdir()) == siblings


def test_a_branch_that_diverges_stops_cleanly_and_keeps_its_last_good_state(tmp_path, small_parent):
    """lr 50 from the fork at 25: the loss overflows a few steps later. The branch is kept with its
    valid, finite checkpoints and a `diverged` event at that step; asking again says the same."""
    p = copy_parent(small_parent, tmp_path)
    f = tmp_path / "boom.yaml"
    f.write_text(yaml.safe_dump({"name": "boom", "interventions": [{"kind": "lr", "value": 50.0}]}))
    args = ["fork", "--run", str(p), "--at", "step", str(SMALL_AT), "--branches", str(f), "--steps", "40"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    (d,) = [x for x in p.parent.iterdir() if x.name.startswith(f"{p.name}--boom-at{SMALL_AT}-")]
    b = eosbranch.load(d)
    (row,) = b.events[b.events.event == "diverged"].itertuples()
    t = int(row.step)
    last = max(b.checkpoints)
    assert SMALL_AT < t and f"at step {t}" in error and f"Last good checkpoint: step {last}" in error and last <= t
    loss = b.metric("loss")
    assert loss.index.max() == t - 1 and torch.isfinite(torch.tensor(loss.values)).all()
    for s in b.checkpoints:
        assert all(torch.isfinite(v).all() for v in b.checkpoint(s)["model"].values())
    assert b.events.query("event == 'fork_step'").step.tolist() == [SMALL_AT] and not b.complete
    before = {x.name: x.read_bytes() for x in (d / "checkpoints").glob("*.pt")}
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and [ln for ln in res.stderr.splitlines() if ln.startswith("error:")] == [error]
    assert (eosbranch.load(d).events.event == "diverged").sum() == 1
    assert {x.name: x.read_bytes() for x in (d / "checkpoints").glob("*.pt")} == before
