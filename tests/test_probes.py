"""Probes: oracles (tests/oracles.py) are dense per-example gradients (torch.func.jacrev), dense Hessians
(torch.func.hessian), central finite differences of a dense eigenvalue, SciPy and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from eosbranch.curvature import flatten, hessian_matvec, input_linear
from eosbranch.loss import get_loss
from eosbranch.probes import (
    GROUP_METRICS, KEYS, Context, curvature_fraction, fraction_loss_increased, group_probes,
    per_example_alignment, spearman, weight_projection,
)

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from oracles import Dense, dense_weighted, rows_to_dict
except ImportError:  # pragma: no cover
    from tests.oracles import Dense, dense_weighted, rows_to_dict

F64 = torch.float64
GROUPS = {  # overlapping groups of different sizes, so the union and the weights matter
    "a": torch.arange(0, 8),
    "b": torch.tensor([3, 5, 7, 11, 13, 17, 19]),
    "c": torch.arange(20, 24),
}


def tiny(kind: str = "mlp", n: int = 24, regression: bool = False):
    """A smooth (tanh) float64 model and data, small enough for dense Hessians."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
        X = torch.randn(n, 5, generator=g, dtype=F64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(F64)
        X = torch.randn(n, 1, 6, 6, generator=g, dtype=F64)
    y = torch.randn(n, 3, generator=g, dtype=F64) if regression else torch.randint(0, 3, (n,), generator=g)
    return model, X, y


# ---------------------------------------------------------------------- group probes
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size,batched", [(None, True), (7, True), (5, False)])
@pytest.mark.parametrize("method", ["auto", "taylor", "input_layer", "generic"])
def test_group_probes_match_dense_oracles(loss, chunk_size, batched, method):
    model, X, y = tiny()
    d = Dense(model, loss, X, y)
    lam, v1, w = d.top()
    assert w[-1] - w[-2] > 1e-3 * abs(w[-1])  # lambda_1 simple, so v1 is well defined
    J, H = d.per_example_grads(), d.hessian()
    dS = torch.func.jacrev(lambda f: v1 @ d.hessian(f) @ v1)(d.theta)  # third-derivative oracle
    ctx = Context(model, loss, X, y, GROUPS, v1, chunk_size=chunk_size, batched_vjp=batched, curvature_method=method)
    assert (ctx.taylor is not None) == (method in ("auto", "taylor"))  # this MLP is Linear-Tanh-Linear
    assert (ctx.input_split is not None) == (method in ("auto", "input_layer"))
    _check_group_probes(ctx, d, X, y, lam, v1, J, H, dS)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("weighted", [False, True])
def test_group_probes_reading_the_operators_forward_match_dense_oracles(loss, weighted):
    # The Taylor curvature pass takes the first layer's output from the measurement's operator.
    model, X, y = tiny()
    w = torch.rand(X.shape[0], dtype=F64, generator=torch.Generator().manual_seed(4)) if weighted else None
    d = Dense(model, loss, X, y)
    objective = dense_weighted(d, w) if weighted else d.mean_loss

    def hess(f):
        return torch.func.hessian(objective)(f)

    H = hess(d.theta)
    evals, U = torch.linalg.eigh(H)
    lam, v1, J = evals[-1], U[:, -1], d.per_example_grads()
    dS = torch.func.jacrev(lambda f: v1 @ hess(f) @ v1)(d.theta)
    ctx = Context(model, loss, X, y, GROUPS, v1, weights=w, operator=hessian_matvec(model, loss, (X, y), weights=w))
    assert ctx.taylor is not None and ctx.forward is not None
    _check_group_probes(ctx, d, X, y, lam, v1, J, H, dS)


def _check_group_probes(ctx, d, X, y, lam, v1, J, H, dS):
    got = rows_to_dict(group_probes(ctx))
    assert [m for g, m in got if g == "a"] == list(GROUP_METRICS)
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        per_loss = d.per_example_loss(d.theta)[idx]
        acc = (d.out(d.theta, X[idx]).argmax(1) == y[idx]).double().mean()
        want = {
            "loss": per_loss.mean(), "accuracy": acc, "grad_norm": g.norm(),
            "cos2_v1": (g @ v1) ** 2 / (g @ g), "curvature_influence": (g @ v1) ** 2,
            "sharpness_coupling": g @ dS, "rayleigh": g @ H @ g / (g @ g),
        }
        for metric, value in want.items():
            assert got[(name, metric)] == pytest.approx(value.item(), rel=1e-9, abs=1e-12), (name, metric)
    assert ctx.v1_hessian_quadratic == pytest.approx(lam.item(), rel=1e-9)


def test_sharpness_coupling_is_the_derivative_of_sharpness_along_the_group_gradient():
    model, X, y = tiny()
    d = Dense(model, "mse", X, y)
    _, v1, w = d.top()
    assert w[-1] - w[-2] > 1e-2 * w[-1]
    J = d.per_example_grads()
    ctx = Context(model, "mse", X, y, GROUPS, v1, chunk_size=10)
    got = rows_to_dict(group_probes(ctx))
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        eps = 1e-4 / g.norm()
        s_plus = torch.linalg.eigvalsh(d.hessian(d.theta + eps * g))[-1]
        s_minus = torch.linalg.eigvalsh(d.hessian(d.theta - eps * g))[-1]
        fd = ((s_plus - s_minus) / (2 * eps)).item()
        assert got[(name, "sharpness_coupling")] == pytest.approx(fd, rel=1e-5, abs=1e-8), name


def test_rayleigh_and_coupling_use_the_hessian_subset_v1_came_from():
    model, X, y = tiny()
    sub = torch.arange(0, 24, 2)
    d = Dense(model, "mse", X, y)
    _, v1, _ = d.top(idx=sub)
    Hs = d.hessian(idx=sub)
    dS = torch.func.jacrev(lambda f: v1 @ d.hessian(f, idx=sub) @ v1)(d.theta)
    J = d.per_example_grads()
    got = rows_to_dict(group_probes(Context(model, "mse", X, y, GROUPS, v1, chunk_size=5, hessian_subset=sub)))
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((g @ Hs @ g / (g @ g)).item(), rel=1e-9)
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-9)


def test_group_gradients_batched_equal_separate_autograd_per_group():
    model, X, y = tiny()
    loss = get_loss("ce")
    ctx = Context(model, loss, X, y, GROUPS, chunk_size=4)
    for name, idx in GROUPS.items():
        model.zero_grad()
        loss(model(X[idx]), y[idx]).backward()
        want = flatten([p.grad for p in model.parameters()])
        torch.testing.assert_close(ctx.group_grads[name], want, rtol=1e-12, atol=1e-14)


def test_regression_targets_skip_accuracy_and_no_v1_skips_v1_metrics():
    model, X, y = tiny(regression=True)
    d = Dense(model, "mse", X, y)
    J, H = d.per_example_grads(), d.hessian()
    got = rows_to_dict(group_probes(Context(model, "mse", X, y, GROUPS, v1=None)))
    assert [m for g, m in got if g == "c"] == ["loss", "grad_norm", "rayleigh"]
    g = J[GROUPS["c"]].mean(0)
    assert got[("c", "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9)


def test_metric_subset_skips_the_curvature_pass():
    model, X, y = tiny()
    d = Dense(model, "mse", X, y)
    _, v1, _ = d.top()
    J = d.per_example_grads()
    ctx = Context(model, "mse", X, y, GROUPS, v1)
    rows = group_probes(ctx, metrics=["cos2_v1", "loss"])
    assert [(g, m) for g, m, _ in rows] == [(k, m) for k in GROUPS for m in ("loss", "cos2_v1")]
    g = J[GROUPS["b"]].mean(0)
    assert rows_to_dict(rows)[("b", "cos2_v1")] == pytest.approx(((g @ v1) ** 2 / (g @ g)).item(), rel=1e-9)
    assert not {KEYS["sharpness_gradient"], KEYS["sharpness_coupling"], KEYS["group_hessian_quadratic"]} & set(ctx.cache)
    with pytest.raises(ValueError, match="unknown metrics"):
        group_probes(ctx, metrics=["sharpness"])


def test_measuring_leaves_the_model_unchanged_and_caches_under_explicit_keys():
    model, X, y = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    _, v1, _ = Dense(model, "mse", X, y).top()
    ctx = Context(model, "mse", X, y, GROUPS, v1)
    group_probes(ctx)
    per_example_alignment(ctx)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q) and p.grad is None
    assert ctx.group_grads is ctx.cache[KEYS["group_grads"]]
    assert ctx.sharpness_gradient is ctx.cache["sharpness_gradient_v1_global"]


def test_context_rejects_wrong_inputs():
    model, X, y = tiny()
    dim = sum(p.numel() for p in model.parameters())
    v = torch.zeros(dim, dtype=F64)
    v[0] = 1
    with pytest.raises(ValueError, match="unit"):
        Context(model, "mse", X, y, GROUPS, 2 * v)
    with pytest.raises(ValueError, match=f"\\[{dim}\\]"):
        Context(model, "mse", X, y, GROUPS, v[:-1])
    with pytest.raises(ValueError, match="outside"):
        Context(model, "mse", X, y, {"bad": torch.tensor([0, 24])}, v)


# ---------------------------------------------------------------------- per-example probes
@pytest.mark.parametrize("kind,method", [("mlp", "linear"), ("mlp", "vmap"), ("cnn", "auto")])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_per_example_projection_norms_and_alignment_match_dense(kind, method, loss):
    model, X, y = tiny(kind)
    d = Dense(model, loss, X, y)
    J = d.per_example_grads()
    v1 = torch.randn(J.shape[1], dtype=F64, generator=torch.Generator().manual_seed(3))
    v1 /= v1.norm()
    ctx = Context(model, loss, X, y, GROUPS, v1, chunk_size=7, grad_norm_method=method)
    torch.testing.assert_close(ctx.per_example_projection, J @ v1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctx.per_example_grad_norm, J.norm(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctx.per_example_loss, d.per_example_loss(d.theta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(per_example_alignment(ctx), (J @ v1) ** 2 / J.norm(dim=1) ** 2,
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("weighted", [False, True])
def test_per_example_passes_from_the_operators_forward_match_dense(loss, weighted):
    # The measurement's Hessian operator caches one forward pass (MLP chain, one chunk); the
    # Context reads per-example losses, projections and norms from it instead of its own passes.
    model, X, y = tiny("mlp")
    d = Dense(model, loss, X, y)
    J = d.per_example_grads()
    v1 = torch.randn(J.shape[1], dtype=F64, generator=torch.Generator().manual_seed(3))
    v1 /= v1.norm()
    w = torch.rand(X.shape[0], dtype=F64, generator=torch.Generator().manual_seed(4)) if weighted else None
    H = hessian_matvec(model, loss, (X, y), weights=w)
    ctx = Context(model, loss, X, y, GROUPS, v1, weights=w, operator=H)
    assert ctx.forward is H.shared_forward() is not None
    torch.testing.assert_close(ctx.per_example_projection, J @ v1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctx.per_example_grad_norm, J.norm(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ctx.per_example_loss, d.per_example_loss(d.theta), rtol=1e-12, atol=1e-14)


def test_context_ignores_an_operator_over_other_points_or_parameters():
    model, X, y = tiny("mlp")
    assert Context(model, "mse", X, y, operator=hessian_matvec(model, "mse", (X[:10], y[:10]))).forward is None
    assert Context(model, "mse", X, y, operator=hessian_matvec(model, "mse", (X, y), subset=[0, 1])).forward is None
    assert Context(model, "mse", X, y, operator=hessian_matvec(model, "mse", (X, y), chunk_size=7)).forward is None
    H = hessian_matvec(model, "mse", (X, y))
    with torch.no_grad():
        model[0].weight.add_(0.1)  # the model moved after the operator was made
    assert Context(model, "mse", X, y, operator=H).forward is None


def test_linear_norm_identity_refuses_models_it_does_not_cover():
    model, X, y = tiny("cnn")
    ctx = Context(model, "mse", X, y, grad_norm_method="linear")
    with pytest.raises(ValueError, match="vmap"):
        ctx.per_example_grad_norm


# ---------------------------------------------------------------------- plain functions
@pytest.mark.parametrize("seed", range(4))
def test_spearman_matches_scipy_including_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, size=40).astype(float)  # many ties
    b = a + rng.integers(-3, 4, size=40)            # ties, correlated
    c = rng.normal(size=40)
    for x, z in [(a, b), (a, c), (c, -c ** 3), (b, a)]:
        assert spearman(torch.tensor(x), z) == pytest.approx(scipy.stats.spearmanr(x, z).statistic, abs=1e-12)


def test_spearman_constant_input_is_nan_as_scipy():
    with pytest.warns(Warning):
        ref = scipy.stats.spearmanr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]).statistic
    assert math.isnan(ref) and math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_curvature_fraction_by_hand():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))  # sizes 4, 2, 2, 1
    v = torch.tensor([1.0, 1, 1, 1, 2, 0, 0, 1, 1]) / 3  # ||v||^2 = (4 + 4 + 1 + 1) / 9 = 10 / 9
    v = v / v.norm()
    got = curvature_fraction(v, model)
    assert [n for n, _ in got] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [f for _, f in got] == pytest.approx([0.4, 0.4, 0.1, 0.1])
    assert sum(f for _, f in got) == pytest.approx(1.0)
    assert curvature_fraction(v, list(model.named_parameters())) == got


def test_weight_projection_by_hand():
    theta = [torch.tensor([[1.0, 2.0]]), torch.tensor([3.0])]
    ref = [torch.tensor([[0.0, 1.0]]), torch.tensor([1.0])]
    v = torch.tensor([0.6, 0.0, 0.8])
    assert weight_projection(theta, ref, v) == pytest.approx(1 * 0.6 + 1 * 0.0 + 2 * 0.8)
    assert weight_projection(flatten(theta), flatten(ref), v) == pytest.approx(2.2)


def test_fraction_loss_increased_by_hand():
    assert fraction_loss_increased([1.0, 2.0, 3.0, 4.0], torch.tensor([1.5, 2.0, 2.0, 5.0])) == 0.5
    assert fraction_loss_increased([1.0, 1.0], [0.5, 0.9]) == 0.0


# ---------------------------------------------------------------------- input-layer factorisation
def wide(activation=nn.Tanh, n=30, d=40, width=16, seed=0):
    """Inputs much wider than the groups are large, so R_k and Q_k take the low-rank route
    (A A_U^T)(w_k * Delta_U); a Flatten in front, as eosbranch's mlp has."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, width), activation(), nn.Linear(width, 3)).to(F64)
    X = torch.randn(n, 4, d // 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    groups = {"p": torch.tensor([0, 1, 2]), "q": torch.tensor([2, 9]), "r": torch.tensor([29])}
    return model, X, y, groups


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("weighted,subset", [(False, False), (True, False), (True, True)])
def test_input_layer_factorisation_matches_dense_oracles(monkeypatch, activation, loss, weighted, subset):
    ranks = []
    original = input_linear._lowrank_factors
    monkeypatch.setattr(input_linear, "_lowrank_factors", lambda *a: ranks.append(r := original(*a)) or r)
    model, X, y, groups = wide(activation)
    d = Dense(model, loss, X, y)
    w = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(7), dtype=F64) + 0.5
    sub = torch.arange(1, 30, 3) if subset else None
    objective = dense_weighted(d, w if weighted else torch.ones(X.shape[0], dtype=F64), sub)
    H = torch.func.hessian(objective)(d.theta)
    evals, U = torch.linalg.eigh(H)
    v1 = U[:, -1]
    assert evals[-1] - evals[-2] > 1e-3 * abs(evals[-1])
    dS = torch.func.jacrev(lambda f: v1 @ torch.func.hessian(objective)(f) @ v1)(d.theta)
    J = d.per_example_grads()
    ctx = Context(model, loss, X, y, groups, v1, chunk_size=7, weights=w if weighted else None,
                  hessian_subset=sub, curvature_method="input_layer")
    got = rows_to_dict(group_probes(ctx))
    assert ranks and ranks[0] is not None  # the low-rank route was taken
    assert KEYS["sharpness_gradient"] not in ctx.cache  # grad S itself is never formed
    for name, idx in groups.items():
        g = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9), name
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8, abs=1e-12), name
    assert ctx.v1_hessian_quadratic == pytest.approx(evals[-1].item(), rel=1e-9)


def test_input_layer_split_refuses_models_it_does_not_cover():
    model, X, y = tiny("cnn")
    assert Context(model, "mse", X, y, GROUPS).input_split is None  # starts with a Conv2d
    with pytest.raises(ValueError, match="curvature_method='input_layer' needs"):
        Context(model, "mse", X, y, GROUPS, curvature_method="input_layer")
    model, X, y = tiny()
    model[0].weight.requires_grad_(False)  # a frozen input layer: group gradients have no block there
    assert Context(model, "mse", X, y, GROUPS).input_split is None


def test_generic_pass_with_weights_and_subset_matches_dense():
    model, X, y, groups = wide()
    d = Dense(model, "mse", X, y)
    w = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(3), dtype=F64) + 0.5
    sub = torch.arange(0, 30, 2)
    objective = dense_weighted(d, w, sub)
    H = torch.func.hessian(objective)(d.theta)
    v1 = torch.linalg.eigh(H)[1][:, -1]
    dS = torch.func.jacrev(lambda f: v1 @ torch.func.hessian(objective)(f) @ v1)(d.theta)
    J = d.per_example_grads()
    ctx = Context(model, "mse", X, y, groups, v1, chunk_size=4, weights=w, hessian_subset=sub, curvature_method="generic")
    got = rows_to_dict(group_probes(ctx))
    for name, idx in groups.items():
        g = J[idx].mean(0)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9), name
        assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8), name
