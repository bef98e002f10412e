"""Taylor-mode group curvature (eosbranch.curvature.taylor): R_k, Q_k, S and the group gradients against dense
oracles (torch.func.hessian, jacrev of v1^T H v1, per-example jacobians) for every covered
activation, both losses, weights, a Hessian subset, overlapping groups and data blocks smaller than
the data; and the models the route must refuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eosbranch.curvature import taylor
from eosbranch.probes import KEYS, Context, group_probes
try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from oracles import F64, Dense, dense_weighted, rows_to_dict, sharpness_gradient
except ImportError:  # pragma: no cover
    from tests.oracles import F64, Dense, dense_weighted, rows_to_dict, sharpness_gradient

# Overlapping groups, one of them larger than the first hidden layer is wide (the dense route).
GROUPS = {"p": torch.tensor([0, 1, 2]), "q": torch.tensor([2, 9]), "r": torch.tensor([29]), "big": torch.arange(4, 26)}


def deep(activation, seed=0):
    """Flatten, then three Linear layers with two activations (and an Identity): the Taylor rules
    run through a hidden-to-hidden layer, where R_k's second-order terms live."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(40, 16), activation(), nn.Linear(16, 12), activation(),
                          nn.Identity(), nn.Linear(12, 3)).to(F64)
    X = torch.randn(30, 4, 10, generator=g, dtype=F64)
    y = torch.randint(0, 3, (30,), generator=g)
    return model, X, y


def oracle(model, loss, X, y, w, sub):
    d = Dense(model, loss, X, y)
    objective = dense_weighted(d, w, sub)
    H = torch.func.hessian(objective)(d.theta)
    evals, U = torch.linalg.eigh(H)
    v1 = U[:, -1]
    dS = sharpness_gradient(objective, d.theta, v1)
    return d, H, v1, evals[-1], dS


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
                                        nn.Softplus])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("weighted,subset,chunk", [(False, False, None), (True, True, 7)])
def test_taylor_route_matches_dense_oracles(monkeypatch, activation, loss, weighted, subset, chunk):
    monkeypatch.setattr(taylor, "SUB_CHUNK", 4)  # blocks of the data pass smaller than the chunks
    model, X, y = deep(activation)
    w = (torch.rand(X.shape[0], generator=torch.Generator().manual_seed(7), dtype=F64) + 0.5 if weighted
         else torch.ones(X.shape[0], dtype=F64))
    sub = torch.arange(1, 30, 3) if subset else None
    d, H, v1, lam, dS = oracle(model, loss, X, y, w, sub)
    ctx = Context(model, loss, X, y, GROUPS, v1, chunk_size=chunk, weights=w if weighted else None,
                  hessian_subset=sub, curvature_method="taylor")
    got = rows_to_dict(group_probes(ctx))
    # Each group takes the low-rank route where it has fewer points than the layer is wide.
    low = [None if f is None else sorted(f["groups"]) for f in ctx.cache["taylor_factors"]["layers"]]
    assert low == [[0, 1, 2], [0, 1, 2], [1, 2]]  # p, q, r (3, 2, 1 points), not big (22)
    assert KEYS["sharpness_gradient"] not in ctx.cache  # grad S itself is never formed
    J = d.per_example_grads()
    per = d.per_example_loss(d.theta)
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        torch.testing.assert_close(ctx.group_grads[name], g, rtol=1e-10, atol=1e-13)
        assert got[(name, "loss")] == pytest.approx(per[idx].mean().item(), rel=1e-12)
        acc = (d.out(d.theta, X[idx]).argmax(1) == y[idx]).double().mean().item()
        assert got[(name, "accuracy")] == pytest.approx(acc, abs=1e-15)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9), name
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8, abs=1e-12), name
    assert ctx.v1_hessian_quadratic == pytest.approx(lam.item(), rel=1e-9)


def test_taylor_route_takes_dense_blocks_when_groups_are_wide():
    # Groups with more points than the layers are wide: every layer uses the dense gradient blocks.
    model, X, y = deep(nn.Tanh)
    groups = {"first": torch.arange(0, 20), "second": torch.arange(10, 30)}
    d, H, v1, _, dS = oracle(model, "mse", X, y, torch.ones(30, dtype=F64), None)
    ctx = Context(model, "mse", X, y, groups, v1, curvature_method="taylor")
    got = rows_to_dict(group_probes(ctx))
    assert ctx.cache["taylor_factors"]["layers"] == [None, None, None]
    J = d.per_example_grads()
    for name, idx in groups.items():
        g = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9)
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8)


def test_taylor_route_equals_the_generic_pass_in_float32():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 2))
    g = torch.Generator().manual_seed(4)
    X, y = torch.randn(300, 8, 8, generator=g), torch.randint(0, 2, (300,), generator=g)
    groups = {k: torch.arange(10 * i, 10 * i + 10) for i, k in enumerate("abcd")}
    dim = sum(p.numel() for p in model.parameters())
    v1 = torch.randn(dim, generator=g)
    v1 /= v1.norm()
    rows = {m: rows_to_dict(group_probes(Context(model, "mse", X, y, groups, v1, curvature_method=m)))
            for m in ("taylor", "generic")}
    for key, want in rows["generic"].items():
        assert rows["taylor"][key] == pytest.approx(want, rel=2e-4, abs=1e-6), key


def test_auto_prefers_the_taylor_route_and_falls_back():
    model, X, y = deep(nn.Tanh)
    assert Context(model, "mse", X, y, GROUPS).taylor is not None
    assert Context(model, "mse", X, y, GROUPS, curvature_method="generic").taylor is None


@pytest.mark.parametrize("build", [
    lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)),  # a convolution
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),  # in place
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.Dropout(0.1), nn.Linear(8, 3)),  # not elementwise-deterministic
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),  # mixes the batch
    lambda: nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3)),  # applied over a trailing axis of [n, 4, 10]
    lambda: nn.Sequential(nn.Flatten(), nn.Linear(40, 8), nn.Softmax(-1), nn.Linear(8, 3)),  # not elementwise
    lambda: nn.Sequential(nn.BatchNorm1d(40, affine=False, track_running_stats=False), nn.Linear(40, 3)),  # mixes rows
])
def test_taylor_split_refuses_models_it_does_not_cover(build):
    torch.manual_seed(0)
    model = build().to(F64)
    X = torch.randn(6, 4, 10, dtype=F64) if not isinstance(model[0], nn.Conv2d) else torch.randn(6, 1, 6, 6, dtype=F64)
    y = torch.randint(0, 3, (6,))
    assert Context(model, "mse", X, y, {"a": torch.arange(3)}).taylor is None
    with pytest.raises(ValueError, match="curvature_method='taylor' needs"):
        Context(model, "mse", X, y, {"a": torch.arange(3)}, curvature_method="taylor")


def test_taylor_split_refuses_a_frozen_layer():
    model, X, y = deep(nn.Tanh)
    model[3].bias.requires_grad_(False)  # its block is missing from the flat layout
    assert Context(model, "mse", X, y, GROUPS).taylor is None


def test_a_module_used_twice_is_left_to_the_generic_pass():
    # nn.Sequential applies a repeated module at each position, but named_children() lists it once.
    torch.manual_seed(0)
    act = nn.Tanh()
    model = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 2)).to(F64)
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 5, generator=g, dtype=F64), torch.randint(0, 2, (20,), generator=g)
    groups = {"a": torch.arange(0, 4), "b": torch.arange(4, 7)}
    d, H, v1, _, dS = oracle(model, "mse", X, y, torch.ones(20, dtype=F64), None)
    ctx = Context(model, "mse", X, y, groups, v1)
    assert ctx.taylor is None and ctx.input_split is None
    got = rows_to_dict(group_probes(ctx))
    J = d.per_example_grads()
    for name, idx in groups.items():
        gk = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((gk @ H @ gk / (gk @ gk)).item(), rel=1e-9)
        assert got[(name, "sharpness_coupling")] == pytest.approx((gk @ dS).item(), rel=1e-8)


def _pseudo_huber(outputs, targets, reduction="mean"):
    """A loss that is not built in (no closed-form derivatives): curvature varies with the residual."""
    r = outputs - nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
    per = (torch.sqrt(1 + r * r) - 1).sum(1)
    return per.mean() if reduction == "mean" else per


def test_taylor_route_with_a_custom_loss_differentiates_it_by_autograd():
    model, X, y = deep(nn.Tanh)
    w = torch.ones(X.shape[0], dtype=F64)
    d, H, v1, lam, dS = oracle(model, _pseudo_huber, X, y, w, None)
    ctx = Context(model, _pseudo_huber, X, y, GROUPS, v1, curvature_method="taylor")
    got = rows_to_dict(group_probes(ctx))
    J = d.per_example_grads()
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9), name
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8, abs=1e-12), name
    assert ctx.v1_hessian_quadratic == pytest.approx(lam.item(), rel=1e-9)
