"""Every curvature route on every model of the case table (tests/cases.py) against the dense
float64 oracles of tests/oracles.py: the backend auto picks, HVPs of each HVP method, and the group
curvature (g_k, R_k, Q_k, grad S, S) of each Context curvature method, with per-point weights,
a Hessian subset and uneven chunks. A route a model does not qualify for must refuse it."""

from __future__ import annotations

import pytest
import torch

from eosbranch.curvature import hessian_matvec
from eosbranch.probes import Context, group_probes

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from cases import NAMES, make
    from oracles import Dense, dense_weighted, rows_to_dict, sharpness_gradient
except ImportError:  # pragma: no cover
    from tests.cases import NAMES, make
    from tests.oracles import Dense, dense_weighted, rows_to_dict, sharpness_gradient

F64 = torch.float64
ROUTES = ["auto", "taylor", "input_layer", "generic"]
HVP_METHODS = [None, "double_backward", "forward_over_reverse", "r_operator"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add synchronisation


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """The case with its oracles: weights, a Hessian subset, H of the weighted subset loss, its top
    eigenvector, grad S (where the third-derivative oracle is cheap) and the per-example gradients."""
    c = make(request.param)
    n = c.X.shape[0]
    w = torch.linspace(0.5, 1.5, n, dtype=F64)
    sub = torch.arange(0, n, 2) if n > 8 else None
    d = Dense(c.model, "ce", c.X, c.y)
    objective = dense_weighted(d, w, sub)
    H = torch.func.hessian(objective)(d.theta)
    evals, U = torch.linalg.eigh(H)
    v1 = U[:, -1]
    dS = sharpness_gradient(objective, d.theta, v1) if c.third else None
    return c, w, sub, d, H, v1, evals[-1], dS, d.per_example_grads()


def test_auto_picks_the_most_specific_backend(case):
    c, w, sub = case[:3]
    assert Context(c.model, "ce", c.X, c.y, c.groups).backend.name == c.auto
    assert hessian_matvec(c.model, "ce", (c.X, c.y)).backend.name == c.auto


@pytest.mark.parametrize("method", HVP_METHODS)
def test_every_hvp_method_matches_the_dense_hessian(case, method):
    c, w, sub, d, H = case[:5]
    if method == "r_operator" and c.auto != "mlp":
        with pytest.raises(ValueError, match="method 'r_operator' needs"):
            hessian_matvec(c.model, "ce", (c.X, c.y), method=method)
        return
    op = hessian_matvec(c.model, "ce", (c.X, c.y), chunk_size=7, subset=sub, weights=w, method=method)
    V = torch.randn(H.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op(V), H @ V, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op(V[:, 0]), H @ V[:, 0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("route", ROUTES)
def test_every_group_curvature_route_matches_the_dense_oracles(case, route):
    c, w, sub, d, H, v1, lam, dS, J = case
    if route not in c.routes:
        with pytest.raises(ValueError, match=f"curvature_method='{route}' needs"):
            Context(c.model, "ce", c.X, c.y, c.groups, v1, curvature_method=route)
        return
    ctx = Context(c.model, "ce", c.X, c.y, c.groups, v1, chunk_size=7, hessian_subset=sub, weights=w,
                  curvature_method=route)
    got = rows_to_dict(group_probes(ctx))
    for name, idx in c.groups.items():
        g = J[idx].mean(0)
        torch.testing.assert_close(ctx.group_grads[name], g, rtol=1e-9, atol=1e-12)
        assert got[(name, "loss")] == pytest.approx(d.per_example_loss(d.theta)[idx].mean().item(), rel=1e-12)
        assert got[(name, "rayleigh")] == pytest.approx((g @ H @ g / (g @ g)).item(), rel=1e-9), name
        if dS is not None:
            assert got[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-8, abs=1e-12), name
    assert ctx.v1_hessian_quadratic == pytest.approx(lam.item(), rel=1e-9)
    if dS is not None:
        torch.testing.assert_close(ctx.sharpness_gradient, dS, rtol=1e-8, atol=1e-12)
