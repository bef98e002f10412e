"""Mechanism terms (eosbranch.mechanism) and the own-Hessian alignment probe against dense float64
oracles: σ² from checkpointed iterates and a dense eigenvector, v1ᵀ∇²l_k v1 and cos2_v1_own from
dense group Hessians, and the central-flow prediction in closed form."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from torch.func import functional_call

import eosbranch
from eosbranch.curvature import flatten, unflatten
from eosbranch.mechanism import oscillation_variance, predict, v1_group_curvature
from eosbranch.probes import Context, PROBES
from eosbranch.experiment import build

from test_probes import GROUPS, Dense, tiny


# ---------------------------------------------------------------------- σ²
def test_second_differences_give_the_oscillation_variance_of_a_period_two_zigzag_on_a_drift():
    s = np.arange(20, 40)
    p = 3.0 + 0.7 * s + 0.25 * (-1.0) ** s
    entries = list(zip(s.tolist(), p.tolist()))
    assert oscillation_variance(entries, 39, 8) == pytest.approx(0.25 ** 2, rel=1e-12)
    assert np.isnan(oscillation_variance(entries[:2], 21, 8))  # fewer than three consecutive steps
    assert np.isnan(oscillation_variance(entries, 100, 8))  # nothing tracked in the window


def osc_spec(loss: str, lr: float) -> dict:
    """A 270-parameter MLP on 40 digits, GD above its threshold from the start (it oscillates),
    float64, a checkpoint at every step so the oracle can read every iterate."""
    return {"name": f"osc-{loss}", "seed": 0, "device": "cpu", "dtype": "float64",
            "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 20},
            "model": {"kind": "mlp", "width": 4, "depth": 1}, "loss": loss,
            "optimizer": {"kind": "gd", "lr": lr}, "steps": 20,
            "measure": {"every": 10, "warmup": 0, "tol": 1e-10, "probes": False, "alignment": False},
            "checkpoint": {"every": 1}}


@pytest.mark.parametrize("loss, lr", [("mse", 0.0075), ("ce", 4.0)])
def test_oscillation_variance_matches_iterates_projected_on_the_dense_top_eigenvector(loss, lr, tmp_path):
    spec = osc_spec(loss, lr)
    run = eosbranch.train(spec, out=tmp_path)
    exp = build(run.spec)
    names = [n for n, p in exp.model.named_parameters()]
    like = [p.detach() for p in exp.model.parameters()]

    def theta(step):
        state = run.checkpoint(step)["model"]
        return flatten([state[n] for n in names]).to(torch.float64)

    def mean_loss(flat):
        out = functional_call(exp.model, dict(zip(names, unflatten(flat, like))), (exp.train_X,))
        return exp.loss_fn(out, exp.train_y)

    m = run.metrics
    recorded = m[m.metric == "oscillation_variance"].set_index("step").value
    assert list(recorded.index) == [10, 20]  # none at step 0: no earlier v1 to track along
    for t in (10, 20):
        w, U = torch.linalg.eigh(torch.func.hessian(mean_loss)(theta(t - 10)))  # the previous measurement's v1
        u = U[:, -1]
        p = {s: (theta(s) @ u).item() for s in range(t - 8, t + 1)}
        d = [(p[s + 1] - 2 * p[s] + p[s - 1]) / 4 for s in range(t - 7, t)]
        oracle = float(np.mean(np.square(d)))
        assert oracle > 1e-12  # the run oscillates: the comparison is not of two zeros
        assert recorded[t] == pytest.approx(oracle, rel=1e-6)


def test_a_resumed_run_records_the_same_oscillation_variance(tmp_path):
    """The tracked projections are part of the checkpointed state: kill-free interruption by
    training to step 15, then resuming to 20, gives the uninterrupted run's σ² bit for bit."""
    spec = osc_spec("mse", 0.0075)
    full = eosbranch.train(spec, out=tmp_path / "a")
    part = eosbranch.train({**spec, "steps": 15}, out=tmp_path / "b")
    resumed = eosbranch.resume(part.path, steps=20)
    pick = lambda r: r.metrics.query("metric == 'oscillation_variance'").value.tolist()  # noqa: E731
    assert pick(resumed) == pick(full) and len(pick(full)) == 2


# ---------------------------------------------------------------------- v1ᵀ∇²l_k v1
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_v1_group_curvature_matches_the_dense_group_hessians(loss, chunk_size):
    model, X, y = tiny()
    d = Dense(model, loss, X, y)
    lam, v1, _ = d.top()
    ctx = Context(model, loss, X, y, GROUPS, v1, chunk_size=chunk_size)
    got = v1_group_curvature(ctx)
    for name, idx in GROUPS.items():
        oracle = (v1 @ d.hessian(idx=idx) @ v1).item()
        assert got[name] == pytest.approx(oracle, rel=1e-10, abs=1e-12)


def test_groups_that_partition_the_data_sum_to_the_sharpness():
    model, X, y = tiny(n=24)
    d = Dense(model, "mse", X, y)
    lam, v1, _ = d.top()
    parts = {"p": torch.arange(0, 5), "q": torch.arange(5, 17), "r": torch.arange(17, 24)}
    got = v1_group_curvature(Context(model, "mse", X, y, parts, v1))
    total = sum(len(idx) / 24 * got[k] for k, idx in parts.items())
    assert total == pytest.approx(lam.item(), rel=1e-10)


# ---------------------------------------------------------------------- cos2_v1_own
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_cos2_v1_own_uses_the_top_eigenvector_of_the_groups_own_hessian(loss):
    model, X, y = tiny()
    d = Dense(model, loss, X, y)
    lam, v1, _ = d.top()
    ctx = Context(model, loss, X, y, GROUPS, v1)
    entry = PROBES.entry("cos2_v1_own")
    rows = {(g, m): v for g, m, v in entry.fn(ctx, tol=1e-10, max_matvecs=2000)}
    for name, idx in GROUPS.items():
        w, U = torch.linalg.eigh(d.hessian(idx=idx))
        g = torch.func.grad(lambda f: d.mean_loss(f, idx))(d.theta)
        own = ((g @ U[:, -1]) ** 2 / (g @ g)).item()
        assert rows[(name, "group_sharpness")] == pytest.approx(w[-1].item(), rel=1e-9)
        assert rows[(name, "cos2_v1_own")] == pytest.approx(own, rel=1e-6, abs=1e-10)
        assert rows[(name, "group_eig_residual")] <= 1e-10
        # It is another quantity than cos2_v1 (the global v1): they differ on these groups.
        glob = ((g @ v1) ** 2 / (g @ g)).item()
        assert abs(own - glob) > 1e-3


# ---------------------------------------------------------------------- the prediction
def test_prediction_in_closed_form():
    """Constant drift rate r and cost c over [0, T]: Δ_pred(t) = r t - c, mean r T / 2 - c."""
    t = np.linspace(0, 4, 9)
    out = predict(t, np.full(9, 0.3), np.full(9, 0.1), 0.0, 4.0)
    assert out["predicted_delta_mean"] == pytest.approx(0.3 * 2 - 0.1, rel=1e-12)
    assert out["predicted_rate"] == pytest.approx(0.3, rel=1e-12)
    # A rate rising linearly, r(t) = t on [0, 2]: ∫ = t²/2, mean over [0, 2] = 2/3, exactly (the
    # rate is piecewise linear between measurements, its integral piecewise quadratic).
    t = np.linspace(0, 2, 3)
    out = predict(t, t, np.zeros(3), 0.0, 2.0)
    assert out["predicted_delta_mean"] == pytest.approx(2 / 3, rel=1e-12)
    assert out["predicted_rate"] == pytest.approx(1.0, rel=1e-12)
