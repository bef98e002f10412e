"""The run store: sha256-verified checkpoints, safe loading, atomic tables, the write lock."""

import io
import json

import pytest
import torch

import eosbranch
from eosbranch.errors import CheckpointError, EosbranchError
from eosbranch.store import RunStore


def test_corrupt_checkpoint_is_detected_and_resume_falls_back(tmp_path, tiny_spec):
    run = eosbranch.train(tiny_spec, tmp_path / "a")
    last = run.store.checkpoint_dir / "step_00000030.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    last.write_bytes(bytes(data))
    warnings = []
    ck = run.store.load_checkpoint(warn=warnings.append)
    assert ck["step"] == 20
    assert len(warnings) == 1 and "step_00000030.pt" in warnings[0] and "sha256" in warnings[0]
    assert last.exists()  # nothing is deleted


def test_truncated_checkpoint_and_no_valid_checkpoint(tmp_path, tiny_spec):
    tiny_spec["checkpoint"] = {"every": None}
    run = eosbranch.train(tiny_spec, tmp_path)
    for step in run.checkpoints:
        f = run.store.checkpoint_dir / f"step_{step:08d}.pt"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        run.store.load_checkpoint()


def test_edited_manifest_is_reported_and_rebuilt(tmp_path, tiny_spec):
    run = eosbranch.train(tiny_spec, tmp_path)
    (run.store.checkpoint_dir / "manifest.json").write_text("{not json")
    warnings = []
    assert run.store.load_checkpoint(warn=warnings.append)["step"] == 30  # rebuilt from step_*.json
    assert len(warnings) == 1 and "manifest.json: not a valid manifest" in warnings[0]
    # Without the per-checkpoint entries there is nothing to verify the checkpoints by.
    for f in run.store.checkpoint_dir.glob("step_*.json"):
        f.unlink()
    with pytest.raises(CheckpointError, match="manifest.json: not a valid manifest.*no intact step_"):
        RunStore(run.path).load_checkpoint()


def test_malicious_pickle_is_refused(tmp_path):
    """A checkpoint whose pickle would run code is refused by weights_only loading."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    store = RunStore(tmp_path / "run")
    store.save_checkpoint(0, {"step": 0, "evil": Evil()})  # sha256 matches: only safe loading stops it
    warnings = []
    with pytest.raises(CheckpointError):
        store.load_checkpoint(warn=warnings.append)
    assert not marker.exists()
    assert "cannot be loaded safely" in warnings[0]


def test_second_writer_fails_fast(tmp_path):
    a, b = RunStore(tmp_path / "r"), RunStore(tmp_path / "r")
    a.lock()
    try:
        with pytest.raises(EosbranchError, match="another process is writing this run"):
            b.lock()
    finally:
        a.unlock()
    b.lock()
    b.unlock()


def test_atomic_writes_leave_no_temp_files(tmp_path, tiny_spec):
    run = eosbranch.train(tiny_spec, tmp_path)
    leftovers = [p for p in run.path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    manifest = json.loads((run.store.checkpoint_dir / "manifest.json").read_text())
    assert manifest["complete"] == 30 and all(len(e["sha256"]) == 64 for e in manifest["checkpoints"])
