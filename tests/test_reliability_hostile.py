"""Hostile files and names (issue 8): crafted pickles and YAML tags that would run code, names and
symlinks that would lead writes outside the output directory. Every payload here is live (an
unsafe loader runs it; the tests show that too), and each must be refused in one line."""

from __future__ import annotations

import ast
import copy
import io
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import eosbranch
from conftest import TINY, write_spec, cli, one_error
from eosbranch.cli import app
from eosbranch.errors import SpecError
from eosbranch.fork import load_branches
from eosbranch.store import RunStore, sha256

PACKAGE = Path(eosbranch.__file__).parent


class Payload:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)




@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny finished run (checkpoints 0, 10, 20, 30)."""
    return eosbranch.train(copy.deepcopy(TINY), tmp_path_factory.mktemp("parent"))


def copy_run(run, root):
    return eosbranch.load(shutil.copytree(run.path, root / run.path.name))


def plant_checkpoint(run, step, obj):
    """Replace a checkpoint with ``obj`` and update the manifest and its entry to match, as an
    attacker who edits every file would: only weights_only loading stands in the way."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    f = run.store.checkpoint_dir / f"step_{step:08d}.pt"
    f.write_bytes(data)
    m = json.loads((run.store.checkpoint_dir / "manifest.json").read_text())
    for e in m["checkpoints"]:
        if e["step"] == step:
            e.update(sha256=sha256(data), bytes=len(data))
            (run.store.checkpoint_dir / f"step_{step:08d}.json").write_text(json.dumps(e))
    (run.store.checkpoint_dir / "manifest.json").write_text(json.dumps(m))
    return f


# ------------------------------------------------------------------------------ crafted pickles

def test_malicious_checkpoint_is_refused_everywhere_a_checkpoint_is_loaded(tmp_path, parent):
    marker = tmp_path / "pwned"
    run = copy_run(parent, tmp_path)
    good = run.checkpoint(30)
    f = plant_checkpoint(run, 30, {**good, "evil": Payload(marker)})

    with pytest.warns(UserWarning, match=r"step_00000030\.pt: cannot be loaded safely"):
        assert run.store.load_checkpoint()["step"] == 20  # eosbranch.load(run).checkpoint()
    # train --resume: falls back to step 20 and re-creates a clean step 30
    res = cli("train", "--resume", run.path, "--steps", 35)
    assert res.exit_code == 0, res.output
    assert "step_00000030.pt: cannot be loaded safely" in res.stderr
    assert eosbranch.load(run.path).checkpoint()["step"] == 35
    # fork at the planted step: falls back to the parent's step 20 and replays to 30
    other = copy_run(parent, tmp_path / "f")
    evil = plant_checkpoint(other, 30, {**good, "evil": Payload(marker)})
    plant_checkpoint(other, 20, {**other.checkpoint(20), "evil": Payload(marker)})
    res = cli("fork", "--run", other.path, "--at", "step", 25, "--branches", "exit_eos", "--steps", 3)
    assert res.exit_code == 0, res.output
    assert "step_00000020.pt: cannot be loaded safely" in res.stderr
    assert not marker.exists()
    assert f.read_bytes() != evil.read_bytes()  # the resume replaced the planted file with a clean one
    # The payload is live: an unsafe load runs it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_every_checkpoint_malicious_is_one_clear_error(tmp_path, parent):
    marker = tmp_path / "pwned"
    run = copy_run(parent, tmp_path)
    for s in run.checkpoints:
        plant_checkpoint(run, s, {"step": s, "evil": Payload(marker)})
    error = one_error(cli("train", "--resume", run.path, "--steps", 40))
    assert "no valid checkpoint" in error
    assert not marker.exists()


def _spec_with_data(tmp_path, data: dict) -> Path:
    spec = copy.deepcopy(TINY)
    spec["data"] = data
    return write_spec(tmp_path / "spec.yaml", spec)


def _assert_refused_and_no_run(tmp_path, data, fragment, marker):
    out = tmp_path / "runs"
    error = one_error(cli("train", _spec_with_data(tmp_path, data), "--out", out))
    assert fragment in error, error
    assert not marker.exists()
    assert not out.exists() or list(out.iterdir()) == []  # no partial run directory


def test_malicious_tensors_pt_is_refused(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"X": Payload(marker), "y": torch.zeros(2)}, evil)
    _assert_refused_and_no_run(tmp_path, {"kind": "tensors", "path": str(evil)}, "evil.pt: refused to load", marker)
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_malicious_tensors_npz_is_refused(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.npz"
    np.savez(evil, X=np.array([Payload(marker)], dtype=object), y=np.zeros(1))
    _assert_refused_and_no_run(tmp_path, {"kind": "tensors", "path": str(evil)}, "evil.npz: refused", marker)
    with np.load(evil, allow_pickle=True) as z:
        z["X"]
    assert marker.exists()


def test_malicious_cifar_batch_is_refused(tmp_path):
    from cifar_fixture import write_tiny_cifar

    folder = write_tiny_cifar(tmp_path / "cifar", n_per_batch=4)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Payload(marker), "labels": []}, f, protocol=2)
    data = {"kind": "cifar10", "root": str(tmp_path / "cifar"), "verify": False, "n": 4}
    _assert_refused_and_no_run(tmp_path, data, "data_batch_1: not a CIFAR-10 batch file", marker)
    with open(folder / "data_batch_1", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def _calls(tree, name):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            dotted = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                      else getattr(f, "id", None))
            if dotted == name:
                yield node


def _kw(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_loader_in_the_package_is_a_safe_one():
    """Any torch.load in eosbranch passes weights_only=True, any np.load allow_pickle=False; YAML
    only through safe_load; pickle only through the restricted unpickler. A new loader added
    without these fails here."""
    found = {"torch.load": 0, "np.load": 0, "yaml.safe_load": 0}
    for f in PACKAGE.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for call in _calls(tree, "torch.load"):
            found["torch.load"] += 1
            assert getattr(_kw(call, "weights_only"), "value", None) is True, f"{f}:{call.lineno}"
        for call in _calls(tree, "np.load"):
            found["np.load"] += 1
            assert getattr(_kw(call, "allow_pickle"), "value", None) is False, f"{f}:{call.lineno}"
        for bad in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "pickle.load",
                    "pickle.loads", "torch.jit.load", "np.fromfile"):
            assert not list(_calls(tree, bad)), f"{f}: {bad}"
        found["yaml.safe_load"] += len(list(_calls(tree, "yaml.safe_load")))
    assert found["torch.load"] >= 2 and found["np.load"] >= 1 and found["yaml.safe_load"] >= 1, found


# ------------------------------------------------------------------------------------------ YAML

TAGS = [
    "!!python/object/apply:os.system [{cmd}]",
    "!!python/object/new:os.system [{cmd}]",
    "!!python/object/apply:subprocess.check_output [[sh, -c, {cmd}]]",
    "!!python/name:os.system",
]


@pytest.mark.parametrize("tag", TAGS)
def test_yaml_tags_that_run_code_are_refused(tmp_path, tag):
    marker = tmp_path / "pwned"
    payload = tag.format(cmd=json.dumps(f"touch {marker}"))
    spec_text = yaml.safe_dump(TINY, sort_keys=False).replace("name: tiny", f"name: {payload}")
    assert payload in spec_text
    bad = tmp_path / "evil.yaml"
    bad.write_text(spec_text)
    groups = tmp_path / "evil_groups.yaml"
    groups.write_text(f"kind: class\nlabel: {payload}\n")
    via_groups = write_spec(tmp_path / "uses_groups.yaml", {**TINY, "groups": str(groups)})
    branches = tmp_path / "evil_branches.yaml"
    branches.write_text(f"name: x\ninterventions: [{{kind: lr, factor: {payload}}}]\n")

    for args, file in [(["train", bad, "--out", tmp_path / "runs"], bad),
                       (["groups", "show", bad], bad),
                       (["groups", "show", via_groups], groups)]:
        error = one_error(cli(*args))
        assert str(file) in error and "not valid YAML" in error, error
    with pytest.raises(SpecError, match="evil_branches.yaml: .*not valid YAML"):
        load_branches(str(branches))
    assert not marker.exists() and not (tmp_path / "runs").exists()
    if tag.startswith("!!python/name"):
        return  # names a function without calling it: nothing to prove live
    yaml.unsafe_load(spec_text)  # the payload is live
    assert marker.exists()


# ------------------------------------------------------------------------------------ path safety

ESCAPING = ["../x", "../../x", "/tmp/abs", "a/b", "..", ".", ".hidden", "x/../../y", "a\\b", "-rf", "x\n",
            "", "a" * 65, "~/x", "a b", "$HOME"]


@pytest.mark.parametrize("name", ESCAPING)
def test_run_names_cannot_escape_the_output_directory(tmp_path, name):
    work = tmp_path / "work"
    out = work / "runs"
    out.mkdir(parents=True)
    spec = write_spec(tmp_path / "spec.yaml", {**TINY, "name": name})
    before = sorted(p for p in tmp_path.rglob("*"))
    error = one_error(cli("train", spec, "--out", out))
    assert "name" in error, error
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created anywhere


@pytest.mark.parametrize("name", ESCAPING)
def test_branch_names_cannot_escape_the_parent_directory(tmp_path, name):
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump({"branches": [{"name": "ok"}, {"name": name}]}))
    with pytest.raises(SpecError) as info:
        load_branches(str(f))
    msg = str(info.value)
    assert "\n" not in msg and str(f) in msg and "branches[1].name" in msg, msg


def test_branch_name_escape_through_the_cli_creates_nothing(tmp_path, parent):
    run = copy_run(parent, tmp_path / "p")
    f = tmp_path / "b.yaml"
    f.write_text(yaml.safe_dump({"name": "../escaped"}))
    before = sorted(tmp_path.rglob("*"))
    error = one_error(cli("fork", "--run", run.path, "--at", "step", 15, "--branches", f, "--steps", 3))
    assert "name" in error
    assert sorted(tmp_path.rglob("*")) == before


@pytest.fixture
def planted(tmp_path):
    """--out holds the run directory this spec would use, as a symlink to a directory outside."""
    from eosbranch.spec import parse_spec
    from eosbranch.train import run_dir_for

    out, outside = tmp_path / "runs", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    link = run_dir_for(parse_spec(copy.deepcopy(TINY)), out)
    return out, outside, link


def test_a_symlinked_run_directory_pointing_outside_is_refused(tmp_path, planted):
    out, outside, link = planted
    link.symlink_to(outside)
    spec = write_spec(tmp_path / "spec.yaml", TINY)
    error = one_error(cli("train", spec, "--out", out))
    assert "is a symlink" in error and "outside" in error
    assert list(outside.iterdir()) == []
    # ... also when it points nowhere yet (writing would create the target)
    link.unlink()
    link.symlink_to(outside / "new")
    error = one_error(cli("train", spec, "--out", out))
    assert "is a symlink" in error and not (outside / "new").exists()


def test_symlinks_inside_a_run_do_not_redirect_writes(tmp_path, parent):
    run = copy_run(parent, tmp_path / "p")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    # A table symlinked to a file outside is replaced by the new table, never written through.
    (run.path / "metrics.parquet").unlink()
    (run.path / "metrics.parquet").symlink_to(victim)
    res = cli("train", "--resume", run.path, "--steps", 35)
    assert res.exit_code == 0, res.output
    assert victim.read_text() == "keep me" and not (run.path / "metrics.parquet").is_symlink()
    # The lock file planted as a symlink: refused, the target untouched.
    (run.path / ".lock").unlink()
    (run.path / ".lock").symlink_to(victim)
    error = one_error(cli("train", "--resume", run.path, "--steps", 40))
    assert ".lock: cannot open the run's lock file" in error and victim.read_text() == "keep me"
    (run.path / ".lock").unlink()
    # checkpoints/ symlinked outside: refused before anything is written.
    shutil.move(run.path / "checkpoints", outside / "checkpoints")
    (run.path / "checkpoints").symlink_to(outside / "checkpoints")
    before = sorted((outside / "checkpoints").iterdir())
    error = one_error(cli("train", "--resume", run.path, "--steps", 40))
    assert "checkpoints: is a symlink" in error
    assert sorted((outside / "checkpoints").iterdir()) == before


def test_fork_into_a_symlinked_branch_directory_is_refused(tmp_path, parent):
    run = copy_run(parent, tmp_path / "p")
    outside = tmp_path / "outside"
    outside.mkdir()
    b = load_branches("exit_eos")[0]
    link = run.path.parent / f"{run.name}--{b.name}-at15-{b.digest()}"
    link.symlink_to(outside)
    error = one_error(cli("fork", "--run", run.path, "--at", "step", 15, "--branches", "exit_eos", "--steps", 3))
    assert "is a symlink" in error and list(outside.iterdir()) == []


def test_fork_into_a_dangling_symlinked_branch_directory_is_refused(tmp_path, parent):
    run = copy_run(parent, tmp_path / "p")
    outside = tmp_path / "outside"
    outside.mkdir()
    b = load_branches("exit_eos")[0]
    link = run.path.parent / f"{run.name}--{b.name}-at15-{b.digest()}"
    link.symlink_to(outside / "new")
    error = one_error(cli("fork", "--run", run.path, "--at", "step", 15, "--branches", "exit_eos", "--steps", 3))
    assert "is a symlink" in error and not (outside / "new").exists()


# ------------------------------------------------------------ hostile sizes (issue 17, point 3)

def test_yaml_aliases_are_refused_in_one_line(tmp_path):
    from typer.testing import CliRunner
    from eosbranch.cli import app

    f = tmp_path / "bomb.yaml"
    f.write_text("name: x\na: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                 "c: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\ndata: {kind: digits}\n")
    res = CliRunner().invoke(app, ["train", str(f), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (error,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "alias *a is not allowed" in error and "line 3" in error
    assert not (tmp_path / "runs").exists()


def test_absurd_step_counts_are_refused_in_one_line(tmp_path, tiny_spec):
    from typer.testing import CliRunner
    from conftest import write_spec
    from eosbranch.cli import app

    spec = write_spec(tmp_path / "s.yaml", tiny_spec)
    for steps in ("1000000000000", str(10**30)):
        res = CliRunner().invoke(app, ["train", str(spec), "--out", str(tmp_path / "runs"), "--steps", steps])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert "steps" in res.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_an_npz_zip_bomb_is_refused_before_decompressing(tmp_path):
    import zipfile

    import numpy as np

    from eosbranch.data import _read_arrays
    from eosbranch.errors import EosbranchError

    f = tmp_path / "bomb.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, dtype=np.float64))
    header["shape"] = (2**28,)  # 2 GiB of zeros, compressed to about 2 MiB
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("X.npy", "w", force_zip64=True) as m:
            np.lib.format.write_array_header_1_0(m, header)
            block = bytes(1 << 24)
            for _ in range(2**31 // len(block)):
                m.write(block)
    with pytest.raises(EosbranchError, match=r"X.npy decompresses .* zip bomb"):
        _read_arrays(f)
