"""Hostile sizes (issue 17, point 3): each is refused in one line (exit 2, the file and field named)
before anything is allocated or written; the memory estimate is skipped only by --no-limits."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from conftest import TINY, write_spec, cli, one_error
from eosbranch import resources
from eosbranch.spec import parse_spec

CLI = [sys.executable, "-m", "eosbranch.cli"]




def spec_with(section: str, value) -> dict:
    s = copy.deepcopy(TINY)
    s[section] = value
    return s


# (name, section, value, what the one line names): the values, then sizes inside the
# bounds that no machine here holds (refused by the estimate).
HOSTILE = [
    ("width_1e9", "model", {"kind": "mlp", "width": 10**9, "depth": 1}, "model.width"),
    ("depth_1e6", "model", {"kind": "mlp", "width": 16, "depth": 10**6}, "model.depth"),
    ("cnn_channels_1e6", "model", {"kind": "cnn", "channels": [10**6]}, "model: this run needs about"),
    ("cnn_channels_1e7", "model", {"kind": "cnn", "channels": [10**7]}, "model.channels"),
    ("prototypes_dim_1e9", "data", {"kind": "prototypes", "dim": 10**9}, "data.dim"),
    ("prototypes_n_1e9", "data", {"kind": "prototypes", "n_per_class": 10**9}, "data.n_per_class"),
    ("chebyshev_n_1e9", "data", {"kind": "chebyshev", "n": 10**9}, "data.n"),
    ("chebyshev_degree_1e9", "data", {"kind": "chebyshev", "degree": 10**9}, "data.degree"),
    ("linear_opposing_n_1e9", "data", {"kind": "linear_opposing", "n": 10**9}, "data.n"),
    ("lr_1e308", "optimizer", {"kind": "gd", "lr": 1e308}, "optimizer.lr"),
    ("mlp_1e6_wide_3_deep", "model", {"kind": "mlp", "width": 10**6, "depth": 3}, "model: this run needs about"),
    ("prototypes_dim_1e7", "data", {"kind": "prototypes", "dim": 10**7, "n_per_class": 1000},
     "data: this run needs about"),
    ("chebyshev_n_1e8", "data", {"kind": "chebyshev", "n": 10**8}, "this run needs about"),
    ("linear_opposing_n_1e8", "data", {"kind": "linear_opposing", "n": 10**8, "d1": 10**4},
     "data: this run needs about"),
]


@pytest.mark.parametrize("name,section,value,named", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_size_is_one_line_and_leaves_nothing(tmp_path, name, section, value, named):
    f = write_spec(tmp_path / f"{name}.yaml", spec_with(section, value))
    out = tmp_path / "out"
    error = one_error(cli("train", f, "--out", out))
    assert str(f) in error and named in error, error
    assert not out.exists() or not any(out.iterdir())


def test_hostile_sizes_through_the_real_cli_train_and_sweep(tmp_path):
    f = write_spec(tmp_path / "wide.yaml", spec_with("model", {"kind": "mlp", "width": 10**6, "depth": 3}))
    for args in (["train", f], ["sweep", f, "--seeds", "1,2", "--jobs", "2"]):
        out = tmp_path / args[0]
        p = subprocess.run(CLI + [str(a) for a in args] + ["--out", str(out)], capture_output=True, text=True)
        assert p.returncode == 2, p.stderr
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(f) in lines[0], p.stderr
        assert "more than this machine's" in lines[0] and "--no-limits" in lines[0]
        assert not out.exists()
    f = write_spec(tmp_path / "lr.yaml", spec_with("optimizer", {"kind": "gd", "lr": 1e308}))
    p = subprocess.run(CLI + ["train", str(f), "--out", str(tmp_path / "lr")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "optimizer.lr" in p.stderr, p.stderr
    assert not (tmp_path / "lr").exists()


def test_no_limits_skips_the_estimate_but_not_the_bounds(tmp_path, monkeypatch):
    # A machine of 64 KiB: the tiny spec (about a MiB by the estimate) does not fit.
    monkeypatch.setattr(resources, "machine_memory", lambda: 64 << 10)
    f = write_spec(tmp_path / "tiny.yaml", copy.deepcopy(TINY))
    out = tmp_path / "out"
    error = one_error(cli("train", f, "--out", out))
    assert "more than this machine's" in error and "--no-limits" in error
    assert not out.exists()
    assert one_error(cli("sweep", f, "--seeds", "1", "--out", tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()
    res = cli("train", f, "--out", out, "--no-limits")
    assert res.exit_code == 0, res.output
    res = cli("sweep", f, "--seeds", "1", "--out", tmp_path / "sw", "--no-limits")
    assert res.exit_code == 0, res.output
    # the hard bounds stay
    g = write_spec(tmp_path / "w.yaml", spec_with("model", {"kind": "mlp", "width": 10**9}))
    assert "model.width" in one_error(cli("train", g, "--out", out, "--no-limits"))


def test_estimate_counts_parameters_exactly_and_allocates_nothing():
    spec = parse_spec(spec_with("model", {"kind": "mlp", "width": 10**6, "depth": 3}))
    est = resources.estimate(spec)  # 2e12 parameters: built on the meta device, no memory
    assert est.parameters == 64 * 10**6 + 10**6 + 2 * (10**12 + 10**6) + 2 * 10**6 + 2
    small = resources.estimate(parse_spec(copy.deepcopy(TINY)))
    assert small.parameters == 64 * 16 + 16 + 16 * 2 + 2
    assert 0 < small.total < 64 << 20
