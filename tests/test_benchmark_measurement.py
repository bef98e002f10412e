"""benchmarks/measurement.py cannot rot: its --small run prints every field of its table, for
every state, with finite numbers (timing values themselves are not checked)."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow  # about ten seconds on 2 CPU cores
def test_measurement_benchmark_small_prints_every_field(capsys):
    import measurement  # benchmarks/measurement.py

    results = measurement.main(["--small"])
    out = capsys.readouterr().out
    for label in ("losses", "sharpness", "probes", "alignment", "total", "warm mv", "path mv", "join mv", "cold mv",
                  "warm/cold", "path/cold", "join/cold", "loss ratio", "chosen/cold", "v0 residual", "angle bound",
                  "true sin", "cos2 bound", "true cos2 err", "[phase 1]", "[phase 2]", "[phase] total: median"):
        assert label in out, label
    for n, states in results.items():
        assert set(states) == {"eos", "catapult", "peak", "phase"}
        phase = states.pop("phase")
        assert len(phase) == 2
        for row in phase:  # each EoS-phase measurement, warm-started from the two before it
            assert row["mv"] >= 1 and row["plain_mv"] >= 1 and row["start"] == "warm"
            assert row["converged"] and row["residual"] <= 1e-3  # tol 1e-3: a solve that stopped short fails
            for key in ("losses", "sharpness", "probes", "alignment", "small", "total"):
                assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        for state, r in states.items():
            for key, _ in measurement.FIELDS:
                assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (n, state, key, r[key])
            assert min(r["warm_mv"], r["path_mv"], r["cold_mv"], r["join_mv"]) >= 1 and r["gradient_s"] > 0
            assert r["chosen"] == ("cold" if r["loss_ratio"] > 2 else "warm")
            assert 0 <= r["v1_angle_bound"] <= 1 and r["true_sin"] <= r["v1_angle_bound"]
            assert set(r["acc"]) == set(measurement.TOLS)
