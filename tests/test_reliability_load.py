"""Load: a sweep of 16 small runs on 2 jobs ends with every run intact and equal to serial runs,
while `eosbranch runs` keeps listing the store correctly as the runs are being written."""

import copy
import threading

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import eosbranch
from eosbranch import atomic_file
from eosbranch.cli import app
from eosbranch.sweep import sweep

SEEDS = list(range(16))


def _spec():
    from conftest import TINY

    spec = copy.deepcopy(TINY)
    spec.update(steps=40, checkpoint={"every": 10}, measure={"every": 10, "sharpness": True})
    return spec


def _listing(out):
    res = CliRunner().invoke(app, ["runs", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if "tiny-s" in line]
    return res.stdout + res.stderr, rows


def test_sixteen_runs_on_two_jobs_are_intact_and_equal_serial_runs(tmp_path):
    out = tmp_path / "sweep"
    listings, failures, stop = [], [], threading.Event()

    def watch():  # the index, read again and again while the workers write
        while not stop.is_set():
            try:
                listings.append(_listing(out) if out.exists() else ("", []))
            except BaseException as err:  # noqa: BLE001 - reported below, in the test's thread
                failures.append(err)
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = sweep(_spec(), SEEDS, out, jobs=2, threads=1)
    finally:
        stop.set()
        watcher.join()
    assert res.ok, [j.describe() for j in res.jobs]
    assert not failures, failures[0]
    assert len(listings) > 3
    for text, rows in listings:
        # Every listed run is a whole row: a name, its progress "k/40" with 0 <= k <= 40.
        for row in rows:
            cells = [c.strip() for c in row.split("│") if c.strip()]
            assert len(cells) == 6, (row, text)
            done, total = cells[4].split("/")
            assert total == "40" and 0 <= int(done) <= 40, row
    final_text, final_rows = _listing(out)
    assert len(final_rows) == 16 and all("40/40" in r and "yes" in r for r in final_rows), final_text

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = [eosbranch.train(_spec(), tmp_path / "serial", seed=s) for s in SEEDS]
    finally:
        torch.set_num_threads(previous)
    for s, ref in zip(SEEDS, serial):
        run = eosbranch.load(out / ref.name)
        assert run.complete and run.spec.seed == s
        a, b = run.checkpoint()["model"], ref.checkpoint()["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        for table in ("metrics", "events"):
            pd.testing.assert_frame_equal(getattr(run, table), getattr(ref, table), check_exact=True)


def test_the_listing_is_whole_after_every_single_write_of_train_and_fork(tmp_path, monkeypatch):
    """The race the sweep test can only catch by luck, made deterministic: `eosbranch runs` is
    taken after every file write of a train and of a fork (a run directory is listed only once its
    spec.yaml exists, so everything the listing reads must already be there)."""
    out = tmp_path / "runs"
    real, seen = atomic_file.atomic_write, []

    def write_then_list(path, data):
        real(path, data)
        seen.append((path.name, _listing(out)[1]))  # _listing asserts exit code 0

    monkeypatch.setattr(atomic_file, "atomic_write", write_then_list)
    parent = eosbranch.train(_spec(), out)
    eosbranch.fork(parent.path, at=("step", 20), branches="null", steps=10)
    names = [n for n, _ in seen]
    assert "spec.yaml" in names and "lineage.json" in names and len(seen) > 20
    # Before a directory has its spec.yaml it is not listed; from then on it always is.
    first_spec = names.index("spec.yaml")
    assert all(not rows for _, rows in seen[:first_spec]) and all(rows for _, rows in seen[first_spec:])
