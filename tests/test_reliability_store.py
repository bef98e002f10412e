"""Faults in the run store, injected for real (issue 8): damaged checkpoints and manifests, damaged
tables, a full disk, divergence, a refused shortening. Each must lose nothing valid, say what
happened in one line, and (where a resume applies) end bit-identical to an uninterrupted run."""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import shutil
import warnings

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import eosbranch
from conftest import TINY, crash_at, write_spec
from eosbranch.cli import app
from eosbranch.errors import EosbranchWarning
from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.rundir import open_run, run_dir_for

TABLES = ("metrics", "events", "examples")
KEYS = {"metrics": ["step", "t_eff", "lr", "group", "metric", "value"],
        "events": ["event", "step", "t_eff", "value", "detail"],
        "examples": ["step", "index", "group", "loss", "loss_change", "cos2_v1", "centroid_distance"]}


def table_spec() -> dict:
    """30 steps, checkpoints at 0, 10, 20, 30; every table has rows (groups, per-example rows)."""
    spec = copy.deepcopy(TINY)
    spec.update(groups="classes", measure={"every": 5, "sharpness": False, "examples": "all"},
                checkpoint={"every": 10})
    return spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return eosbranch.train(table_spec(), tmp_path_factory.mktemp("ref"))



@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A run stopped hard at step 25 (checkpoints 0, 10, 20; table rows of steps < 20)."""
    spec = parse_spec(table_spec())
    store = open_run(spec, run_dir_for(spec, tmp_path_factory.mktemp("crashed")))
    crash_at(spec, store, 25)
    return store.path


def copy_run(path, root):
    """A private copy of a run directory (same name, so the tables' ``run`` column matches)."""
    return shutil.copytree(path, root / path.name)


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def lines(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def assert_same_run(ref, run):
    a, b = ref.checkpoint()["model"], run.checkpoint()["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(ref, name)[KEYS[name]], getattr(run, name)[KEYS[name]])


def ckpt(path, step):
    return path / "checkpoints" / f"step_{step:08d}.pt"


def no_store_warnings(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EosbranchWarning)
        return fn()


# ------------------------------------------------------------------------ damaged checkpoints

def _truncate(path):
    f = ckpt(path, 20)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(path):
    f = ckpt(path, 20)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))


def _edit_manifest(path, fn):
    f = path / "checkpoints" / "manifest.json"
    m = json.loads(f.read_text())
    fn(m)
    f.write_text(json.dumps(m))


def _entry(m, step):
    return next(e for e in m["checkpoints"] if e["step"] == step)


DAMAGE = {
    # name: (inject, fragments of the one warning naming the file, falls back to step 10?)
    "truncated": (_truncate, ["step_00000020.pt", "sha256 mismatch"], True),
    "byte flipped": (_flip, ["step_00000020.pt", "sha256 mismatch"], True),
    "deleted": (lambda p: ckpt(p, 20).unlink(), ["step_00000020.pt", "checkpoint missing"], True),
    "manifest sha edited": (lambda p: _edit_manifest(p, lambda m: _entry(m, 20).update(sha256="0" * 64)),
                            ["step_00000020.pt", "sha256 mismatch", "edited manifest"], True),
    "manifest step edited": (lambda p: _edit_manifest(p, lambda m: _entry(m, 20).update(step=25)),
                             ["step_00000020.pt", "holds step 20, the manifest says 25"], True),
    "manifest points outside": (lambda p: _edit_manifest(p, lambda m: _entry(m, 20).update(file="../../x.pt")),
                                ["manifest.json", "not a valid manifest", "rebuilt"], False),
    "manifest missing": (lambda p: (p / "checkpoints" / "manifest.json").unlink(),
                         ["manifest.json: missing", "rebuilt it from 3 per-checkpoint entries"], False),
    "manifest garbage": (lambda p: (p / "checkpoints" / "manifest.json").write_bytes(b"\x00{]"),
                         ["manifest.json", "not a valid manifest", "rebuilt"], False),
    "manifest wrong shape": (lambda p: (p / "checkpoints" / "manifest.json").write_text('{"checkpoints": 3}'),
                             ["manifest.json", "not a valid manifest", "rebuilt"], False),
}


FAST = {"truncated", "byte flipped", "manifest sha edited", "manifest missing", "manifest points outside"}


@pytest.mark.parametrize("damage", [d if d in FAST else pytest.param(d, marks=pytest.mark.slow) for d in DAMAGE])
def test_damaged_checkpoint_or_manifest_resume_falls_back(tmp_path, reference, crashed, damage):
    inject, fragments, falls_back = DAMAGE[damage]
    path = copy_run(crashed, tmp_path)
    valid = {s: ckpt(path, s).read_bytes() for s in (0, 10)}
    inject(path)

    seen = []
    assert eosbranch.load(path).store.load_checkpoint(warn=seen.append)["step"] == (10 if falls_back else 20)
    assert len(seen) == 1 and "\n" not in seen[0] and all(f in seen[0] for f in fragments), seen

    res = cli("train", "--resume", path)
    assert res.exit_code == 0, res.output
    warned = lines(res.stderr, "warning:")
    assert any(all(f in w for f in fragments) for w in warned), warned
    if falls_back:
        assert any("resuming from step 10" in w for w in warned), warned
    assert "Traceback" not in res.output
    assert_same_run(reference, eosbranch.load(path))
    for s, data in valid.items():  # nothing valid deleted or altered
        assert ckpt(path, s).read_bytes() == data
    # The resume re-saved the damaged checkpoint and the manifest: a fresh reader finds no damage.
    assert no_store_warnings(lambda: eosbranch.load(path).checkpoint()["step"]) == 30


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_deleted(tmp_path, crashed):
    path = copy_run(crashed, tmp_path)
    for s in (0, 10, 20):
        f = ckpt(path, s)
        f.write_bytes(f.read_bytes()[:64])
    before = {f.name: f.read_bytes() for f in (path / "checkpoints").iterdir()}
    res = cli("train", "--resume", path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = lines(res.stderr, "error:")
    assert "no valid checkpoint" in error and str(path / "checkpoints") in error
    assert {f.name: f.read_bytes() for f in (path / "checkpoints").iterdir()} == before


def test_missing_manifest_without_entries_refuses_to_restart_over_checkpoints(tmp_path, crashed):
    path = copy_run(crashed, tmp_path)
    (path / "checkpoints" / "manifest.json").unlink()
    for f in (path / "checkpoints").glob("step_*.json"):
        f.unlink()
    before = ckpt(path, 20).read_bytes()
    res = cli("train", "--resume", path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = lines(res.stderr, "error:")
    assert "manifest.json: missing" in error
    assert ckpt(path, 20).read_bytes() == before  # not overwritten by a restart from scratch


# ---------------------------------------------------------------------------- damaged tables

def _truncate_file(f, keep=0.6):
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


@pytest.mark.parametrize("damage,name", [("truncated", "metrics"), ("garbled", "examples"), ("deleted", "events")])
def test_damaged_table_of_a_complete_run_loads_and_resume_rewrites_it(tmp_path, reference, damage, name):
    run = eosbranch.load(copy_run(reference.path, tmp_path))
    original = getattr(run, name)
    f = run.path / f"{name}.parquet"
    if damage == "truncated":
        _truncate_file(f)
    elif damage == "garbled":
        data = bytearray(f.read_bytes())
        for i in range(8, len(data) - 8, 97):  # many bytes, header to footer
            data[i] ^= 0x5A
        f.write_bytes(bytes(data))
    else:
        f.unlink()

    with pytest.warns(EosbranchWarning, match=rf"{name}\.parquet: .*recovered all {len(original)} rows") as rec:
        got = getattr(eosbranch.load(run.path), name)
    assert all("\n" not in str(w.message) for w in rec)
    pd.testing.assert_frame_equal(got, original)  # a complete run loses nothing

    res = cli("train", "--resume", run.path)
    assert res.exit_code == 0, res.output
    assert any(f"{name}.parquet" in w and "rewrote it complete" in w for w in lines(res.stderr, "warning:"))
    pd.testing.assert_frame_equal(pd.read_parquet(f), original)  # the plain-Parquet contract holds
    no_store_warnings(lambda: assert_same_run(reference, eosbranch.load(run.path)))


def test_damaged_table_of_an_interrupted_run_drops_the_tail_and_resume_completes_it(tmp_path, reference, crashed):
    path = copy_run(crashed, tmp_path)
    for name in TABLES:
        _truncate_file(path / f"{name}.parquet", keep=0.3)
    for name in TABLES:
        with pytest.warns(EosbranchWarning, match=rf"{name}\.parquet: .*steps before 20 .*later rows dropped"):
            got = getattr(eosbranch.load(path), name)
        want = getattr(reference, name)
        pd.testing.assert_frame_equal(got[KEYS[name]], want[want.step < 20][KEYS[name]].reset_index(drop=True))
    res = cli("train", "--resume", path)
    assert res.exit_code == 0, res.output
    no_store_warnings(lambda: assert_same_run(reference, eosbranch.load(path)))


def test_damaged_table_and_damaged_segment_fall_back_to_an_intact_chain(tmp_path, reference, crashed):
    path = copy_run(crashed, tmp_path)
    _truncate_file(path / "metrics.parquet")
    seg = path / "checkpoints" / "step_00000020.metrics.parquet"
    seg.write_bytes(seg.read_bytes()[:-10])
    res = cli("train", "--resume", path)
    assert res.exit_code == 0, res.output
    warned = " | ".join(lines(res.stderr, "warning:"))
    assert "step_00000020.metrics.parquet: row segment fails its sha256" in warned
    assert "resuming from step 10" in warned
    no_store_warnings(lambda: assert_same_run(reference, eosbranch.load(path)))


def test_byte_flips_anywhere_in_a_table_are_never_read_silently(tmp_path, reference):
    """Flip one bit at 40 seeded positions: each read is either reported (and recovered intact)
    or, where the byte does not matter (e.g. column statistics), exactly right."""
    run = eosbranch.load(copy_run(reference.path, tmp_path))
    f = run.path / "metrics.parquet"
    pristine, original = f.read_bytes(), run.metrics
    rng = random.Random(0)
    detected = 0
    for pos in sorted(rng.sample(range(len(pristine)), 40)):
        data = bytearray(pristine)
        data[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always", EosbranchWarning)
            got = RunStore(run.path).read_table("metrics")
        pd.testing.assert_frame_equal(got, original, obj=f"flip at byte {pos}")
        detected += bool(rec)
    f.write_bytes(pristine)
    assert detected >= 15, detected  # the rest were bytes that do not change a value (statistics, padding)


# ------------------------------------------------------------------------ no space left on device

class FullDisk:
    """``os.write`` that fails with ENOSPC part-way into the ``nth`` temp file whose name starts
    with ``.{target}.`` (the store writes via temp files), as a disk filling up mid-file would."""

    def __init__(self, target: str, nth: int = 1):
        self.target, self.nth, self.seen, self.failed = target, nth, set(), None
        self.real = os.write

    def __call__(self, fd, data):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        base = os.path.basename(where)
        if base.startswith(f".{self.target}.") and base.endswith(".tmp"):
            self.seen.add(where)
            if len(self.seen) == self.nth:
                self.failed = where
                self.real(fd, bytes(data[:100]))  # some bytes land, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, data)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
@pytest.mark.parametrize("target,nth", [
    ("step_00000030.pt", 1),                 # the checkpoint file itself
    pytest.param("step_00000030.metrics.parquet", 1, marks=pytest.mark.slow),    # its row segment
    ("manifest.json", 1),                    # the commit of checkpoint 30
    pytest.param("examples.parquet", 2, marks=pytest.mark.slow),  # the table flush before checkpoint 30
    pytest.param("end_00000030.metrics.parquet", 1, marks=pytest.mark.slow),     # the end segment
])
def test_no_space_left_during_a_checkpoint_write(tmp_path, reference, crashed, monkeypatch, target, nth):
    path = copy_run(crashed, tmp_path)
    disk = FullDisk(target, nth)
    monkeypatch.setattr(os, "write", disk)
    res = cli("train", "--resume", path)
    monkeypatch.undo()
    assert disk.failed, "the fault was not injected"
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = lines(res.stderr, "error:")
    assert target in error and "no space left on device" in error, error
    assert not os.path.exists(disk.failed)
    assert [p for p in path.rglob("*") if p.name.endswith(".tmp")] == []  # temp files cleaned up
    seen = []
    newest = 30 if target.startswith("end_") else 20  # the end segment fails after checkpoint 30
    assert RunStore(path).load_checkpoint(warn=seen.append)["step"] == newest and seen == []  # valid
    assert not eosbranch.load(path).complete
    no_store_warnings(lambda: [getattr(eosbranch.load(path), n) for n in TABLES])  # tables intact
    res = cli("train", "--resume", path)  # space freed: the run completes as if never stopped
    assert res.exit_code == 0, res.output
    no_store_warnings(lambda: assert_same_run(reference, eosbranch.load(path)))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_no_space_for_the_first_checkpoint_leaves_no_run_directory(tmp_path, monkeypatch):
    spec = write_spec(tmp_path / "spec.yaml", table_spec())
    monkeypatch.setattr(os, "write", FullDisk("step_00000000.pt"))
    res = cli("train", spec, "--out", tmp_path / "runs")
    monkeypatch.undo()
    assert res.exit_code == 2 and "no space left on device" in res.stderr
    assert list((tmp_path / "runs").iterdir()) == []


# ------------------------------------------------------------------------------------ divergence

def test_divergence_stops_cleanly_keeps_the_last_good_state_and_says_where(tmp_path):
    tiny = copy.deepcopy(TINY)
    tiny.update(optimizer={"kind": "gd", "lr": 50.0}, steps=200, checkpoint={"every": 3})
    spec = write_spec(tmp_path / "spec.yaml", tiny)
    res = cli("train", spec, "--out", tmp_path / "runs")
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = lines(res.stderr, "error:")
    (path,) = (tmp_path / "runs").iterdir()  # the run is kept
    run = eosbranch.load(path)
    (row,) = run.events[run.events.event == "diverged"].itertuples()
    t = int(row.step)
    assert not torch.isfinite(torch.tensor(row.value))
    loss = run.metric("loss")
    assert loss.index.max() == t - 1 and torch.isfinite(torch.tensor(loss.values)).all()
    last = max(run.checkpoints)
    assert f"at step {t}" in error and f"Last good checkpoint: step {last}" in error and last <= t
    for s in run.checkpoints:  # every checkpoint verifies and is finite
        ck = no_store_warnings(lambda: run.checkpoint(s))
        assert ck["step"] == s and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert not run.complete
    before = {f.name: f.read_bytes() for f in (path / "checkpoints").glob("*.pt")}
    # Resuming diverges again at the same step: same message, no duplicate event, checkpoints kept.
    res = cli("train", "--resume", path)
    assert res.exit_code == 2 and lines(res.stderr, "error:") == [error]
    assert (eosbranch.load(path).events.event == "diverged").sum() == 1
    after = {f.name: f.read_bytes() for f in (path / "checkpoints").glob("*.pt")}
    assert after == before


def test_divergence_at_step_zero_keeps_the_run_and_its_event(tmp_path):
    tiny = copy.deepcopy(TINY)
    tiny["model"]["init_scale"] = 1e30
    res = cli("train", write_spec(tmp_path / "spec.yaml", tiny), "--out", tmp_path / "runs")
    assert res.exit_code == 2 and "loss became" in res.stderr and "Traceback" not in res.output
    (path,) = (tmp_path / "runs").iterdir()
    run = eosbranch.load(path)
    assert run.checkpoints == [0] and list(run.events.event) == ["diverged"] and run.events.step.iloc[0] == 0


# ------------------------------------------------------------------ a refused change leaves no trace

def test_refused_shortening_leaves_the_spec_untouched(tmp_path, reference):
    run = eosbranch.load(copy_run(reference.path, tmp_path))
    spec_yaml = (run.path / "spec.yaml").read_bytes()
    res = cli("train", "--resume", run.path, "--steps", 10)
    assert res.exit_code == 2 and "extended, not shortened" in res.stderr
    assert (run.path / "spec.yaml").read_bytes() == spec_yaml and eosbranch.load(run.path).complete


def test_a_second_writer_fails_fast_and_changes_nothing(tmp_path, reference):
    run = eosbranch.load(copy_run(reference.path, tmp_path))
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    holder = RunStore(run.path)
    holder.lock()  # another process is writing this run
    try:
        res = cli("train", "--resume", run.path, "--steps", 50)
    finally:
        holder.unlock()
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = lines(res.stderr, "error:")
    assert "another process is writing this run (lock held)" in error
    assert {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()} == before


def _can_mount_tmpfs() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + mount (root in a private mount namespace)")
def test_a_real_full_disk_tiny_tmpfs(tmp_path):
    """A real ENOSPC: train on a 1 MiB tmpfs (in a private mount namespace, gone with the process)
    that fills at the third checkpoint; then grow it and resume in the same namespace."""
    import subprocess
    import sys

    tiny = copy.deepcopy(TINY)
    tiny.update(model={"kind": "mlp", "width": 256, "depth": 2}, checkpoint={"every": 5})  # ~350 kB per checkpoint
    spec = write_spec(tmp_path / "spec.yaml", tiny)
    mnt, keep = tmp_path / "mnt", tmp_path / "kept"
    mnt.mkdir()
    cli_ = f"{sys.executable} -m eosbranch.cli"
    script = f"""
        mount -t tmpfs -o size=1m tmpfs {mnt}
        {cli_} train {spec} --out {mnt}/runs; echo "first=$?"
        ls -a {mnt}/runs/*/checkpoints | grep -c '\\.tmp$'; echo "temps"
        {cli_} train --resume {mnt}/runs/tiny-* 2>&1 | grep -c 'no space left'; echo "again"
        mount -o remount,size=64m {mnt}
        {cli_} train --resume {mnt}/runs/tiny-* > /dev/null 2>&1; echo "second=$?"
        cp -r {mnt}/runs {keep}
    """
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    out = res.stdout + res.stderr
    assert "first=2" in out and "second=0" in out, out
    (error,) = lines(res.stderr, "error:")
    assert "checkpoints/step_" in error and "no space left on device" in error
    assert "0\ntemps" in res.stdout and "Traceback" not in out
    (path,) = keep.iterdir()
    ref = eosbranch.train(tiny, tmp_path / "ref")
    no_store_warnings(lambda: assert_same_run(ref, eosbranch.load(path)))
