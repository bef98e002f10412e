"""Fault-injection table for issue 17's closing note: fault class -> trials -> outcomes.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/faults.py [--trials 20] [--races 20]

On a tiny spec (digits 3 vs 5, 80 points, a 16-wide MLP, 40 steps: seconds per process):

- train / fork --until tss / sweep killed (SIGKILL) at seeded named points (eosbranch/faults.py;
  a sweep is killed from outside while its workers are paused at a seeded step), then the same
  command re-run (train: --resume): bit-identical to an uninterrupted reference in every
  checkpoint tensor and every table row? Processes of a killed sweep left alive (orphans)?
- two `train` processes into one --out, started <= 20 ms apart: one intact run and one clean
  lock error?
- the damage matrix: spec.yaml, lineage.json, a checkpoint, metrics.parquet of a branch, each
  bit-flipped / truncated / garbage / deleted, across load/runs/resume/fork/compare/report: exit 0
  (intact or recovered data) or a one-line error (exit 2), never a traceback;
- every hostile size refused in one line with nothing left in --out.

Kills and races use real processes (python -m eosbranch.cli); the damage matrix and the hostile
sizes run the CLI in-process (typer's CliRunner) to keep the whole script to minutes.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch
import yaml

import eosbranch

CLI = [sys.executable, "-m", "eosbranch.cli"]
TINY = {
    "name": "tiny", "seed": 0, "device": "cpu", "dtype": "float32",
    "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 40},
    "model": {"kind": "mlp", "width": 16, "depth": 1}, "loss": "mse",
    "optimizer": {"kind": "gd", "lr": 0.05}, "steps": 40,
    "measure": {"every": 5, "sharpness": True}, "checkpoint": {"every": 10},
}
FORK = ["--at", "step", "20", "--branches", "enter_eos", "--until", "tss"]


def env(fault=None):
    e = {**os.environ, "OMP_NUM_THREADS": "1"}
    e.pop("EOSBRANCH_FAULT", None)
    if fault:
        e["EOSBRANCH_FAULT"] = fault
    return e


def run(args, fault=None):
    return subprocess.run(CLI + [str(a) for a in args], env=env(fault), capture_output=True, text=True)


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return a == b


def identical(ref: Path, got: Path) -> bool:
    r, g = eosbranch.load(ref), eosbranch.load(got)
    if not (g.complete and r.checkpoints == g.checkpoints):
        return False
    if not all(same(r.checkpoint(s), g.checkpoint(s)) for s in r.checkpoints):
        return False
    return all(getattr(r, t).equals(getattr(g, t)) for t in ("metrics", "events", "examples"))


def one_line(p) -> bool:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:")


def only(d: Path, prefix="") -> Path:
    (x,) = [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and "--" not in p.name
            and p.name.startswith(prefix)]
    return x


# ------------------------------------------------------------------------------------- kills

def kills_train(root: Path, trials: int, spec: Path, ref: Path) -> Counter:
    out = Counter()
    for i in range(trials):
        step = random.Random(i).randrange(1, TINY["steps"])
        d = root / f"train{i}"
        killed = run(["train", spec, "--out", d], fault=f"kill@step={step}")
        if killed.returncode != -signal.SIGKILL:
            out[f"not killed (rc {killed.returncode})"] += 1
            continue
        res = run(["train", "--resume", only(d)])
        out["bit-identical" if res.returncode == 0 and identical(ref, only(d)) else "DIFFERS/FAILED"] += 1
    return out


def kills_fork(root: Path, trials: int, parent: Path, ref_branch: Path) -> Counter:
    out = Counter()
    last = eosbranch.load(ref_branch).spec.steps
    measured = list(range(25, last + 1, 5))
    for i in range(trials):
        rng = random.Random(1000 + i)
        point = rng.choice(["step", "measured", "stopping"])
        at = last if point == "stopping" else rng.choice(measured if point == "measured" else range(21, last))
        p = shutil.copytree(parent, root / f"fork{i}" / parent.name)
        killed = run(["fork", "--run", p, *FORK], fault=f"kill@{point}={at}")
        if killed.returncode != -signal.SIGKILL:
            out[f"not killed (rc {killed.returncode})"] += 1
            continue
        res = run(["fork", "--run", p, *FORK])
        ok = res.returncode == 0 and identical(ref_branch, p.parent / ref_branch.name)
        out["bit-identical" if ok else "DIFFERS/FAILED"] += 1
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not a running process
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def kills_sweep(root: Path, trials: int, spec: Path, ref: Path) -> tuple[Counter, int]:
    out, orphans = Counter(), 0
    args = ["sweep", spec, "--seeds", "1,2", "--jobs", "2"]
    for i in range(trials):
        step = random.Random(2000 + i).randrange(1, TINY["steps"])
        d = root / f"sweep{i}"
        d.mkdir()
        flag = d / "paused"
        proc = subprocess.Popen(CLI + [str(a) for a in args] + ["--out", str(d / "o")],
                                env=env(f"pause@step={step}:{flag}"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        markers = []
        while not markers and proc.poll() is None:
            markers = [m for m in d.glob("paused.[0-9]*") if not m.name.endswith(".part")]
            time.sleep(0.01)
        pids = [int(m.name.split(".")[-1]) for m in markers]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for _ in range(500):  # the workers die with the sweep (parent-death signal); allow them 5 s
            if not any(_alive(p) for p in pids):
                break
            time.sleep(0.01)
        orphans += sum(_alive(p) for p in pids)
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        res = run(args + ["--out", d / "o"])
        ok = res.returncode == 0 and all(identical(r, d / "o" / r.name) for r in ref.iterdir()
                                         if r.is_dir() and not r.name.startswith("."))
        out["bit-identical" if ok else "DIFFERS/FAILED"] += 1
    return out, orphans


def races(root: Path, trials: int, spec: Path, ref: Path) -> tuple[Counter, float]:
    out, worst = Counter(), 0.0
    for i in range(trials):
        d = root / f"race{i}"
        t0 = time.monotonic()
        a = subprocess.Popen(CLI + ["train", str(spec), "--out", str(d)], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        t1 = time.monotonic()
        b = subprocess.Popen(CLI + ["train", str(spec), "--out", str(d)], env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        worst = max(worst, (t1 - t0) * 1000)
        res = []
        for p in (a, b):
            _, err = p.communicate()
            res.append(subprocess.CompletedProcess(p.args, p.returncode, "", err))
        codes = sorted(r.returncode for r in res)
        lost = [r for r in res if r.returncode == 2]
        intact = identical(ref, only(d))
        if codes == [0, 2] and one_line(lost[0]) and "lock" in lost[0].stderr and intact:
            out["one run intact + one lock error"] += 1
        elif codes == [0, 0] and intact:
            out["both 0 (second reused the finished run), intact"] += 1
        else:
            out[f"OTHER codes={codes} intact={intact}"] += 1
    return out, worst


# -------------------------------------------------------------------------- damage, sizes

def damage_matrix(root: Path, family: Path) -> Counter:
    from typer.testing import CliRunner

    from eosbranch.cli import app

    parent = only(family, "tiny")
    (branch,) = [p for p in family.iterdir() if "--" in p.name]
    damages = {
        "flip": lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0x04]) + b[len(b) // 2 + 1:],
        "truncate": lambda b: b[: len(b) // 2],
        "garbage": lambda b: os.urandom(max(16, len(b) // 4)),
        "delete": None,
    }
    targets = {"spec.yaml": "spec.yaml", "lineage.json": "lineage.json",
               "checkpoint": "checkpoints/step_00000030.pt", "table": "metrics.parquet"}
    out = Counter()
    for tname, rel in targets.items():
        for dname, fn in damages.items():
            fam = shutil.copytree(family, root / f"dmg-{tname}-{dname}")
            p, b = fam / parent.name, fam / branch.name
            f = b / rel
            if fn is None:
                f.unlink()
            else:
                f.write_bytes(fn(f.read_bytes()))
            commands = {
                "load": ["__load__", b],
                "runs": ["runs", "--out", fam],
                "resume": ["train", "--resume", b],
                "fork": ["fork", "--run", p, *FORK],
                "compare": ["compare", p],
                "report": ["report", p, "--out", fam / "report"],
            }
            for cname, args in commands.items():
                if args[0] == "__load__":
                    try:
                        import warnings

                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            r = eosbranch.load(args[1])
                            r.metrics, r.checkpoint()
                        kind = "exit 0 (data intact or recovered)"
                    except eosbranch.errors.EosbranchError as err:
                        kind = "one-line error" if "\n" not in str(err) else "MULTI-LINE"
                    except Exception as err:  # noqa: BLE001
                        kind = f"TRACEBACK {type(err).__name__}"
                else:
                    res = CliRunner().invoke(app, [str(a) for a in args])
                    errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
                    if res.exit_code == 0:
                        kind = "exit 0 (data intact or recovered)"
                    elif res.exit_code == 2 and len(errs) == 1 and "Traceback" not in res.output:
                        kind = "one-line error"
                    else:
                        kind = f"OTHER exit {res.exit_code} {type(res.exception).__name__}"
                out[kind] += 1
    return out


HOSTILE = {
    "width 1e9": ("model", {"kind": "mlp", "width": 10**9}),
    "depth 1e6": ("model", {"kind": "mlp", "width": 16, "depth": 10**6}),
    "cnn channels 1e6": ("model", {"kind": "cnn", "channels": [10**6]}),
    "prototypes dim 1e9": ("data", {"kind": "prototypes", "dim": 10**9}),
    "prototypes n 1e9": ("data", {"kind": "prototypes", "n_per_class": 10**9}),
    "chebyshev n 1e9": ("data", {"kind": "chebyshev", "n": 10**9}),
    "linear_opposing n 1e9": ("data", {"kind": "linear_opposing", "n": 10**9}),
    "lr 1e308": ("optimizer", {"kind": "gd", "lr": 1e308}),
    "steps 1e12": ("steps", 10**12),
    "mlp 1e6 wide x3 (estimate)": ("model", {"kind": "mlp", "width": 10**6, "depth": 3}),
}


def hostile(root: Path) -> Counter:
    from typer.testing import CliRunner

    from eosbranch.cli import app

    out = Counter()
    for i, (name, (key, value)) in enumerate(HOSTILE.items()):
        s = copy.deepcopy(TINY)
        s[key] = value
        f = root / f"hostile{i}.yaml"
        f.write_text(yaml.safe_dump(s))
        o = root / f"hostile{i}"
        res = CliRunner().invoke(app, ["train", str(f), "--out", str(o)])
        errs = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        ok = res.exit_code == 2 and len(errs) == 1 and str(f) in errs[0] and not o.exists()
        out["refused in one line, nothing left" if ok else f"NOT REFUSED: {name}"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="seeded kills per command (train, fork, sweep)")
    ap.add_argument("--races", type=int, default=20, help="two-writer races")
    a = ap.parse_args()
    t0 = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eosbranch-faults-") as tmp:
        root = Path(tmp)
        spec = root / "tiny.yaml"
        spec.write_text(yaml.safe_dump(TINY))
        ref = root / "ref"
        assert run(["train", spec, "--out", ref]).returncode == 0
        ref_run = only(ref)
        fam = root / "family"
        shutil.copytree(ref, fam)
        assert run(["fork", "--run", only(fam), *FORK]).returncode == 0
        ref_branch = [p for p in fam.iterdir() if "--" in p.name][0]
        rows.append(("SIGKILL of train, seeded step; train --resume", a.trials,
                     kills_train(root, a.trials, spec, ref_run)))
        rows.append(("SIGKILL of fork --until tss, seeded step/measured/stopping; same fork", a.trials,
                     kills_fork(root, a.trials, ref_run, ref_branch)))
        sref = root / "sref"
        assert run(["sweep", spec, "--seeds", "1,2", "--jobs", "2", "--out", sref]).returncode == 0
        c, orphans = kills_sweep(root, a.trials, spec, sref)
        rows.append(("SIGKILL of sweep --jobs 2 (workers paused at a seeded step); same sweep", a.trials, c))
        rows.append(("processes of the killed sweeps alive after it (orphans)", a.trials,
                     Counter({f"{orphans} orphans": a.trials})))
        c, gap = races(root, a.races, spec, ref_run)
        rows.append((f"two train writers into one --out (started <= {gap:.0f} ms apart)", a.races, c))
        d = damage_matrix(root, fam)
        rows.append(("damage 4 files x 4 kinds x 6 commands (load/runs/resume/fork/compare/report)",
                     sum(d.values()), d))
        h = hostile(root)
        rows.append(("hostile sizes (issue's values, steps 1e12, one over the estimate)", sum(h.values()), h))
    w = max(len(r[0]) for r in rows)
    print(f"{'fault class':<{w}}  trials  outcomes")
    for name, n, c in rows:
        print(f"{name:<{w}}  {n:>6}  " + "; ".join(f"{k}: {v}" for k, v in sorted(c.items())))
    print(f"({time.monotonic() - t0:.0f} s wall, {torch.get_num_threads()} torch threads, OMP_NUM_THREADS=1)")


if __name__ == "__main__":
    main()
