"""spec.yaml and lineage.json under the integrity net (issue 17, point 2): RUN/record.json holds
their sha256 and text. Every damage (bit flip, truncation, garbage, deletion, a hand edit) of
either file, of a trunk or of a branch, across load/runs/train --resume/fork/compare/report, gives
one line naming the file (and what differs), never a traceback, never silent use."""

from __future__ import annotations

import shutil

import pytest
import yaml
from typer.testing import CliRunner

import eosbranch
from eosbranch.cli import app
from eosbranch.errors import EosbranchError

runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from conftest import TINY
    import copy

    spec = copy.deepcopy(TINY)
    spec.update(steps=20, groups="classes", measure={"every": 5, "sharpness": False})
    root = tmp_path_factory.mktemp("family")
    parent = eosbranch.train(spec, root / "runs")
    (branch,) = eosbranch.fork(parent, at=("step", 10), branches="exit_eos", steps=5)
    return parent.path, branch.path


def flip(b: bytes) -> bytes:
    i = len(b) // 2
    return b[:i] + bytes([b[i] ^ 0x04]) + b[i + 1:]


def edit(name, b: bytes) -> bytes:
    if name == "spec.yaml":
        d = yaml.safe_load(b)
        d["optimizer"]["lr"] = 0.5
        return yaml.safe_dump(d, sort_keys=False).encode()
    import json

    d = json.loads(b)
    d["branch"] = "trunk"
    d["parent"] = None
    d["fork_step"] = None
    return json.dumps(d).encode()


DAMAGES = {
    "flip": lambda name, b: flip(b),
    "truncate": lambda name, b: b[: len(b) // 3],
    "garbage": lambda name, b: b"\x00\xff garbage {[",
    "delete": None,
    "edit": edit,
}
COMMANDS = ["load", "runs", "resume", "fork", "compare", "report"]


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("target", ["trunk/spec.yaml", "trunk/lineage.json", "branch/spec.yaml", "branch/lineage.json"])
def test_every_damage_of_spec_and_lineage_is_one_line_naming_the_file(tmp_path, family, target, damage):
    which, name = target.split("/")
    out = tmp_path / "runs"
    out.mkdir()
    parent, branch = (shutil.copytree(p, out / p.name) for p in family)
    victim = (parent if which == "trunk" else branch) / name
    if DAMAGES[damage] is None:
        victim.unlink()
    else:
        victim.write_bytes(DAMAGES[damage](name, victim.read_bytes()))
    reads_victim = {"load": which == "trunk", "resume": which == "trunk", "fork": which == "trunk"}
    for cmd in COMMANDS:
        if cmd == "load":
            if which == "trunk" or True:
                with pytest.raises(EosbranchError) as e:
                    r = eosbranch.load(victim.parent)
                    r.spec, r.lineage  # noqa: B018 - reading them is the test
                assert name in str(e.value) and "\n" not in str(e.value)
            continue
        args = {"runs": ["runs", "--out", str(out)],
                "resume": ["train", "--resume", str(victim.parent)],
                "fork": ["fork", "--run", str(victim.parent), "--at", "step", "10", "--branches", "exit_eos",
                         "--steps", "5"],
                "compare": ["compare", str(parent)],
                "report": ["report", str(parent)]}[cmd]
        res = runner.invoke(app, args)
        assert res.exception is None or isinstance(res.exception, SystemExit), (cmd, res.output)
        assert "Traceback" not in res.output, (cmd, res.output)
        said = [ln for ln in res.stderr.splitlines() if str(victim) in ln or victim.name in ln]
        if cmd == "runs":
            assert res.exit_code == 0 and "damaged" in res.stdout and said, (cmd, res.output)
            continue
        if cmd == "fork" and which == "branch":  # forking the parent again reuses the damaged branch
            pass
        assert res.exit_code == 2, (cmd, target, damage, res.output)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and name in errors[0], (cmd, target, damage, res.stderr)
    del reads_victim


def test_an_edit_is_reported_field_by_field(tmp_path, family):
    run = shutil.copytree(family[0], tmp_path / family[0].name)
    f = run / "spec.yaml"
    f.write_bytes(edit("spec.yaml", f.read_bytes()))
    with pytest.raises(EosbranchError, match=r"spec.yaml: edited or damaged.*optimizer.lr: recorded 0.05, now 0.5"):
        eosbranch.load(run).spec


def test_a_deliberate_change_through_the_cli_is_recorded(tmp_path, family):
    run = shutil.copytree(family[0], tmp_path / family[0].name)
    res = runner.invoke(app, ["train", "--resume", str(run), "--steps", "25"])
    assert res.exit_code == 0, res.output
    assert eosbranch.load(run).spec.steps == 25 and eosbranch.load(run).complete


def test_a_deleted_spec_is_listed_by_runs(tmp_path, family):
    out = tmp_path / "runs"
    run = shutil.copytree(family[0], out / family[0].name)
    (run / "spec.yaml").unlink()
    res = runner.invoke(app, ["runs", "--out", str(out)])
    assert res.exit_code == 0 and run.name in res.stdout and "damaged" in res.stdout
    assert "spec.yaml: missing" in res.stderr


def test_a_missing_final_checkpoint_of_a_finished_run_is_rebuilt_by_resume(tmp_path, family):
    import torch

    run = shutil.copytree(family[0], tmp_path / family[0].name)
    ref = eosbranch.load(family[0]).checkpoint()
    (run / "checkpoints" / "step_00000020.pt").unlink()
    res = runner.invoke(app, ["train", "--resume", str(run)])
    assert res.exit_code == 0, res.output
    assert "final checkpoint (step 20) is missing or damaged; rebuilding it" in res.stderr
    got = eosbranch.load(run)
    assert got.complete and got.checkpoint()["step"] == 20
    assert all(torch.equal(ref["model"][k], got.checkpoint()["model"][k]) for k in ref["model"])


def test_repairs_keep_certificate_rows(tmp_path):
    """Point 9: a branch's events.parquet deleted, then read (rebuilt from the segments) and
    repaired by train --resume: its certificate_* rows, written after the branch ended, survive
    (the end segment is rewritten with them)."""
    import copy
    import warnings

    import pandas as pd
    from conftest import TINY

    spec = copy.deepcopy(TINY)
    spec.update(steps=20, groups="classes", measure={"every": 5, "sharpness": False})
    parent = eosbranch.train(spec, tmp_path / "runs")
    (branch,) = eosbranch.fork(parent, at=("step", 10), branches="eos", steps=5)
    ev = branch.events
    certs = ev[ev.event.str.startswith("certificate")].reset_index(drop=True)
    assert set(certs.event) == {"certificate_null", "certificate_fork_state"}
    events = branch.path / "events.parquet"
    events.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read = eosbranch.load(branch.path).events  # rebuilt from the segments in memory
    pd.testing.assert_frame_equal(read[read.event.str.startswith("certificate")].reset_index(drop=True), certs)
    res = runner.invoke(app, ["train", "--resume", str(branch.path)])
    assert res.exit_code == 0, res.output
    assert events.exists()
    got = eosbranch.load(branch.path).events
    pd.testing.assert_frame_equal(got.reset_index(drop=True), ev.reset_index(drop=True))
    # a second certification (a re-run fork) replaces the rows, in the table and in the segment
    (again,) = eosbranch.fork(parent, at=("step", 10), branches="eos", steps=5)
    events.unlink()
    assert runner.invoke(app, ["train", "--resume", str(branch.path)]).exit_code == 0
    pd.testing.assert_frame_equal(eosbranch.load(branch.path).events.reset_index(drop=True),
                                  ev.reset_index(drop=True))
