"""Curvature: oracles are dense Hessians (torch.func.hessian), closed forms and dense eigensolvers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from eosbranch.curvature import lanczos
from eosbranch.curvature import (
    flatten, hessian_matvec, preconditioned_matvec, top_eigenpairs, unflatten,
)
from eosbranch.loss import get_loss

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from oracles import dense_hessian
except ImportError:  # pragma: no cover
    from tests.oracles import dense_hessian

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only add synchronisation


def tiny_mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 3, 3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(12, 3))


def setting(kind: str, dtype=F64, n=24):
    """A tiny model and data set with a spectrum that has clear top gaps."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = (tiny_mlp() if kind == "mlp" else tiny_cnn()).to(dtype)
    shape = (n, 5) if kind == "mlp" else (n, 1, 6, 6)
    X = torch.randn(*shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, X, y


def dense_top(H, k):
    w, U = torch.linalg.eigh(H.to(F64))
    return w.flip(0)[:k], U.flip(1)[:, :k]


def sym_matrix(n, eigenvalues, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return ((Q * eigenvalues.to(F64)) @ Q.T).to(dtype)


# ------------------------------------------------------------------ dense reference
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_top3_matches_dense_hessian_float64(kind, loss):
    model, X, y = setting(kind)
    H = dense_hessian(model, loss, X, y)
    ref_vals, ref_vecs = dense_top(H, 3)
    hv = hessian_matvec(model, loss, (X, y))
    assert hv.dim == H.shape[0] > 64  # larger than the basis: the restart path is exercised
    r = top_eigenpairs(hv, hv.dim, k=3, tol=1e-11)
    assert r.converged
    torch.testing.assert_close(r.values, ref_vals, rtol=1e-8, atol=0)
    cos = (r.vectors.T @ ref_vecs).diagonal().abs()
    assert (cos >= 1 - 1e-8).all(), cos
    assert torch.allclose(r.vectors.T @ r.vectors, torch.eye(3, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_top3_matches_dense_hessian_float32(kind):
    model, X, y = setting(kind)
    ref_vals, ref_vecs = dense_top(dense_hessian(model, "mse", X, y), 3)
    model32 = model.float()
    hv = hessian_matvec(model32, "mse", (X.float(), y))
    r = top_eigenpairs(hv, hv.dim, k=3, tol=1e-5)
    assert r.vectors.dtype == torch.float32
    torch.testing.assert_close(r.values, ref_vals, rtol=1e-4, atol=0)
    cos = (r.vectors.double().T @ ref_vecs).diagonal().abs()
    assert (cos >= 1 - 1e-4).all(), cos


def test_linear_regression_closed_form():
    # f(x) = W x (no bias), MSE summed over outputs: H = (2/N) X^T X (x) I_o, each eigenvalue
    # of (2/N) X^T X repeated o times.
    N, d, o = 40, 30, 3
    g = torch.Generator().manual_seed(1)
    X = torch.randn(N, d, generator=g, dtype=F64) * torch.linspace(0.2, 2.0, d, dtype=F64)
    y = torch.randn(N, o, generator=g, dtype=F64)
    model = nn.Linear(d, o, bias=False).to(F64)
    hv = hessian_matvec(model, "mse", (X, y))
    xtx = torch.linalg.eigvalsh(X.T @ X).flip(0)
    expected = (2 / N) * xtx.repeat_interleave(o)
    r = top_eigenpairs(hv, hv.dim, k=4, tol=1e-10)
    assert r.converged
    torch.testing.assert_close(r.values, expected[:4], rtol=1e-9, atol=0)
    r1 = top_eigenpairs(hv, hv.dim, k=1, tol=1e-10)
    torch.testing.assert_close(r1.values[0], 2 / N * xtx[0], rtol=1e-9, atol=0)


def test_largest_algebraic_not_largest_magnitude():
    ev = torch.linspace(-1.0, 2.0, 200, dtype=F64)
    ev[0] = -10.0  # most negative, 5x larger in magnitude than the top
    A = sym_matrix(200, ev)
    r = top_eigenpairs(lambda x: A @ x, 200, k=2, tol=1e-10, dtype=F64)
    torch.testing.assert_close(r.values, ev.sort(descending=True).values[:2], rtol=1e-10, atol=0)


# ------------------------------------------------------------------ Hessian-vector products
def test_uneven_chunks_equal_unchunked():
    model, X, y = setting("mlp", n=10)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    full = hessian_matvec(model, "mse", (X, y))(v)
    chunked = hessian_matvec(model, "mse", (X, y), chunk_size=4)(v)  # chunks 4, 4, 2
    torch.testing.assert_close(chunked, full, rtol=1e-12, atol=1e-14)


def test_subset_is_the_hessian_of_the_subset():
    model, X, y = setting("mlp", n=20)
    idx = torch.tensor([3, 1, 4, 15, 9, 2, 6])
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=F64)
    got = hessian_matvec(model, "ce", (X, y), subset=idx, chunk_size=3)(v)
    torch.testing.assert_close(got, dense_hessian(model, "ce", X[idx], y[idx]) @ v)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hvp_methods_agree_with_dense(kind):
    model, X, y = setting(kind)
    H = dense_hessian(model, "ce", X, y)
    V = torch.randn(H.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    methods = ("double_backward", "forward_over_reverse") + (("r_operator",) if kind == "mlp" else ())
    for method in methods:
        hv = hessian_matvec(model, "ce", (X, y), method=method, chunk_size=7)
        torch.testing.assert_close(hv(V), H @ V, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hv(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_block_matvec_equals_columns(method):
    # also: chunked and single-chunk (cached gradient graph) paths on repeated calls
    model, X, y = setting("cnn")
    hv = hessian_matvec(model, "mse", (X, y), method=method)
    V = torch.randn(hv.dim, 4, dtype=F64)
    cols = torch.stack([hv(V[:, j]) for j in range(4)], dim=1)
    torch.testing.assert_close(hv(V), cols, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_batchnorm_buffers_untouched_and_hessian_exact(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(48, 2)).to(F64)
    X, y = torch.randn(12, 1, 6, 6, dtype=F64), torch.randint(0, 2, (12,))
    before = {n: b.clone() for n, b in model.named_buffers()}
    params = list(model.parameters())
    V = torch.randn(sum(p.numel() for p in params), 2, dtype=F64)

    def grad_at(flat):  # plain autograd on a copy (training mode: batch statistics)
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(m.parameters(), unflatten(flat, params)):
                p.copy_(t)
        return flatten(torch.autograd.grad(get_loss("ce")(m(X), y), list(m.parameters())))

    # Oracle: central differences of the gradient. (torch.func.hessian is not one here: through
    # BatchNorm it returns an asymmetric matrix that finite differences contradict.)
    theta, h = flatten([p.detach() for p in params]), 1e-5
    fd = torch.stack([(grad_at(theta + h * v) - grad_at(theta - h * v)) / (2 * h) for v in V.T], 1)
    got = hessian_matvec(model, "ce", (X, y), method=method)(V)
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


# ------------------------------------------------------------------ solver behaviour
def test_warm_start_needs_fewer_matvecs():
    model, X, y = setting("mlp", n=40)
    hv = hessian_matvec(model, "mse", (X, y))
    prev = top_eigenpairs(hv, hv.dim, k=1, tol=1e-6)
    with torch.no_grad():  # a slightly different operator: perturb the weights
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    hv = hessian_matvec(model, "mse", (X, y))
    cold = top_eigenpairs(hv, hv.dim, k=1, tol=1e-6)
    warm = top_eigenpairs(hv, hv.dim, k=1, tol=1e-6, v0=prev.vectors)
    assert cold.converged and warm.converged
    assert not torch.allclose(cold.values, prev.values, rtol=1e-6, atol=0)  # the operator moved
    assert warm.n_matvecs < cold.n_matvecs, (warm.n_matvecs, cold.n_matvecs)
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-9, atol=0)


def test_warm_start_block_for_top_k():
    A = sym_matrix(150, torch.cat([torch.tensor([5.0, 4.5, 4.0]), torch.linspace(-1, 3, 147)]))
    prev = top_eigenpairs(lambda x: A @ x, 150, k=3, tol=1e-8, dtype=F64)
    B = A + 1e-4 * sym_matrix(150, torch.linspace(-1, 1, 150), seed=3)
    cold = top_eigenpairs(lambda x: B @ x, 150, k=3, tol=1e-8, dtype=F64)
    warm = top_eigenpairs(lambda x: B @ x, 150, k=3, tol=1e-8, v0=prev.vectors)
    assert warm.converged and warm.n_matvecs < cold.n_matvecs
    torch.testing.assert_close(warm.values, cold.values, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_reported_residuals_are_true(dtype):
    A = sym_matrix(300, torch.linspace(-3, 4, 300), dtype=dtype)
    r = top_eigenpairs(lambda x: A @ x, 300, k=2, tol=1e-3, dtype=dtype)
    assert r.converged
    true = (A.double() @ r.vectors.double() - r.vectors.double() * r.values).norm(dim=0)
    floor = 100 * torch.finfo(dtype).eps * 4  # rounding level of the product itself
    torch.testing.assert_close(r.residuals, true, rtol=1e-3, atol=floor)
    assert (true <= 1e-3 * r.values.abs() + floor).all()
    assert torch.allclose(r.vectors.norm(dim=0).double(), torch.ones(2, dtype=F64), atol=1e-6)


def test_budget_exhausted_is_not_converged():
    A = sym_matrix(300, torch.linspace(-3, 4, 300))
    r = top_eigenpairs(lambda x: A @ x, 300, k=1, tol=1e-8, max_matvecs=3, dtype=F64)
    assert not r.converged and r.n_matvecs == 3
    true = (A @ r.vectors[:, 0] - r.values[0] * r.vectors[:, 0]).norm()
    assert true > 1e-8 * r.values[0].abs()
    torch.testing.assert_close(r.residuals[0], true, rtol=1e-6, atol=1e-12)


def test_block_matvec_used_for_k_gt_1():
    A = sym_matrix(100, torch.linspace(0, 1, 100))
    shapes = []

    def mv(x):
        shapes.append(tuple(x.shape))
        return A @ x

    r = top_eigenpairs(mv, 100, k=3, tol=1e-6, dtype=F64)
    assert set(shapes) == {(100, 3)} and r.n_matvecs == 3 * len(shapes)


def test_sign_alignment_with_v0():
    A = sym_matrix(120, torch.linspace(-1, 3, 120))
    ref = top_eigenpairs(lambda x: A @ x, 120, k=2, tol=1e-8, dtype=F64).vectors
    for signs in ([1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]):
        v0 = ref * torch.tensor(signs, dtype=F64) + 0.01 * torch.randn(120, 2, dtype=F64)
        r = top_eigenpairs(lambda x: A @ x, 120, k=2, tol=1e-8, v0=v0)
        assert ((r.vectors * v0).sum(0) > 0).all()
    # Without warm start, the sign is fixed: the largest-magnitude component is positive.
    r = top_eigenpairs(lambda x: A @ x, 120, k=2, tol=1e-8, dtype=F64)
    assert (r.vectors.gather(0, r.vectors.abs().argmax(0, keepdim=True)) > 0).all()


def test_operator_is_a_snapshot_of_the_parameters():
    model, X, y = setting("mlp")
    hv = hessian_matvec(model, "mse", (X, y))
    v = torch.randn(hv.dim, dtype=F64)
    before = hv(v)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.testing.assert_close(hv(v), before, rtol=0, atol=0)
    assert not torch.allclose(hessian_matvec(model, "mse", (X, y))(v), before)


def test_flatten_unflatten_round_trip():
    like = [torch.zeros(2, 3), torch.zeros(4), torch.zeros(1, 1, 2)]
    vec = torch.arange(12.0)
    parts = unflatten(vec, like)
    assert [p.shape for p in parts] == [t.shape for t in like]
    assert torch.equal(flatten(parts), vec)
    block = torch.stack([vec, -vec], dim=1)  # [dim, 2] -> batch-first pieces
    parts = unflatten(block, like)
    assert parts[0].shape == (2, 2, 3) and torch.equal(parts[0][1], -vec[:6].reshape(2, 3))


def test_deterministic_bit_for_bit():
    model, X, y = setting("mlp")
    hv = hessian_matvec(model, "mse", (X, y))
    a = top_eigenpairs(hv, hv.dim, k=2, tol=1e-6)
    torch.manual_seed(123)  # global RNG state must not matter
    b = top_eigenpairs(hv, hv.dim, k=2, tol=1e-6)
    assert torch.equal(a.values, b.values) and torch.equal(a.vectors, b.vectors)
    assert a.n_matvecs == b.n_matvecs


def test_basis_storage_kept_between_solves_changes_nothing():
    """The basis storage a CPU solve leaves for the next one (dirty, possibly larger) gives the same
    result bit for bit as fresh storage, and is actually reused."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=F64))[0]
    A = Q @ torch.diag(torch.cat([torch.tensor([10.0, 9.0, 8.0], dtype=F64), torch.rand(57, generator=g, dtype=F64)])) @ Q.T
    B = torch.randn(90, 90, generator=g, dtype=F64)
    B = B + B.T
    lanczos.release_workspace()
    fresh = top_eigenpairs(lambda x: A @ x, 60, k=3, tol=1e-10, dtype=F64)
    top_eigenpairs(lambda x: B @ x, 90, k=4, tol=1e-10, dtype=F64)  # leaves a larger, written basis
    spare = lanczos._spare_basis[0].data_ptr()
    again = top_eigenpairs(lambda x: A @ x, 60, k=3, tol=1e-10, dtype=F64)
    assert lanczos._spare_basis[0].data_ptr() == spare  # the kept storage served this solve
    assert torch.equal(fresh.values, again.values) and torch.equal(fresh.vectors, again.vectors)
    top_eigenpairs(lambda x: A.float() @ x, 60, k=3, tol=1e-4, dtype=torch.float32)  # another dtype: new storage
    assert lanczos._spare_basis[0].dtype == torch.float32
    lanczos.release_workspace()
    assert not lanczos._spare_basis


@pytest.fixture(params=["every step", "spaced checks"])
def check_schedule(request, monkeypatch):
    # "spaced checks" is the accelerator schedule: several steps between host reads, so a rank
    # breakdown is found late and repaired by rolling back; exercised here on CPU.
    if request.param == "spaced checks":
        monkeypatch.setattr(lanczos, "_host_reads_are_free", lambda device: False)
    return request.param


def test_rank_deficient_operator_and_breakdown(check_schedule):
    # Exact eigenvectors as start vectors make the Krylov space invariant at once; a diagonal
    # operator makes the QR of the next block exactly singular. The block solver must still find
    # all k wanted pairs (multiplicity 3 here) with an orthonormal basis.
    A = torch.diag(torch.cat([torch.full((3,), 2.0), torch.linspace(0, 1, 97)])).to(F64)
    e = torch.eye(100, dtype=F64)
    for v0 in (None, e[:, [3, 50]], e[:, [0, 1, 2, 3]]):
        r = top_eigenpairs(lambda x: A @ x, 100, k=4, tol=1e-10, dtype=F64, v0=v0)
        torch.testing.assert_close(r.values, torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=F64))
        assert torch.allclose(r.vectors.T @ r.vectors, torch.eye(4, dtype=F64), atol=1e-12)
        true = (A @ r.vectors - r.vectors * r.values).norm(dim=0)
        torch.testing.assert_close(r.residuals, true, rtol=0, atol=1e-12)
    # A single start vector in the null space: the first product is exactly zero.
    r = top_eigenpairs(lambda x: A @ x, 100, k=1, tol=1e-10, v0=e[:, 3])
    torch.testing.assert_close(r.values, torch.tensor([2.0], dtype=F64))


def test_low_rank_kronecker_with_restarts(check_schedule):
    # H = (2/N) X^T X (x) I_o: rank N*o, each eigenvalue o-fold. A small basis forces restarts;
    # the default one reaches the rank and breaks down (near-zero new block, rebuilt carefully).
    N, d, o = 8, 40, 3
    X = torch.randn(N, d, dtype=F64, generator=torch.Generator().manual_seed(4))
    H = torch.kron(2 / N * X.T @ X, torch.eye(o, dtype=F64))
    top = torch.linalg.eigvalsh(H).flip(0)
    for max_basis in (24, 64):
        r = top_eigenpairs(lambda x: H @ x, d * o, k=4, tol=1e-10, dtype=F64, max_basis=max_basis)
        assert r.converged
        torch.testing.assert_close(r.values, top[:4], rtol=1e-9, atol=0)
        assert torch.allclose(r.vectors.T @ r.vectors, torch.eye(4, dtype=F64), atol=1e-12)


def test_top3_dense_with_spaced_checks(monkeypatch):
    monkeypatch.setattr(lanczos, "_host_reads_are_free", lambda device: False)
    model, X, y = setting("cnn")
    ref_vals, _ = dense_top(dense_hessian(model, "ce", X, y), 3)
    hv = hessian_matvec(model, "ce", (X, y))
    r = top_eigenpairs(hv, hv.dim, k=3, tol=1e-10)
    assert r.converged
    torch.testing.assert_close(r.values, ref_vals, rtol=1e-8, atol=0)


# ------------------------------------------------------------------ preconditioned sharpness
def test_preconditioned_sharpness_matches_dense():
    model, X, y = setting("mlp")
    H = dense_hessian(model, "ce", X, y)
    diag = torch.rand(H.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5)) + 0.05
    dense = torch.linalg.eigvals(torch.diag(1 / diag) @ H).real.max()
    op = preconditioned_matvec(hessian_matvec(model, "ce", (X, y)), diag)
    r = top_eigenpairs(op, H.shape[0], k=1, tol=1e-10)
    torch.testing.assert_close(r.values[0], dense, rtol=1e-8, atol=0)
    w = r.vectors[:, 0] / diag.sqrt()  # mapped back: an eigenvector of P^-1 H
    torch.testing.assert_close((H @ w) / diag, r.values[0] * w, rtol=1e-7, atol=1e-9)
    # Its cold-start hint is the gradient in the operator's coordinates, D^-1/2 g.
    grad = flatten(torch.autograd.grad(get_loss("ce")(model(X), y), list(model.parameters())))
    torch.testing.assert_close(op.start_hint(), grad / diag.sqrt(), rtol=1e-12, atol=1e-14)
    assert preconditioned_matvec(hessian_matvec(model, "ce", (X, y), chunk_size=7), diag).start_hint() is None


# ------------------------------------------------------------------ cold start along a free hint
def test_start_hint_is_the_full_batch_gradient_when_free():
    model, X, y = setting("mlp")
    loss = get_loss("mse")(model(X), y)
    grad = flatten(torch.autograd.grad(loss, list(model.parameters())))
    for method in ("r_operator", "double_backward"):  # the first is this MLP's default
        hint = hessian_matvec(model, "mse", (X, y), method=method).start_hint()
        torch.testing.assert_close(hint, grad, rtol=1e-12, atol=1e-14)
    # Not free with chunks (each product rebuilds its graph) or forward-over-reverse: no hint.
    assert hessian_matvec(model, "mse", (X, y), chunk_size=7).start_hint() is None
    assert hessian_matvec(model, "mse", (X, y), method="forward_over_reverse").start_hint() is None


class _Hinted:
    """A dense symmetric operator offering a start direction, counting products."""

    def __init__(self, A, hint):
        self.A, self.hint, self.dim, self.dtype = A, hint, A.shape[0], A.dtype

    def __call__(self, x):
        return self.A @ x

    def start_hint(self):
        return self.hint


def test_cold_start_along_an_aligned_hint_saves_products():
    evals = torch.cat([torch.tensor([10.0, 9.0]), torch.linspace(-8.0, 8.5, 298)])
    A = sym_matrix(300, evals)
    w, U = dense_top(A, 2)
    hint = U[:, 0] + 0.3 * U[:, 1] + 0.05 * torch.randn(300, generator=torch.Generator().manual_seed(5), dtype=F64)
    plain = top_eigenpairs(lambda x: A @ x, 300, k=1, tol=1e-8, dtype=F64)
    hinted = top_eigenpairs(_Hinted(A, hint), 300, k=1, tol=1e-8)
    assert plain.converged and hinted.converged
    assert hinted.n_matvecs < plain.n_matvecs, (hinted.n_matvecs, plain.n_matvecs)
    torch.testing.assert_close(hinted.values, w[:1], rtol=1e-10, atol=0)


def test_hint_orthogonal_to_the_top_eigenvector_still_finds_it():
    # The hint spans only the second eigenvector: Krylov from it alone would certify lambda_2.
    A = sym_matrix(200, torch.cat([torch.tensor([6.0, 5.0]), torch.linspace(-1.0, 4.0, 198)]))
    w, U = dense_top(A, 2)
    res = top_eigenpairs(_Hinted(A, U[:, 1].clone()), 200, k=1, tol=1e-8)
    assert res.converged
    torch.testing.assert_close(res.values, w[:1], rtol=1e-10, atol=0)
    assert abs(float(res.vectors[:, 0] @ U[:, 0])) > 1 - 1e-8


def test_unusable_hint_falls_back_to_random():
    A = sym_matrix(60, torch.linspace(-2.0, 3.0, 60))
    w, _ = dense_top(A, 1)
    for hint in (torch.zeros(60, dtype=F64), torch.full((60,), float("nan"), dtype=F64), None):
        res = top_eigenpairs(_Hinted(A, hint), 60, k=1, tol=1e-8)
        assert res.converged and not torch.isnan(res.values).any()
        torch.testing.assert_close(res.values, w, rtol=1e-10, atol=0)
