"""Two writers of one run (issue 17, point 5), with two real processes: the first holds the run's
lock, paused at a named step (EOSBRANCH_FAULT=pause@..., eosbranch/faults.py), while the second
starts the same `train` or `fork`. The second fails with one line and changes nothing (it never
removes the directory or the temp files of the first); the first then finishes intact."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import eosbranch
from conftest import TINY, write_spec, fault_env

CLI = [sys.executable, "-m", "eosbranch.cli"]


def env(fault=None):
    return fault_env(fault, threads=1)


def wait_for_pause(flag, proc, bound=600):
    """The marker file of ``proc`` paused at its fault point. The bound only turns a hang into a
    failure; no outcome depends on how long anything takes."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        hits = [h for h in flag.parent.glob(flag.name + ".[0-9]*") if not h.name.endswith(".part")]
        if hits:
            return hits[0]
        if proc.poll() is not None:
            raise AssertionError(f"ended (code {proc.returncode}) before pausing: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("never paused")


def snapshot(d):
    return {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".lock"}


def same_run(a, b):
    ma, mb = a.checkpoint()["model"], b.checkpoint()["model"]
    assert a.complete and b.complete and all(torch.equal(ma[k], mb[k]) for k in ma)
    cols = ["step", "t_eff", "lr", "group", "metric", "value"]
    pd.testing.assert_frame_equal(a.metrics[cols], b.metrics[cols])


@pytest.fixture
def spec(tmp_path):
    s = copy.deepcopy(TINY)
    s.update(steps=20, checkpoint={"every": 10}, measure={"every": 5, "sharpness": False}, groups="classes")
    return write_spec(tmp_path / "spec.yaml", s)


@pytest.mark.parametrize("pause_at", [0, 15])  # before the run's first checkpoint; mid-run with a temp file
def test_a_second_train_of_the_same_run_fails_and_changes_nothing(tmp_path, spec, pause_at):
    out, flag = tmp_path / "runs", tmp_path / "paused"
    first = subprocess.Popen(CLI + ["train", str(spec), "--out", str(out)], env=env(f"pause@step={pause_at}:{flag}"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = wait_for_pause(flag, first)
    (run_dir,) = out.iterdir()
    # A temp file of an atomic write in flight (as the first writer would have one): the second
    # must not sweep it as an orphan, since it never gets the lock.
    inflight = run_dir / "checkpoints" / ".step_00000020.pt.abcd.tmp"
    inflight.parent.mkdir(exist_ok=True)
    inflight.write_bytes(b"in flight")
    before = snapshot(run_dir)
    second = subprocess.run(CLI + ["train", str(spec), "--out", str(out)], env=env(), capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "another process is writing this run (lock held)" in errors[0]
    assert snapshot(run_dir) == before  # nothing removed, nothing written
    inflight.unlink()
    marker.unlink()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    same_run(eosbranch.load(run_dir), eosbranch.train(spec, tmp_path / "ref"))


def test_the_process_that_made_the_directory_but_lost_the_lock_leaves_it_to_the_winner(tmp_path, spec):
    """The race of issue 17: B makes the run directory, A takes the lock first and starts writing,
    then B's lock fails. B must not remove the directory it made (A is training into it)."""
    out = tmp_path / "runs"
    fb, fa = tmp_path / "b", tmp_path / "a"
    b = subprocess.Popen(CLI + ["train", str(spec), "--out", str(out)], env=env(f"pause@lock=0:{fb}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mb = wait_for_pause(fb, b)  # B made the directory; no lock yet
    (run_dir,) = out.iterdir()
    a = subprocess.Popen(CLI + ["train", str(spec), "--out", str(out)], env=env(f"pause@step=0:{fa}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ma = wait_for_pause(fa, a)  # A holds the lock, wrote spec.yaml and lineage.json, step 0 not saved
    before = snapshot(run_dir)
    assert {"spec.yaml", "lineage.json"} <= {str(p) for p in before}
    mb.unlink()
    _, err = b.communicate(timeout=600)
    assert b.returncode == 2 and "another process is writing this run (lock held)" in err, err
    assert snapshot(run_dir) == before
    ma.unlink()
    _, err = a.communicate(timeout=600)
    assert a.returncode == 0, err
    same_run(eosbranch.load(run_dir), eosbranch.train(spec, tmp_path / "ref"))


def test_a_second_fork_into_a_branch_being_started_fails_and_changes_nothing(tmp_path, spec):
    parent = eosbranch.train(spec, tmp_path / "runs")
    flag = tmp_path / "paused"
    cmd = CLI + ["fork", "--run", str(parent.path), "--at", "step", "15", "--branches", "exit_eos", "--steps", "5"]
    # Paused in the replay from checkpoint 10 to the fork step: the branch has no checkpoint yet,
    # the state in which a failed fork removes its directory.
    first = subprocess.Popen(cmd, env=env(f"pause@step=12:{flag}"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    marker = wait_for_pause(flag, first)
    (branch,) = [p for p in parent.path.parent.iterdir() if "--" in p.name]
    before = snapshot(branch)
    second = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 2 and "another process is writing this run (lock held)" in second.stderr
    assert branch.is_dir() and snapshot(branch) == before
    marker.unlink()
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert eosbranch.load(branch).complete
