"""Forking: bit-identical null forks, interventions, replay checks, the CLI."""

import copy
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import eosbranch
from eosbranch.catalog import names
from eosbranch.cli import app
from eosbranch.errors import EosbranchError, SpecError
from eosbranch.fork import load_branches

COLS = ["step", "t_eff", "lr", "group", "metric", "value"]


def parent_spec(tiny_spec, opt):
    tiny_spec.update(optimizer=opt, steps=30, groups="classes", checkpoint={"every": 7},
                     measure={"every": 4, "sharpness": True, "examples": "all"})
    return tiny_spec


@pytest.mark.parametrize("opt", [
    {"kind": "gd", "lr": 0.05},
    {"kind": "momentum", "lr": 0.02, "beta": 0.9},
    {"kind": "adam", "lr": 0.002},
    {"kind": "sgd", "lr": 0.05, "batch_size": 16},
])
def test_null_fork_is_bit_identical_to_its_parent(tmp_path, tiny_spec, opt):
    parent = eosbranch.train(parent_spec(tiny_spec, opt), tmp_path)
    (branch,) = eosbranch.fork(parent, at=("step", 17), branches="null")  # replays 14 -> 17
    a, b = parent.checkpoint()["model"], branch.checkpoint()["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pm = parent.metrics[parent.metrics.step >= 17][COLS].reset_index(drop=True)
    pd.testing.assert_frame_equal(pm, branch.metrics[COLS].reset_index(drop=True))
    ex_cols = ["step", "index", "group", "loss", "loss_change", "cos2_v1", "centroid_distance"]
    pe = parent.examples[parent.examples.step >= 17][ex_cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(pe, branch.examples[ex_cols].reset_index(drop=True))
    # Optimizer state and data order are carried, not reset.
    pa, pb = parent.checkpoint()["optimizer"], branch.checkpoint()["optimizer"]
    assert int(pa["step"]) == int(pb["step"]) == 30
    assert parent.checkpoint()["cursor"] == branch.checkpoint()["cursor"]
    lin = branch.lineage
    assert lin["parent"] == parent.name and lin["fork_step"] == 17 and lin["branch"] == "null_branch"
    assert branch.checkpoints[0] == 17
    # The certificate says so: 0.0 over every overlapping row and the common checkpoints.
    cert = branch.events.query("event == 'certificate_null'")
    assert cert.value.tolist() == [0.0] and "parameters at steps [21, 28, 30]" in cert.detail.iloc[0]


def test_exit_branch_lowers_the_step_size_and_its_clock(tmp_path, tiny_spec):
    parent = eosbranch.train(parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), tmp_path)
    (exit_,) = eosbranch.fork(parent, at=("step", 12), branches="exit_eos", steps=10)
    m = exit_.metrics
    assert m.lr.unique().tolist() == pytest.approx([0.05 * 0.1])
    loss = m[(m.metric == "loss") & (m.group == "all")].set_index("step")
    t0 = parent.metrics.query("metric == 'loss' and step == 12").t_eff.iloc[0]
    assert loss.t_eff[12] == t0 and loss.t_eff[22] == pytest.approx(t0 + 10 * 0.005)
    assert exit_.metric("threshold").tolist() == pytest.approx([2 / 0.005] * len(exit_.metric("threshold")))
    # The branch starts from the parent's exact state: the same loss at the fork step.
    assert exit_.metric("loss")[12] == parent.metric("loss")[12]
    # A second fork with the same settings finds the finished branch.
    (again,) = eosbranch.fork(parent, at=("step", 12), branches="exit_eos", steps=10)
    assert again.path == exit_.path


def test_fork_at_onset_exit_branch_stays_below_its_threshold(quick_run):
    (eos, exit_) = eosbranch.fork(quick_run, at=("onset", 0), branches=_two_branches(), steps=100)
    t_star = int(quick_run.events.query("event == 't_star'").step.iloc[0])
    assert eos.lineage["fork_step"] == exit_.lineage["fork_step"] == t_star
    s, thr = exit_.metric("sharpness"), exit_.metric("threshold")
    assert (s < thr).all()
    # The EoS branch keeps the parent's step size and reproduces the parent's sharpness.
    ps = quick_run.metric("sharpness").loc[t_star:t_star + 100]
    assert eos.metric("sharpness").tolist() == ps.tolist()


def _two_branches():
    return {"branches": [{"name": "eos"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.1}]}]}


def test_replay_mismatch_is_detected(tmp_path, tiny_spec):
    parent = eosbranch.train(parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), tmp_path)
    m = parent.metrics
    m.loc[(m.metric == "loss") & (m.step == 17), "value"] += 1e-7  # a parent that does not match its code
    parent.store.write_table("metrics", m)
    with pytest.raises(EosbranchError, match="replay mismatch at step 17"):
        eosbranch.fork(parent, at=("step", 17), branches="null")
    # Asking again finds the stopped branch and refuses it again instead of finishing it silently.
    with pytest.raises(EosbranchError, match="replay mismatch at step 17"):
        eosbranch.fork(parent, at=("step", 17), branches="null")


@pytest.fixture(scope="module")
def prototypes_parent(tmp_path_factory):
    from conftest import TINY

    spec = parent_spec(copy.deepcopy(TINY), {"kind": "gd", "lr": 0.05})
    spec["groups"] = {"kind": "prototypes", "per_class": 2, "knn_k": 8}
    return eosbranch.train(spec, tmp_path_factory.mktemp("catalog"))


@pytest.mark.parametrize("name", names("interventions"))
def test_every_catalog_entry_loads_and_runs(prototypes_parent, name):
    (branch,) = eosbranch.fork(prototypes_parent, at=("step", 10), branches=name, steps=3)
    assert branch.complete and branch.metric("loss").index.tolist() == [10, 11, 12, 13]
    assert branch.lineage["branch_spec"] == load_branches(name)[0].model_dump()
    certificate = branch.events.query("event == 'certificate_fork_state'")
    assert certificate.value.tolist() == [0.0]


def test_bad_branch_files_name_the_field(tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\ninterventions: [{kind: lr, factr: 0.1}]\n")
    with pytest.raises(SpecError, match=r"b.yaml: interventions\[0\].factr: unknown field.*did you mean 'factor'"):
        load_branches(bad)
    bad.write_text("branches: [{name: a}, {name: a}]\n")
    with pytest.raises(SpecError, match="unique; repeated: a"):
        load_branches(bad)
    bad.write_text("name: x\ninterventions: [{kind: lr, factor: 0.1, value: 0.2}]\n")
    with pytest.raises(SpecError, match="exactly one of factor, value, stable_margin"):
        load_branches(bad)
    with pytest.raises(SpecError, match="no interventions entry named 'exit_eoss'.*did you mean 'exit_eos'"):
        load_branches("exit_eoss")


def test_cli_fork_prints_branch_dirs(tmp_path, tiny_spec, monkeypatch):
    parent = eosbranch.train(parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), tmp_path / "runs")
    monkeypatch.chdir(tmp_path)  # --run defaults to the newest run under ./runs
    res = CliRunner().invoke(app, ["fork", "--at", "step", "20", "--branches", "exit_eos", "--steps", "5"])
    assert res.exit_code == 0, res.output
    branch = eosbranch.load(Path(res.stdout.strip().splitlines()[-1]))
    assert branch.lineage["parent"] == parent.name and branch.spec.steps == 25
    res = CliRunner().invoke(app, ["fork", "--at", "later", "3", "--run", str(parent.path)])
    assert res.exit_code == 2 and "--at: expected 'onset', 'onset K', 'step N' or 'teff T'" in res.output


def test_cli_fork_defaults_to_the_newest_parent_run_and_forks_at_teff(tmp_path, tiny_spec, monkeypatch):
    """--run: the newest run under ./runs that is not itself a branch; --at teff T: the first
    step whose t_eff reaches T (GD, lr 0.05: t_eff = 0.05 s, so T = 0.61 is step 13)."""
    older = eosbranch.train(parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), tmp_path / "runs")
    newer = eosbranch.train({**parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), "seed": 1}, tmp_path / "runs")
    import os

    os.utime(older.path / "spec.yaml", (1, 1))  # whatever the clock's resolution: newer is newer
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["fork", "--run", str(older.path), "--at", "step", "20", "--steps", "2"])
    assert res.exit_code == 0, res.output  # this branch of `older` is now the newest directory
    res = CliRunner().invoke(app, ["fork", "--at", "teff", "0.61", "--branches", "null", "--steps", "2"])
    assert res.exit_code == 0, res.output
    branch = eosbranch.load(res.stdout.strip().splitlines()[-1])
    assert branch.lineage["parent"] == newer.name and branch.lineage["fork_step"] == 13
    t = newer.metrics.query("metric == 'loss' and group == 'all'").set_index("step").t_eff
    assert t[12] < 0.61 <= t[13]
    # The lineage names the branch spec and its hash (sha256 of its canonical JSON), also in the name.
    import hashlib
    import json

    spec = {"name": "null_branch", "interventions": []}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    assert branch.lineage["branch_spec"] == spec and branch.lineage["branch_hash"] == digest
    assert branch.name == f"{newer.name}--null_branch-at13-{digest}"
    res = CliRunner().invoke(app, ["fork", "--at", "teff", "99", "--branches", "null"])
    assert res.exit_code == 2 and "never reaches t_eff 99" in res.output


def test_certificates_detect_a_difference(tmp_path, tiny_spec):
    """The certificates are measurements, not assertions: doctor a null branch's rows or a branch's
    fork-state record and the value is exactly the difference, with the verdict FAIL."""
    from eosbranch.certificate import certify, null_difference

    parent = eosbranch.train(parent_spec(tiny_spec, {"kind": "gd", "lr": 0.05}), tmp_path)
    null, exit_ = eosbranch.fork(parent, at=("step", 17), branches={"branches": [
        {"name": "same"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.1}]}]}, steps=5)
    cert = certify(parent, [null, exit_]).set_index(["branch", "check"])
    assert cert.loc[("same", "null"), "value"] == 0.0 and cert.loc[("same", "null"), "verdict"] == "pass"
    assert cert.loc[("exit", "fork_state"), "value"] == 0.0 and ("exit", "null") not in cert.index

    m = null.metrics
    at = (m.metric == "loss") & (m.step == 19) & (m.group == "all")
    x = float(m.loc[at, "value"].iloc[0])
    m.loc[at, "value"] = x + 0.25
    null.store.write_table("metrics", m)
    assert null_difference(parent, null)[0] == abs((x + 0.25) - x)
    cert = certify(parent, [null]).set_index(["branch", "check"])
    assert cert.loc[("same", "null"), "value"] == abs((x + 0.25) - x) and cert.loc[("same", "null"), "verdict"] == "FAIL"

    ev = exit_.events
    at = (ev.event == "fork_state") & (ev.detail == "grad_norm/all")
    g = float(ev.loc[at, "value"].iloc[0])
    ev.loc[at, "value"] = g + 1e-3
    exit_.store.write_table("events", ev)
    cert = certify(parent, [exit_]).set_index(["branch", "check"])
    for b in ("same", "exit"):
        assert cert.loc[(b, "fork_state"), "value"] == (g + 1e-3) - g and cert.loc[(b, "fork_state"), "verdict"] == "FAIL"
    ev.loc[ev.event == "fork_params", "detail"] = "0" * 64  # other parameters at the fork
    exit_.store.write_table("events", ev)
    cert = certify(parent, [exit_]).set_index(["branch", "check"])
    assert cert.loc[("exit", "fork_state"), "value"] == float("inf") and "DIFFER" in cert.loc[("exit", "fork_state"), "detail"]


def test_until_tss_runs_each_branch_to_its_own_t_star_star(quick_run, tmp_path):
    """--until tss: the exit branch stops two measurements after its sharpness first reaches its
    own threshold (and stays below it before); the EoS reference runs as far in t_eff."""
    branches = tmp_path / "b.yaml"
    branches.write_text("branches:\n  - {name: eos}\n  - {name: exit_margin, interventions: [{kind: lr, stable_margin: 0.9}]}\n")
    res = CliRunner().invoke(app, ["fork", "--run", str(quick_run.path), "--at", "onset", "0",
                                   "--branches", str(branches), "--until", "tss"])
    assert res.exit_code == 0, res.output
    eos, exit_ = (eosbranch.load(p) for p in res.stdout.strip().splitlines()[-2:])
    assert "integrity certificate" in res.stderr and "certificate" not in res.stdout
    tss = exit_.events.query("event == 't_star_star'")
    assert len(tss) == 1
    every = quick_run.spec.measure.every
    t = int(tss.step.iloc[0])
    assert exit_.spec.steps == t + 2 * every and exit_.complete and max(exit_.checkpoints) == t + 2 * every
    s, thr = exit_.metric("sharpness"), exit_.metric("threshold")
    assert (s[s.index < t] < thr[thr.index < t]).all() and s[t] >= thr[t]
    end = exit_.metrics.t_eff.max()
    loss = eos.metrics.query("metric == 'loss' and group == 'all'")
    assert loss.t_eff.max() >= end - 1e-9 and loss.t_eff.iloc[-2] < end - 1e-9
    assert eos.events.query("event == 'certificate_null'").value.tolist() == [0.0]
    df = eosbranch.compare(quick_run)
    assert df[df.branch == "exit_margin"].t_star_star.between(exit_.metrics.query("step == @t - @every").t_eff.iloc[0],
                                  exit_.metrics.query("step == @t").t_eff.iloc[0]).all()


def test_teff_stops_at_the_effective_time(prototypes_parent):
    (b,) = eosbranch.fork(prototypes_parent, at=("step", 10), branches="exit_eos", teff=0.02)
    # lr 0.005 after the fork: t_eff(10) + 0.02 is reached after 4 steps (allowing for rounding).
    t0 = prototypes_parent.metrics.query("step == 10").t_eff.iloc[0]
    assert b.spec.steps == 14 and b.metrics.t_eff.max() == pytest.approx(t0 + 0.02)
    with pytest.raises(EosbranchError, match="at most one of --steps, --until, --teff"):
        eosbranch.fork(prototypes_parent, at=("step", 10), branches="exit_eos", teff=0.02, steps=3)


def test_a_fork_runs_with_its_parents_thread_count(tmp_path, tiny_spec):
    """Reductions over many points can round differently with another thread count (this spec
    does: see test_sweep); a fork pins the count the parent recorded, so the null branch still
    equals its parent bit for bit when the caller uses another count."""
    tiny_spec.update(model={"kind": "mlp", "width": 64, "depth": 1}, steps=20, checkpoint={"every": 5},
                     groups="classes", data={"kind": "digits", "classes": [3, 5]},
                     measure={"every": 4, "sharpness": True})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parent = eosbranch.train(tiny_spec, tmp_path)
        torch.set_num_threads(2)
        (b,) = eosbranch.fork(parent, at=("step", 12), branches="null")
        assert torch.get_num_threads() == 2  # restored after the fork
    finally:
        torch.set_num_threads(before)
    assert parent.lineage["threads"] == 1 and b.lineage["threads"] == 1
    assert b.events.query("event == 'certificate_null'").value.tolist() == [0.0]
