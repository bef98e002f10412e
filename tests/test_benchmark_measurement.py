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
    for label in ("losses", "sharpness", "probes", "alignment", "total", "warm mv", "join mv", "cold mv",
                  "warm/cold", "join/cold", "loss ratio", "chosen/cold", "v0 residual", "angle bound", "true sin", "cos2 bound", "true cos2 err"):
        assert label in out, label
    for n, states in results.items():
        assert set(states) == {"eos", "catapult", "peak"}
        for state, r in states.items():
            for key, _ in measurement.FIELDS:
                assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (n, state, key, r[key])
            assert r["warm_mv"] >= 1 and r["cold_mv"] >= 1 and r["join_mv"] >= 1 and r["gradient_s"] > 0
            assert r["chosen"] == ("cold" if r["loss_ratio"] > 2 else "warm")
            assert 0 <= r["v1_angle_bound"] <= 1 and r["true_sin"] <= r["v1_angle_bound"]
            assert set(r["acc"]) == set(measurement.TOLS)
