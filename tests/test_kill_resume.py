"""A real subprocess killed with SIGKILL at seeded points, then resumed, ends bit-identical.

The kill lands at a named step of the training loop (``EOSBRANCH_FAULT``, see eosbranch/faults.py),
chosen by a seeded RNG, not at a wall-clock moment: the same test kills at the same place on any
machine under any load."""

import os
import random
import subprocess
import sys

import pandas as pd
import pytest
import torch

import eosbranch
from conftest import write_spec, fault_env

CLI = [sys.executable, "-m", "eosbranch.cli"]
STEPS = 300


def _spec(tiny_spec):
    tiny_spec.update(steps=STEPS, checkpoint={"every": 50}, measure={"every": 25, "sharpness": False})
    tiny_spec["data"]["n_per_class"] = 150
    tiny_spec["model"]["width"] = 64
    return tiny_spec


def _env(fault=None):
    return fault_env(fault, threads=2)


def _run_dir(out):
    dirs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
    return dirs[0] if dirs else None


def _kill_step(seed):
    """A seeded step strictly inside the run, past its first checkpoint after step 0."""
    return random.Random(seed).randrange(51, STEPS)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of the spec, in its own process."""
    from conftest import TINY
    import copy

    tmp = tmp_path_factory.mktemp("ref")
    spec = write_spec(tmp / "spec.yaml", _spec(copy.deepcopy(TINY)))
    ref = subprocess.run(CLI + ["train", str(spec), "--out", str(tmp / "ref")], env=_env(),
                         capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr
    return spec, eosbranch.load(ref.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kill_seed", [0, 1, 2])
def test_sigkill_then_resume_bit_identical(tmp_path, reference, kill_seed):
    spec, ref_run = reference
    out = tmp_path / "killed"
    k = _kill_step(kill_seed)
    proc = subprocess.run(CLI + ["train", str(spec), "--out", str(out)], env=_env(f"kill@step={k}"),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stderr  # it killed itself at step k
    run_dir = _run_dir(out)
    killed = eosbranch.load(run_dir)
    assert not killed.complete and max(killed.checkpoints) == (k - 1) // 50 * 50

    res = subprocess.run(CLI + ["train", "--resume", str(run_dir)], env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    done = eosbranch.load(run_dir)
    assert done.complete
    _assert_same_state(ref_run.checkpoint(), done.checkpoint())  # parameters, optimizer, RNGs, cursor
    cols = ["step", "t_eff", "lr", "group", "metric", "value"]
    pd.testing.assert_frame_equal(ref_run.metrics[cols], done.metrics[cols])
    assert not done.metrics.duplicated(["step", "group", "metric"]).any()
    ev = ["step", "t_eff", "event", "value", "detail"]
    pd.testing.assert_frame_equal(ref_run.events[ev], done.events[ev])


def _assert_same_state(a, b, where="checkpoint"):
    """The whole checkpoint, recursively: every tensor bit for bit, every other value equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("int_seed", [0, 1])
def test_sigint_saves_and_exits_cleanly(tmp_path, reference, int_seed):
    spec, ref_run = reference
    out = tmp_path / "runs"
    k = _kill_step(100 + int_seed)
    proc = subprocess.run(CLI + ["train", str(spec), "--out", str(out)], env=_env(f"int@step={k}"),
                          capture_output=True, text=True, timeout=900)
    stderr = proc.stderr
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "checkpoint saved" in stderr
    run = eosbranch.load(_run_dir(out))
    last = max(run.checkpoints)
    assert last == k and not run.complete  # saved at the step boundary where the signal came
    assert run.metrics.step.max() == last - 1  # rows up to the interrupt, none after
    res = subprocess.run(CLI + ["train", "--resume", str(run.path)], env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    done = eosbranch.load(run.path)
    assert done.complete
    a, b = ref_run.checkpoint()["model"], done.checkpoint()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed after Ctrl-C: bit-identical
    cols = ["step", "t_eff", "lr", "group", "metric", "value"]
    pd.testing.assert_frame_equal(ref_run.metrics[cols], done.metrics[cols])


_DIE_INSIDE_A_WRITE = """
import os, sys
import eosbranch.atomic_file as atomic_file
from eosbranch.cli import app

target = sys.argv.pop(1)
real = atomic_file.atomic_write

def dying(path, data):
    if path.name == target:  # the temp file exists, half written: then the process is gone
        path.parent.mkdir(parents=True, exist_ok=True)
        d = os.open(path.parent / f".{path.name}.killed.tmp", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(d, bytes(data)[: len(data) // 2])
        os._exit(9)
    real(path, data)

atomic_file.atomic_write = dying  # every writer of a run calls it through atomic_file
app()
"""


@pytest.mark.parametrize("target", ["step_00000020.pt", "metrics.parquet", "manifest.json"])
def test_a_process_killed_inside_a_write_leaves_no_temp_file_after_resume(tmp_path, tiny_spec, target):
    """A hard exit in the middle of an atomic write (the temp file half written, the rename not
    done): resume removes the orphaned temp file, says so, and ends equal to an uninterrupted run."""
    tiny_spec.update(steps=40, checkpoint={"every": 10})
    spec = write_spec(tmp_path / "spec.yaml", tiny_spec)
    out = tmp_path / "runs"
    died = subprocess.run([sys.executable, "-c", _DIE_INSIDE_A_WRITE, target, "train", str(spec), "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert died.returncode == 9, died.stderr
    run_dir = _run_dir(out)
    assert list(run_dir.rglob("*.tmp")), "the fault was not injected"
    res = subprocess.run(CLI + ["train", "--resume", str(run_dir)], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "temp file(s) left by an interrupted write" in res.stderr
    assert not list(run_dir.rglob("*.tmp"))
    ref = eosbranch.train(tiny_spec, tmp_path / "ref")
    got = eosbranch.load(run_dir)
    a, b = got.checkpoint()["model"], ref.checkpoint()["model"]
    assert got.complete and all(torch.equal(a[k], b[k]) for k in a)
    for table in ("metrics", "events"):
        pd.testing.assert_frame_equal(getattr(got, table).drop(columns="run"), getattr(ref, table).drop(columns="run"),
                                      check_exact=True)
