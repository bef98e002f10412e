"""benchmarks/gpu.py cannot rot: its --small run on the CPU prints every field of its table with
finite numbers (timing values themselves are not checked)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.slow  # about a minute on 2 CPU cores
def test_gpu_benchmark_small_on_cpu_prints_every_field(tmp_path):
    import gpu  # benchmarks/gpu.py

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--small",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    assert "1. pytest -m gpu:" in out and "skipped" in out  # no CUDA here: the gpu tests skip cleanly
    res = json.loads((tmp_path / "results.json").read_text())
    for model in ("mlp", "vit"):
        for key, label in gpu.FIELDS:
            assert label in out
            v = res[model][key]
            if key in gpu.MEMORY_KEYS:
                assert v is None  # CPU: no GPU memory
            else:
                assert isinstance(v, (int, float)) and math.isfinite(v), (model, key, v)
        assert res[model]["rel_diff"] < 1e-3  # float32 CPU vs float64: the same state
        assert res[model]["hvps_median"] >= 1 and res[model]["n_measurements"] == 4
    row = next(ln for ln in out.splitlines() if gpu.FIELDS[3][1] in ln)
    assert len(row.split()) >= 2 and "n/a" not in row
