"""A killed sweep leaves no process behind (issue 17, point 4): the workers, paused at a named
step (EOSBRANCH_FAULT), are alive when the sweep gets SIGKILL; then every one of them, and the
fork server, exits. The bound only turns a hang into a failure; nothing depends on timing."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY, write_spec


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_a_sweep_leaves_no_stray_process(tmp_path):
    spec = copy.deepcopy(TINY)
    spec.update(steps=40)
    path = write_spec(tmp_path / "spec.yaml", spec)
    flag = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EOSBRANCH_FAULT": f"pause@step=5:{flag}"}
    sweep = subprocess.Popen([sys.executable, "-m", "eosbranch.cli", "sweep", str(path), "--seeds", "1,2",
                              "--jobs", "2", "--out", str(tmp_path / "runs")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    markers = []
    while len(markers) < 2:
        markers = [m for m in tmp_path.glob("paused.[0-9]*") if not m.name.endswith(".part")]
        assert sweep.poll() is None, sweep.stderr.read()
        assert time.monotonic() < deadline, "the workers never paused"
        time.sleep(0.05)
    workers = [int(m.read_text()) for m in markers]
    helpers = [p for p in children(sweep.pid)]  # the fork server (and the pool's helpers)
    assert all(alive(p) for p in workers)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    watched = set(workers) | set(helpers)
    deadline = time.monotonic() + 120
    while any(alive(p) for p in watched):
        assert time.monotonic() < deadline, f"still alive after the sweep's SIGKILL: {[p for p in watched if alive(p)]}"
        time.sleep(0.05)
