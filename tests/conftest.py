"""Shared fixtures: tiny specs that train in well under a second."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from eosbranch.experiment import build
from eosbranch.loop import Trainer

# Bit-exact comparisons need the same thread count in every process of a test.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "dtype": "float32",
    "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 40},
    "model": {"kind": "mlp", "width": 16, "depth": 1},
    "loss": "mse",
    "optimizer": {"kind": "gd", "lr": 0.05},
    "steps": 30,
    "measure": {"every": 10, "sharpness": False},
    "checkpoint": {"every": 10},
}


@pytest.fixture
def tiny_spec():
    """A fresh copy of a tiny spec dict (digits 3 vs 5, 80 points, a 16-wide MLP)."""
    return copy.deepcopy(TINY)


def write_spec(path, spec: dict):
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """examples/quick.yaml trained once per session (digits 3 vs 5 at the EoS; ~5 s)."""
    import eosbranch
    from eosbranch.catalog import example_path

    return eosbranch.train(example_path("quick"), tmp_path_factory.mktemp("quick"))


def fault_env(fault=None, threads: int = 2) -> dict:
    """The environment for a CLI subprocess: a pinned thread count and, if given, the named fault
    point (eosbranch.faults: EOSBRANCH_FAULT=kill@step=N, pause@..., ...) and nothing inherited."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("EOSBRANCH_FAULT", None)
    if fault:
        env["EOSBRANCH_FAULT"] = fault
    return env


def cli(*args):
    """The real CLI in-process (typer's CliRunner), arguments as strings."""
    from typer.testing import CliRunner

    from eosbranch.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(res) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback)."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    return errors[0]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: intra-op threads only add synchronisation
    there (10-100x slower on a busy machine); restored afterwards for the other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Crash(Exception):
    """A hard stop raised by the per-step callback: a crash at a chosen step, deterministically."""


def crash_at(spec, store, step: int, **trainer_options) -> None:
    """Train ``spec`` into ``store`` from step 0 and stop hard at ``step`` (no checkpoint saved
    there, rows of later steps never written), as a SIGKILL at that step would."""
    tr = Trainer(build(spec), store, **trainer_options)
    tr.start_fresh()

    def crash(trainer, losses):
        if trainer.st.step == step:
            raise Crash

    with pytest.raises(Crash):
        tr.run(spec.steps, crash)
