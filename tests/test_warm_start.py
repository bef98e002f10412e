"""The warm start's choice between the previous eigenvector and the gradient hint
(curvature.top_eigenpairs, ``hint_residual``; opt-in, see WARM_HINT_RESIDUAL), on dense matrices
whose top eigenvector rotates by a known amount: products are counted, never timed; every answer is checked against eigh."""

import functools
import math

import pytest
import torch

from eosbranch.curvature import WARM_HINT_RESIDUAL, top_eigenpairs

F64 = torch.float64
N = 200
SPECTRUM = torch.cat([torch.tensor([20.0, 9.0], dtype=F64), torch.linspace(-1, 4, N - 2, dtype=F64)])


@functools.lru_cache(maxsize=None)
def rotated(angle: float):
    """A symmetric matrix with SPECTRUM whose eigenvectors are those of rotated(0) turned by
    exp(angle K), K a fixed random skew matrix: the old top eigenvector spreads over many new ones
    (no small invariant subspace holds it). Returns the matrix and its top unit eigenvector."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    K = torch.randn(N, N, generator=torch.Generator().manual_seed(7), dtype=F64)
    Qr = torch.linalg.matrix_exp(angle * (K - K.T) / math.sqrt(2 * N)) @ Q
    return (Qr * SPECTRUM) @ Qr.T, Qr[:, 0]


class Hinted:
    """A dense matvec with a ``start_hint`` (the role the gradient plays for a HessianOperator)."""

    def __init__(self, A, hint):
        self.A, self.hint, self.dim, self.dtype, self.device = A, hint, A.shape[0], A.dtype, A.device
        self.products = 0

    def __call__(self, x):
        self.products += 1 if x.dim() == 1 else x.shape[1]
        return self.A @ x

    def start_hint(self):
        return self.hint


def hint_near(u, cos2: float, seed: int = 5):
    """A hint whose cos^2 with u is ``cos2`` (u plus a seeded random orthogonal part)."""
    r = torch.randn(N, generator=torch.Generator().manual_seed(seed), dtype=F64)
    r -= (r @ u) * u
    return math.sqrt(cos2) * u + math.sqrt(1 - cos2) * r / r.norm()


def check_top(res, A, tol):
    w = torch.linalg.eigvalsh(A)[-1].item()
    v = res.vectors[:, 0].to(F64)
    assert res.converged
    assert (A @ v - res.values[0].item() * v).norm().item() <= tol * abs(res.values[0].item()) * (1 + 1e-6)
    assert res.values[0].item() == pytest.approx(w, rel=tol)


@pytest.mark.parametrize("angle", [0.02, 0.1])
def test_a_fresh_warm_start_is_the_plain_warm_solve_product_for_product(angle):
    # 32 steps at the EoS move v1 a little: the first product shows a small residual, the hint is
    # never asked for, and the solve is today's warm solve bit for bit.
    _, v0 = rotated(0.0)
    A, u = rotated(angle)
    op = Hinted(A, hint_near(u, 0.7))
    asked = []
    op.start_hint = lambda: asked.append(1) or op.hint
    new = top_eigenpairs(op, N, tol=1e-3, v0=v0, hint_residual=WARM_HINT_RESIDUAL)
    old = top_eigenpairs(Hinted(A, op.hint), N, tol=1e-3, v0=v0)  # the default: no choice
    assert new.start == "warm" and not asked
    assert new.n_matvecs == old.n_matvecs == op.products
    assert torch.equal(new.vectors, old.vectors) and torch.equal(new.values, old.values)
    check_top(new, A, 1e-3)


@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_a_stale_warm_start_takes_the_hint_and_costs_at_most_one_product_over_cold(tol):
    # After a catapult v1 has turned away (cos^2 with the old one 0.001) and the gradient points
    # along the new one (cos^2 0.7): the plain warm solve pays for the stale start, the choice
    # costs the cold solve plus the one product that revealed the stale start.
    _, v0 = rotated(0.0)
    A, u = rotated(2.0)
    assert (v0 @ u).item() ** 2 < 0.01
    hint = hint_near(u, 0.7)
    new = top_eigenpairs(Hinted(A, hint), N, tol=tol, v0=v0, hint_residual=WARM_HINT_RESIDUAL)
    old = top_eigenpairs(Hinted(A, hint), N, tol=tol, v0=v0)
    cold = top_eigenpairs(Hinted(A, hint), N, tol=tol)
    assert new.start == "warm+hint" and old.start == "warm" and cold.start == "cold"
    assert new.n_matvecs <= cold.n_matvecs + 1 and new.n_matvecs < old.n_matvecs, \
        (new.n_matvecs, cold.n_matvecs, old.n_matvecs)
    for r in (new, old, cold):
        check_top(r, A, tol)
    # Signs still follow the warm start.
    assert (new.vectors[:, 0] @ v0).item() >= 0


def test_a_useless_hint_still_gives_the_true_top_pair():
    # The hint orthogonal to the new top eigenvector (the gradient of quick.yaml's state is): the
    # combination is no better than v0, and the answer is still the top pair, not a lower one.
    _, v0 = rotated(0.0)
    A, u = rotated(1.0)
    res = top_eigenpairs(Hinted(A, hint_near(u, 0.0)), N, tol=1e-6, v0=v0, hint_residual=0.01)
    assert res.start == "warm+hint"
    check_top(res, A, 1e-6)


def test_the_choice_needs_a_hint_a_single_vector_and_a_warm_start():
    _, v0 = rotated(0.0)
    A, u = rotated(2.0)
    plain = top_eigenpairs(lambda x: A @ x, N, tol=1e-3, v0=v0, dtype=F64, hint_residual=WARM_HINT_RESIDUAL)
    assert plain.start == "warm"
    old = top_eigenpairs(lambda x: A @ x, N, tol=1e-3, v0=v0, dtype=F64, hint_residual=None)
    assert plain.n_matvecs == old.n_matvecs and torch.equal(plain.vectors, old.vectors)
    block = top_eigenpairs(Hinted(A, hint_near(u, 0.7)), N, k=2, tol=1e-3, v0=torch.stack([v0, u], 1),
                           hint_residual=WARM_HINT_RESIDUAL)
    assert block.start == "warm"  # top-k blocks keep the plain warm start
    zero_hint = top_eigenpairs(Hinted(A, torch.zeros(N, dtype=F64)), N, tol=1e-3, v0=v0,
                               hint_residual=WARM_HINT_RESIDUAL)
    default = top_eigenpairs(Hinted(A, hint_near(u, 0.7)), N, tol=1e-3, v0=v0)
    assert default.start == "warm" and default.n_matvecs == old.n_matvecs  # opt-in only
    assert zero_hint.start == "warm" and zero_hint.n_matvecs == old.n_matvecs  # asked, unusable: no product
    check_top(zero_hint, A, 1e-3)
    assert 0 < WARM_HINT_RESIDUAL < 1
