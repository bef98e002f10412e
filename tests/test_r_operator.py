"""Hessian-vector products by the R-operator (eosbranch.curvature.mlp) against dense Hessians
(torch.func.hessian) for every covered activation, both losses, weights, a subset, chunks and
blocks; the default choice of HVP form and the models it refuses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from eosbranch.curvature import hessian_matvec, top_eigenpairs
from eosbranch.loss import get_loss

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from oracles import dense_hessian
except ImportError:  # pragma: no cover
    from tests.oracles import dense_hessian

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add synchronisation


def deep(activation, n=26, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 9), activation(), nn.Linear(9, 7), activation(),
                          nn.Identity(), nn.Linear(7, 3)).to(F64)
    X = torch.randn(n, 3, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def dense(model, loss, X, y, w=None, idx=None):
    """The Hessian of sum_i w_i l_i / sum_i w_i over idx, through per-example losses even without
    weights (the form the R-operator differentiates)."""
    return dense_hessian(model, loss, X, y, torch.ones(X.shape[0], dtype=F64) if w is None else w, idx)


@pytest.mark.parametrize("activation", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
                                        nn.Softplus])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("chunk_size,weighted,subset", [(None, False, False), (7, True, True)])
def test_r_operator_equals_the_dense_hessian(activation, loss, chunk_size, weighted, subset):
    model, X, y = deep(activation)
    w = torch.rand(X.shape[0], generator=torch.Generator().manual_seed(5), dtype=F64) + 0.5 if weighted else None
    sub = torch.arange(1, 26, 2) if subset else None
    H = dense(model, loss, X, y, w, sub)
    hv = hessian_matvec(model, loss, (X, y), chunk_size=chunk_size, subset=sub, weights=w)
    assert hv.method == "r_operator"  # the default for this model
    V = torch.randn(H.shape[0], 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    for _ in range(2):  # the second call reuses the cached forward (single chunk)
        torch.testing.assert_close(hv(V), H @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hv(V[:, 1]), H @ V[:, 1], rtol=1e-10, atol=1e-12)


def test_r_operator_sharpness_equals_double_backward_and_dense():
    model, X, y = deep(nn.Tanh)
    H = dense(model, "mse", X, y)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    for method in ("r_operator", "double_backward"):
        r = top_eigenpairs(hessian_matvec(model, "mse", (X, y), method=method), H.shape[0], k=3, tol=1e-10)
        torch.testing.assert_close(r.values, want, rtol=1e-8, atol=0)


def test_the_default_form_follows_the_model():
    model, X, y = deep(nn.ReLU)
    assert hessian_matvec(model, "mse", (X, y)).method == "r_operator"
    assert hessian_matvec(model, "mse", (X, y), method="double_backward").method == "double_backward"
    cnn = nn.Sequential(nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(F64)
    assert hessian_matvec(cnn, "mse", (X, y)).method == "double_backward"
    with pytest.raises(ValueError, match="method 'r_operator' needs"):
        hessian_matvec(cnn, "mse", (X, y), method="r_operator")
    model[3].weight.requires_grad_(False)  # a frozen layer: autograd handles the partial layout
    assert hessian_matvec(model, "mse", (X, y)).method == "double_backward"


def test_the_operator_is_a_snapshot():
    model, X, y = deep(nn.Tanh)
    hv = hessian_matvec(model, "ce", (X, y))
    v = torch.randn(hv.dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    before = hv(v)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.testing.assert_close(hv(v), before, rtol=0, atol=0)


def test_models_and_losses_the_r_operator_cannot_take_fall_back_to_autograd():
    torch.manual_seed(0)
    X, y = torch.randn(20, 5, dtype=F64), torch.randint(0, 3, (20,))
    yf = torch.randn(20, 3, dtype=F64)
    act = nn.Tanh()
    shared = nn.Sequential(nn.Linear(5, 6), act, nn.Linear(6, 6), act, nn.Linear(6, 3)).to(F64)  # one Tanh twice
    batch_prefix = nn.Sequential(nn.BatchNorm1d(5, affine=False, track_running_stats=False), nn.Linear(5, 3)).to(F64)
    plain = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    cases = [
        (shared, "mse", y),
        (batch_prefix, "mse", y),
        (plain, torch.nn.functional.mse_loss, yf),  # reduction="none" gives [n, 3], not one loss per example
        (plain, lambda o, t: ((o - t) ** 2).mean(), yf),  # no reduction argument at all
    ]
    for model, loss, targets in cases:
        hv = hessian_matvec(model, loss, (X, targets))
        assert hv.method == "double_backward"
        V = torch.randn(hv.dim, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(hv(V), dense(model, get_loss(loss) if isinstance(loss, str) else _mean(loss), X,
                                                targets) @ V, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="reduction='none'"):
        hessian_matvec(plain, torch.nn.functional.mse_loss, (X, yf), method="r_operator")


def _mean(loss):
    """A loss without per-example reduction as dense() expects one (``reduction`` ignored, weights all 1)."""
    def per(outputs, targets, reduction="mean"):
        return loss(outputs, targets).expand(outputs.shape[0])  # the mean, repeated: its mean is the loss

    return per


def test_r_operator_with_a_custom_per_example_loss_uses_autograd_for_the_loss():
    """A loss that is not built in (no closed-form derivatives) but gives per-example losses: the
    R-operator differentiates it with autograd, and still equals the dense Hessian."""
    def smooth_l1(outputs, targets, reduction="mean"):
        r = outputs - nn.functional.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        per = (torch.sqrt(1 + r * r) - 1).sum(1)  # pseudo-Huber: curvature varies with the residual
        return per.mean() if reduction == "mean" else per

    model, X, y = deep(nn.Tanh)
    hv = hessian_matvec(model, smooth_l1, (X, y))
    assert hv.method == "r_operator"
    hv(torch.zeros(hv.dim, dtype=F64))
    assert hv.backend._cache.loss_hess is None  # the autograd path, not a closed form
    H = dense(model, smooth_l1, X, y)
    V = torch.randn(H.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(hv(V), H @ V, rtol=1e-10, atol=1e-12)
