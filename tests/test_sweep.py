"""Sweeps: seeds and their forks through an executor, equal bit for bit to the runs made one by one;
failures named; re-runs redo only what is missing; compare across seeds (median and IQR)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import eosbranch
from conftest import TINY, write_spec
from eosbranch import tables
from eosbranch.cli import app
from eosbranch.compare import COLUMNS, SEED_COLUMNS, compare, summarize
from eosbranch.errors import EosbranchError
from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.sweep import Job, run_job, sweep
from eosbranch.train import run_dir_for

train_module = importlib.import_module("eosbranch.train")  # the package binds `train` to the function
runner = CliRunner()
FORK = ("step", 10)
SPEC = {**TINY, "model": {"kind": "mlp", "width": 64, "depth": 1}, "steps": 20, "measure": {"every": 10}}
# Wide enough that some recorded values are reductions whose rounding depends on the number of
# torch threads (see test_the_sweeps_thread_count_decides_the_bits; at width 64 they no longer do).
THREAD_SENSITIVE = {**SPEC, "model": {"kind": "mlp", "width": 256, "depth": 2}}


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_by_one(out: Path, seeds, threads: int = 1, spec: dict = SPEC) -> None:
    """The oracle: the same runs made with the public API, one after another, in this process."""
    with torch_threads(threads):
        for s in seeds:
            run = eosbranch.train(spec, out, seed=s)
            eosbranch.fork(run, at=FORK, branches="exit_eos", steps=10)


def same_runs(a: Path, b: Path) -> bool:
    try:
        assert_same_runs(a, b)
    except AssertionError:
        return False
    return True


def assert_same_runs(a: Path, b: Path) -> None:
    """Same run directories; final parameters and every table equal bit for bit."""
    names = sorted(p.name for p in a.iterdir() if (p / "spec.yaml").is_file())
    assert names == sorted(p.name for p in b.iterdir() if (p / "spec.yaml").is_file())
    assert any("--" in n for n in names)  # the branches are compared too
    for name in names:
        ra, rb = eosbranch.load(a / name), eosbranch.load(b / name)
        assert ra.complete and rb.complete
        assert ra.checkpoints == rb.checkpoints
        ma, mb = ra.checkpoint()["model"], rb.checkpoint()["model"]
        assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma), name
        for table in ("metrics", "events", "examples"):
            pd.testing.assert_frame_equal(getattr(ra, table), getattr(rb, table), check_exact=True)


def training_files(*dirs: Path) -> dict:
    """Modification times of what training writes (checkpoints, metrics, examples): a run that is
    trained again rewrites them. (Events are left out: fork re-certifies reused branches.)"""
    files = [f for d in dirs for f in [*sorted((d / "checkpoints").iterdir()), d / "metrics.parquet", d / "examples.parquet"]]
    assert len(files) > 6
    return {f: f.stat().st_mtime_ns for f in files}


def test_parallel_sweep_equals_runs_made_one_by_one(tmp_path):
    res = sweep(SPEC, [1, 2, 3], tmp_path / "sweep", fork=FORK, steps=10, jobs=2)
    assert res.ok, [j.describe() for j in res.jobs]
    # Three jobs on two worker processes (so one worker runs two jobs), none in this process,
    # each at the sweep's thread count.
    assert os.getpid() not in {j.pid for j in res.jobs} and len({j.pid for j in res.jobs}) <= 2
    assert res.threads == 1 and [j.threads for j in res.jobs] == [1, 1, 1]
    one_by_one(tmp_path / "serial", [1, 2, 3], threads=1)
    assert_same_runs(tmp_path / "sweep", tmp_path / "serial")
    # The manifest names every parent and its branch, relative to the sweep directory.
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [r["seed"] for r in manifest["runs"]] == [1, 2, 3] and manifest["threads"] == 1
    for r, job in zip(manifest["runs"], res.jobs):
        assert r["status"] == "done" and (tmp_path / "sweep" / r["run"]) == Path(job.run)
        assert r["branches"] == [Path(b).name for b in job.branches]
        assert r["branches"][0].startswith(f"{Path(job.run).name}--exit_eos-at10-")
        assert eosbranch.load(tmp_path / "sweep" / r["branches"][0]).lineage["parent"] == Path(job.run).name
    assert [r.spec.seed for r in res.runs] == [1, 2, 3] and len(res.branches) == 3


def test_a_failed_job_is_named_the_others_finish_and_a_rerun_redoes_only_it(tmp_path):
    out = tmp_path / "runs"
    # Seed 2's run directory already holds another spec: its job must fail, seed 1's must not.
    bad = run_dir_for(parse_spec({**TINY, "seed": 2}), out)
    bad.mkdir(parents=True)
    (bad / "spec.yaml").write_text(parse_spec({**TINY, "seed": 2, "optimizer": {"kind": "gd", "lr": 0.01}}).to_yaml())
    seen = []
    res = sweep(TINY, [1, 2], out, fork=FORK, steps=10, jobs=2, on_done=seen.append)
    assert sorted(r.seed for r in seen) == [1, 2]
    (ok,), (failed,) = [j for j in res.jobs if not j.failed], res.failed
    assert ok.seed == 1 and ok.status == "done" and eosbranch.load(ok.branches[0]).complete
    assert failed.seed == 2 and failed.stage == "train" and "exists with a different spec" in failed.error
    assert failed.describe().startswith("seed 2: train failed: ") and "\n" not in failed.describe()
    manifest = json.loads((out / "sweep.json").read_text())
    assert [(r["seed"], r["status"], r["stage"]) for r in manifest["runs"]] == [(1, "done", None), (2, "failed", "train")]

    # Fix the cause and re-run the same sweep (one by one this time): only seed 2 is computed.
    before = training_files(Path(ok.run), Path(ok.branches[0]))
    (bad / "spec.yaml").unlink()
    again = sweep(TINY, [1, 2], out, fork=FORK, steps=10, jobs=1)
    assert again.ok and [j.status for j in again.jobs] == ["reused", "done"]
    assert again.jobs[0].pid == os.getpid()  # jobs=1 runs in this process
    assert training_files(Path(ok.run), Path(ok.branches[0])) == before  # nothing of seed 1 rewritten
    assert eosbranch.load(again.jobs[1].run).complete and eosbranch.load(again.jobs[1].branches[0]).complete


def test_any_exception_fails_only_its_job_with_one_line(tmp_path, monkeypatch):
    real = train_module.train

    def flaky(spec, out, **kw):
        if spec.seed == 2:
            raise RuntimeError("boom\n  in a second line")
        return real(spec, out, **kw)

    monkeypatch.setattr(train_module, "train", flaky)
    threads = torch.get_num_threads()
    res = sweep(TINY, [1, 2, 3], tmp_path, jobs=1)
    assert [j.status for j in res.jobs] == ["done", "failed", "done"]
    assert res.failed[0].describe() == "seed 2: train failed: RuntimeError: boom in a second line"
    # A failure in the fork stage is named as such (TINY measures no sharpness: no t*, no onset).
    res = sweep(TINY, [1], tmp_path, fork=("onset", 0))
    assert res.failed[0].stage == "fork" and "no t_star event" in res.failed[0].error
    assert torch.get_num_threads() == threads  # the in-process jobs restored the caller's count


def test_fork_options_are_passed_on_only_when_given(tmp_path, monkeypatch):
    fork_module = importlib.import_module("eosbranch.fork")
    seen = []

    def fork(run, at, branches="exit_eos", steps=None, until=None, teff=None, warn=None):
        seen.append({"at": at, "branches": branches, "steps": steps, "until": until, "teff": teff})
        return []

    monkeypatch.setattr(fork_module, "fork", fork)
    for kw in ({"until": "tss"}, {"teff": 2.5}, {"steps": 7}):
        assert sweep(TINY, [1], tmp_path, fork=("onset", 0), branches="eos", **kw).ok
    assert [(d["until"], d["teff"], d["steps"]) for d in seen] == [("tss", None, None), (None, 2.5, None), (None, None, 7)]
    assert all(d["at"] == ("onset", 0) and d["branches"] == "eos" for d in seen)

    def older_fork(run, at, branches="exit_eos", steps=None, warn=None):  # before --until existed
        return []

    monkeypatch.setattr(fork_module, "fork", older_fork)
    assert sweep(TINY, [1], tmp_path, fork=FORK).ok  # works without the new options
    with pytest.raises(EosbranchError, match="until: this version of eosbranch.fork does not take it"):
        sweep(TINY, [1], tmp_path, fork=FORK, until="tss")


def test_ctrl_c_stops_the_sweep_instead_of_failing_one_job(tmp_path, monkeypatch):
    calls = []

    def interrupted(spec, out, **kw):
        calls.append(spec.seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(TINY, [1, 2], tmp_path)
    assert calls == [1]


def test_the_sweeps_thread_count_decides_the_bits(tmp_path):
    """The caller runs at 1 thread; the sweep's serial job must still run at 2 (every run records
    the count it ran with) and match one-by-one runs made at 2. No machine-dependent skip: whether
    1 and 2 threads happen to round this spec alike on this CPU does not decide what is tested."""
    one_by_one(tmp_path / "two", [1], threads=2, spec=THREAD_SENSITIVE)
    with torch_threads(1):
        res = sweep(THREAD_SENSITIVE, [1], tmp_path / "sweep", fork=FORK, steps=10, threads=2)
    assert res.ok and res.jobs[0].pid == os.getpid() and res.jobs[0].threads == 2
    runs = [p for p in (tmp_path / "sweep").iterdir() if (p / "spec.yaml").is_file()]
    assert len(runs) == 2 and all(eosbranch.load(p).lineage["threads"] == 2 for p in runs)
    assert_same_runs(tmp_path / "sweep", tmp_path / "two")


def test_the_thread_count_is_set_inside_the_job_and_restored(tmp_path):
    with torch_threads(1):
        res = run_job(Job(seed=0, spec=TINY, out=str(tmp_path), threads=2))
        assert res.threads == 2 and torch.get_num_threads() == 1
    assert res.status == "done"


def test_user_mistakes_are_caught_before_any_job_runs(tmp_path, monkeypatch):
    for kwargs, msg in [
        ({"seeds": []}, "at least one seed"),
        ({"seeds": [1, 1]}, "repeated: 1"),
        ({"seeds": [1], "steps": 5}, "only apply to forks"),
        ({"seeds": [1], "fork": ("stepp", 5)}, "kind one of step, onset, teff"),
        ({"seeds": [1], "fork": FORK, "branches": "exit_eoss"}, "exit_eos"),
        ({"seeds": [1], "executor": "rayy"}, "did you mean 'ray'"),
        ({"seeds": [1], "executor": "local", "address": "x"}, "executor.address: unknown field"),
        ({"seeds": [1], "jobs": 0}, "jobs"),
    ]:
        with pytest.raises(EosbranchError, match=msg):
            sweep(TINY, out=tmp_path, **kwargs)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(EosbranchError, match=r"pip install 'eosbranch\[ray\]'"):
        sweep(TINY, [1], tmp_path, executor="ray")
    assert not (tmp_path / "sweep.json").exists()


def test_slurm_without_slurm_says_so_before_any_job(tmp_path, monkeypatch):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'eosbranch[slurm]')")
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)  # as on a machine without Slurm
    with pytest.raises(EosbranchError, match="sbatch is not on PATH.*cluster='local'"):
        sweep(TINY, [1], tmp_path, executor="slurm")
    assert not (tmp_path / "sweep.json").exists()


def test_a_rerun_keeps_the_thread_count_the_sweep_started_with(tmp_path):
    warnings = []
    assert sweep(TINY, [1], tmp_path, threads=2, warn=warnings.append).jobs[0].threads == 2
    again = sweep(TINY, [1], tmp_path, warn=warnings.append)  # threads not given: the recorded count
    assert again.threads == 2 and again.jobs[0].threads == 2 and again.jobs[0].status == "reused"
    assert warnings == []
    other = sweep({**TINY, "name": "other"}, [1], tmp_path, warn=warnings.append)  # another sweep, same --out
    assert other.threads == 1 and len(warnings) == 1 and "replacing the manifest" in warnings[0]


# -- compare across seeds -----------------------------------------------------------------------
def test_summarize_gives_median_and_iqr_by_hand():
    df = pd.DataFrame({
        "seed": [1, 2, 3, 1, 2],
        "branch": ["exit"] * 5,
        "group": ["a", "a", "a", "b", "b"],
        "delta_at_end": [1.0, 2.0, 10.0, -1.0, -3.0],
        "delta_mean": [0.5, 1.0, 5.0, 4.0, 0.0],
    })
    s = summarize(df)
    assert list(s.columns) == ["branch", "group", "n_seeds", "delta_at_end_median", "delta_at_end_q25",
                               "delta_at_end_q75", "delta_mean_median", "delta_mean_q25", "delta_mean_q75", "effect",
                               "n_valid", "invalid_seeds", "delta_central_mean_median", "delta_central_mean_q25",
                               "delta_central_mean_q75"]
    assert (s.n_valid == s.n_seeds).all()  # a table without validity columns: every seed counts
    a, b = s.iloc[0], s.iloc[1]
    # Linear quantiles: q25 of (1, 2, 10) sits halfway between 1 and 2, q75 halfway between 2 and 10.
    assert (a.group, a.n_seeds, a.delta_at_end_median, a.delta_at_end_q25, a.delta_at_end_q75) == ("a", 3, 2.0, 1.5, 6.0)
    assert (a.delta_mean_median, a.delta_mean_q25, a.delta_mean_q75) == (1.0, 0.75, 3.0)
    assert (b.group, b.n_seeds, b.delta_at_end_median, b.delta_at_end_q25, b.delta_at_end_q75) == ("b", 2, -2.0, -2.5, -1.5)
    assert (b.delta_mean_median, b.delta_mean_q25, b.delta_mean_q75) == (2.0, 1.0, 3.0)
    assert (a.effect, b.effect) == ("learns faster at EoS", "learns slower at EoS")
    with pytest.raises(EosbranchError, match="per-seed"):
        summarize(df.drop(columns="seed"))


def hand_made_parent(root: Path, seed: int, slopes: dict, spec: dict = TINY) -> Path:
    """A parent with an `eos` and an `exit` branch forked at t_eff 0 whose per-group losses are
    straight lines over t_eff in [0, 1]: l_eos = 1 - 2t, l_exit = 1 - (2 - k)t, so Δl = k t, Δl at
    t = 1 is k and its mean over the window is k / 2."""
    parent = run_dir_for(parse_spec({**spec, "seed": seed}), root)
    t = np.linspace(0, 1, 11)
    for name, lineage in [(parent, None), (Path(f"{parent}--eos-at0-00000000"), "eos"),
                          (Path(f"{parent}--exit-at0-00000000"), "exit")]:
        store = RunStore(name)
        name.mkdir(parents=True)
        store.create(parse_spec({**spec, "seed": seed}).to_yaml(),
                     {"parent": None if lineage is None else parent.name,
                      "branch": lineage or "trunk", "fork_step": None if lineage is None else 0})
        rows = []
        for group, k in slopes.items():
            slope = 2.0 - k if lineage == "exit" else 2.0
            rows += [(i, float(ti), 0.1, group, "loss", float(1 - slope * ti)) for i, ti in enumerate(t)]
        store.write_table("metrics", tables.frame("metrics", rows, name.name, lineage or "trunk", seed))
        store.mark_complete(parse_spec({**spec, "seed": seed}).steps)  # finished (compare refuses others)
    return parent


def test_compare_across_two_seeds_on_hand_made_runs(tmp_path):
    p1 = hand_made_parent(tmp_path, 1, {"all": 0.5, "a": 1.0, "b": -2.0})
    p2 = hand_made_parent(tmp_path, 2, {"all": 0.5, "a": 3.0, "b": -4.0})
    df = compare([p1, p2], grid=101)
    assert list(df.columns) == SEED_COLUMNS == ["seed", *COLUMNS]
    assert list(df.seed) == [1, 1, 1, 2, 2, 2] and set(df.branch) == {"exit"}
    got = df.set_index(["seed", "group"])
    for seed, k in [(1, 1.0), (2, 3.0)]:
        assert got.loc[(seed, "a"), "delta_at_end"] == pytest.approx(k)
        assert got.loc[(seed, "a"), "delta_mean"] == pytest.approx(k / 2)
    # The hand-made runs record no sharpness: no t**, no reference measurements, so no valid window;
    # the summary says so, and with valid_only=False gives the plain arithmetic across both seeds.
    assert not df.valid.any() and df.invalid_reason.str.contains("t\\*\\* not reached").all()
    strict = summarize(df)
    assert (strict.n_valid == 0).all() and (strict.effect == "no valid window").all()
    assert (strict.invalid_seeds == "1,2").all() and strict.delta_mean_median.isna().all()
    s = summarize(df, valid_only=False).set_index("group")
    assert s.loc["a", ["delta_at_end_median", "delta_at_end_q25", "delta_at_end_q75"]].tolist() == pytest.approx([2, 1.5, 2.5])
    assert s.loc["b", ["delta_at_end_median", "delta_at_end_q25", "delta_at_end_q75"]].tolist() == pytest.approx([-3, -3.5, -2.5])
    assert s.loc["b", ["delta_mean_median", "delta_mean_q25", "delta_mean_q75"]].tolist() == pytest.approx([-1.5, -1.75, -1.25])
    assert (s.n_seeds == 2).all() and s.loc["a", "effect"] == "learns faster at EoS"
    saved = pd.read_parquet(tmp_path / "comparison_seeds.parquet")
    pd.testing.assert_frame_equal(saved, df)
    # One run still gives the frozen single-run table.
    assert list(compare(p1).columns) == COLUMNS

    res = runner.invoke(app, ["compare", str(p1), str(p2)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "comparison_seeds.parquet")
    row_a = next(line for line in res.output.splitlines() if "│ a " in line)
    assert re.search(r"0/2 .*no valid window", row_a), row_a
    assert res.output.count("invalid window") >= 2  # one warning line per seed's window

    with pytest.raises(EosbranchError, match="more than once"):
        compare([p1, p1])
    other = hand_made_parent(tmp_path / "other", 3, {"a": 1.0}, spec={**TINY, "model": {"kind": "mlp", "width": 8}})
    with pytest.raises(EosbranchError, match="differs .* in model"):
        compare([p1, other])
    res = runner.invoke(app, ["compare", str(p1), str(other)])
    assert res.exit_code == 2 and "differs" in res.output and "Traceback" not in res.output


# -- the command line ---------------------------------------------------------------------------
def test_cli_sweep_then_compare_the_sweep(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", TINY)
    out = tmp_path / "runs"
    res = runner.invoke(app, ["sweep", str(spec), "--seeds", "1,2", "--fork", "step 10", "--steps", "10",
                              "--jobs", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()[-2:]
    assert [eosbranch.load(p).spec.seed for p in lines] == [1, 2]
    assert "seed 1" in res.output and "done" in res.output
    res = runner.invoke(app, ["compare", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out / "comparison_seeds.parquet")
    df = pd.read_parquet(out / "comparison_seeds.parquet")
    assert list(df.columns) == SEED_COLUMNS and sorted(set(df.seed)) == [1, 2] and set(df.branch) == {"exit_eos"}
    # Each seed's rows are that parent's own comparison, which `compare RUN` still gives alone.
    for seed, line in zip([1, 2], lines):
        mine = df[df.seed == seed].drop(columns="seed").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, pd.read_parquet(Path(line) / "comparison.parquet"))
        one = runner.invoke(app, ["compare", line])
        assert one.exit_code == 0, one.output
        assert one.stdout.strip().splitlines()[-1] == str(Path(line) / "comparison.parquet")
        assert list(pd.read_parquet(Path(line) / "comparison.parquet").columns) == COLUMNS


def test_cli_sweep_failure_exits_2_naming_the_job(tmp_path):
    spec = write_spec(tmp_path / "s.yaml", TINY)
    out = tmp_path / "runs"
    bad = run_dir_for(parse_spec({**TINY, "seed": 4}), out)
    bad.mkdir(parents=True)
    (bad / "spec.yaml").write_text(parse_spec({**TINY, "seed": 4, "steps": 5, "name": "other"}).to_yaml())
    res = runner.invoke(app, ["sweep", str(spec), "--seeds", "3,4", "--out", str(out)])
    assert res.exit_code == 2
    assert "seed 4: train failed:" in res.output and "1 of 2 jobs failed" in res.output
    assert res.stdout.strip().splitlines()[-1].endswith(run_dir_for(parse_spec({**TINY, "seed": 3}), out).name)
    for args, msg in [(["--fork", "stepp 5"], "--fork: expected"), (["--fork", "onset x"], "--fork: expected"),
                      (["--seeds", "1,a"], "--seeds"), (["--executor", "slurmm"], "did you mean 'slurm'"),
                      (["--address", "auto"], "unknown field")]:
        argv = ["sweep", str(spec), "--out", str(out)] + (args if "--seeds" in args else ["--seeds", "3"] + args)
        res = runner.invoke(app, argv)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)


# -- other executors (slow: they start a Ray instance / submitit subprocesses) --------------------
@pytest.mark.slow
def test_ray_executor_equals_runs_made_one_by_one(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'eosbranch[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 * 2**20)
    try:
        res = sweep(SPEC, [1, 2], tmp_path / "sweep", fork=FORK, steps=10, jobs=2, executor="ray")
        assert ray.is_initialized()  # the sweep did not shut down an instance it did not start
    finally:
        ray.shutdown()
    assert res.ok, [j.describe() for j in res.jobs]
    assert os.getpid() not in {j.pid for j in res.jobs} and [j.threads for j in res.jobs] == [1, 1]
    one_by_one(tmp_path / "serial", [1, 2])
    assert_same_runs(tmp_path / "sweep", tmp_path / "serial")


@pytest.mark.slow
def test_submitit_local_executor_equals_runs_made_one_by_one(tmp_path):
    pytest.importorskip("submitit", reason="submitit is not installed (pip install 'eosbranch[slurm]')")
    res = sweep(SPEC, [1, 2], tmp_path / "sweep", fork=FORK, steps=10, jobs=2, executor="slurm",
                cluster="local", folder=str(tmp_path / "submitit"), poll_seconds=0.2)
    assert res.ok, [j.describe() for j in res.jobs]
    assert os.getpid() not in {j.pid for j in res.jobs}
    assert any((tmp_path / "submitit").rglob("*_log.out"))  # it really went through submitit
    one_by_one(tmp_path / "serial", [1, 2])
    assert_same_runs(tmp_path / "sweep", tmp_path / "serial")
