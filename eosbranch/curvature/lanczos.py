"""Matrix-free top eigenpairs by block Lanczos (DESIGN §2 "Sharpness", §5).

``top_eigenpairs`` runs block Lanczos on any symmetric matvec (``hessian_matvec``'s, in
``eosbranch.curvature.operator``) and returns the k largest *algebraic* eigenpairs with their true
residuals.

Solver outline (why each piece is there):
- block Lanczos, block size max(k, columns of v0) unless ``block_size`` is given: top-k and warm
  starts from k previous vectors cost one batched product per step instead of k sequential ones,
  and a block (unlike a single vector) finds repeated eigenvalues;
- full reorthogonalisation, applied twice ("twice is enough"), so the basis stays orthonormal and
  no ghost eigenvalues appear; the full coefficient matrix T (A V = V T) is kept, so thick
  restarts and rank repairs need no special cases;
- the small projected problem is solved in float64 on the host; residuals ||A y - theta y|| come
  from the Krylov relation, exact up to rounding, at no extra products;
- thick restart keeping the top half of the Ritz vectors when the basis reaches ``max_basis``;
- the hot loop never reads device values; convergence (and a rank check) is examined every step
  on CPU, where a host read is free, and every 1 + step // 8 steps elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .flat import project_out as _project_out
from .warm_start import _cold_start_hint, _hint_row, _join_hint

__all__ = ["EigenResult", "top_eigenpairs", "release_workspace"]

@dataclass
class EigenResult:
    """``values`` [k] descending and ``residuals`` [k] (float64, CPU); ``vectors`` [dim, k], unit
    columns, in the solver dtype on the solver device."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    n_matvecs: int
    converged: bool
    # [k] float64: estimated distance of each value to the rest of the spectrum, from the final
    # Ritz values (see ``_ritz_gaps``); NaN where the basis holds fewer than two lower ones.
    # ``eosbranch.eigen_error`` turns residual / gap into an angle bound (Davis-Kahan).
    gaps: Tensor | None = None
    # How the warm start went: "cold", "warm", or "warm+hint" (the gradient hint joined a poor v0).
    start: str = "cold"


# ----------------------------------------------------------------------------- block Lanczos
def _orthonormalize(W: Tensor, basis: Tensor, gen: torch.Generator, floor: float):
    """Careful column-by-column CGS2 of the rows of W against ``basis`` and each other.

    Returns Q (rows orthonormal), R (upper), C with W = C basis + R^T Q, and how many rows were
    replaced. A row left with norm <= floor is numerically in the span (breakdown): it is replaced
    by a seeded random direction with a zero coefficient, so the Krylov space keeps growing.
    Rare path: reads norms.
    """
    b, n = W.shape[0], basis.shape[0]
    Q, R, C = torch.zeros_like(W), W.new_zeros(b, b), W.new_zeros(b, n)
    replaced = 0
    for j in range(b):
        full = torch.cat([basis, Q[:j]])
        w = W[j:j + 1].clone()
        h = _project_out(full, w)[0]
        C[j], R[:j, j] = h[:n], h[n:]
        nrm = w.norm()
        if nrm.item() > floor:
            Q[j], R[j, j] = w[0] / nrm, nrm
            continue
        for _ in range(4):  # a random vector is in the span with probability 0; retry defensively
            r = torch.randn(1, W.shape[1], generator=gen, dtype=W.dtype).to(W.device)
            r /= r.norm()
            _project_out(full, r)
            if r.norm().item() > 0.1:
                break
        Q[j] = r[0] / r.norm()
        replaced += 1
    return Q, R, C, replaced


def _ritz(T: Tensor, n_done: int, n_total: int):
    """Ritz pairs of the projected matrix (float64, host), descending, with residual norms.

    A V_done = V_total T[:n_total, :n_done], so for y = V_done s: ||A y - theta y|| =
    ||T s - theta [s; 0]||, exact up to rounding with an orthonormal basis. NumPy rather than
    torch: the matrix is tiny, and each torch call costs more than the arithmetic."""
    Th = T[:n_total, :n_done].to("cpu", torch.float64).numpy()
    sym = Th[:n_done]
    theta, S = np.linalg.eigh(0.5 * (sym + sym.T))
    theta, S = theta[::-1].copy(), S[:, ::-1].copy()
    R = Th @ S
    R[:n_done] -= S * theta
    return theta, S, np.linalg.norm(R, axis=0)


# A solve's basis (rows x dim) is its largest allocation. On CPU a fresh one is a new mapping
# from the OS, and writing a row faults its pages in: 0.1 ms per row at 25k parameters, 4 ms at
# 1.8M, as much as the rest of a Lanczos step on small models. So the last basis's storage is kept
# for the next solve (what the caching allocator does on CUDA); resident memory is only the rows
# ever written, and ``release_workspace()`` frees it.
_spare_basis: list[Tensor] = []


def _basis_storage(rows: int, dim: int, dtype, device) -> Tensor:
    """A flat tensor of at least rows * dim entries: the spare one when it fits, else new."""
    if device.type == "cpu" and _spare_basis:
        spare = _spare_basis.pop()  # taken, so a concurrent solve cannot share it
        if spare.dtype == dtype and spare.numel() >= rows * dim:
            return spare
    return torch.empty(rows * dim, dtype=dtype, device=device)


def release_workspace() -> None:
    """Free the basis storage kept between solves (CPU only; see ``_basis_storage``)."""
    _spare_basis.clear()


def _host_reads_are_free(device: torch.device) -> bool:
    # On CPU a host read costs nothing, so convergence is checked every step; on an accelerator
    # each read stalls the queue, so checks are spaced out (tests patch this to cover both).
    return device.type == "cpu"


def _resolve(dtype, device, v0, matvec):
    dtype = dtype or (v0.dtype if v0 is not None and v0.is_floating_point() else None) \
        or getattr(matvec, "dtype", None) or torch.get_default_dtype()
    device = device or (v0.device if v0 is not None else None) or getattr(matvec, "device", None) or "cpu"
    return dtype, torch.device(device)


# Rows of the Lanczos basis reserved up front, in blocks (see top_eigenpairs).
INITIAL_BASIS_BLOCKS = 16


def _ritz_gaps(theta: np.ndarray, res: np.ndarray, k: int) -> np.ndarray:
    """For each of the top k Ritz values, the distance to the nearest other Ritz value widened by
    that value's residual (an interval [theta_i - res_i, theta_i + res_i] holds an eigenvalue):
    the gap that the Davis-Kahan sin-theta bound needs, estimated from the basis at no cost.
    Without two Ritz values below theta_j, NaN: no estimate (the one lower Ritz value of a
    two-vector basis averages the whole lower spectrum and sits far below lambda_2; on the tiny
    models of tests/test_eigen_error.py it made the bound fail)."""
    gaps = np.full(k, np.nan)
    for j in range(min(k, theta.size - 2)):
        others = np.delete(np.arange(theta.size), j)
        gaps[j] = np.min(np.abs(theta[others] - theta[j]) - res[others])
    return gaps


def top_eigenpairs(matvec: Callable[[Tensor], Tensor], dim: int, k: int = 1, tol: float = 1e-3,
                   v0: Tensor | None = None, max_matvecs: int | None = None, dtype=None, device=None,
                   *, block_size: int | None = None, max_basis: int = 64, seed: int = 0,
                   hint_residual: float | None = None) -> EigenResult:
    """The k largest algebraic eigenpairs of a symmetric operator given only by ``matvec``.

    ``matvec`` maps a [dim] vector (block size 1) or a [dim, m] block to its product.
    Converged means every returned pair has ||A v - lambda v|| <= tol * |lambda|.
    ``v0`` ([dim] or [dim, m]) warm-starts the block; signs then satisfy <v_j, v0_j> >= 0, else the
    largest-magnitude component of each vector is positive. Without ``v0``, an operator with a
    ``start_hint()`` method (``hessian_matvec``'s: the full-batch gradient, free from its cached
    graph) seeds the first start vector with that direction plus a small random part; other
    columns are random. With a single warm vector (k = 1, block size 1) whose first product leaves
    a relative residual above ``hint_residual`` (a stale v0, e.g. after a catapult), the hint
    joins it: one more product, then Lanczos from the better of their combinations (see
    ``_join_hint`` and ``WARM_HINT_RESIDUAL``); ``hint_residual=None`` (default) never does.
    ``max_matvecs`` counts single-vector products (default 1000; at least one block step is always
    taken). ``max_basis`` bounds the stored basis (memory dim x max_basis) before a thick restart.
    Deterministic: the random start comes from a local generator seeded with ``seed``.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"top_eigenpairs: need 1 <= k <= dim, got k={k}, dim={dim}")
    dtype, device = _resolve(dtype, device, v0, matvec)
    eps = torch.finfo(dtype).eps
    V0 = None if v0 is None else v0.detach().reshape(dim, -1).to(device=device, dtype=dtype)
    m = 0 if V0 is None else V0.shape[1]
    b = min(block_size or max(k, m), dim)
    cap = max(max_basis, 4 * b, 2 * (k + b))  # room to restart: p <= cap/2 kept + two blocks
    cap = min(cap, dim)
    budget = max(1000 if max_matvecs is None else int(max_matvecs), b)
    gen = torch.Generator().manual_seed(seed)

    # Start block: v0 columns first, seeded random columns after; rows of V are basis vectors.
    # (Random rows are drawn only where no v0 column stands: at a million parameters a draw costs
    # a tenth of a gradient.)
    start = torch.empty(b, dim, dtype=dtype, device=device)
    n_given = min(m, b)  # extra v0 columns beyond the block are dropped
    if n_given:
        start[:n_given] = V0[:, :b].T
    if n_given < b:
        start[n_given:] = torch.randn(b - n_given, dim, generator=gen, dtype=dtype).to(device)
    start /= start.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    if not m:
        _cold_start_hint(matvec, start, dim, dtype, device)
    # The basis grows on demand (doubling up to cap rows): most solves stop after a few steps, and
    # allocating dim x cap up front can cost more than the products for large models. The first
    # INITIAL_BASIS_BLOCKS blocks are reserved at once (torch.empty: pages are touched only when a
    # row is written), so a typical solve never copies its basis to grow it.
    rows = min(cap, INITIAL_BASIS_BLOCKS * b)
    storage = _basis_storage(rows, dim, dtype, device)
    V = storage[:rows * dim].view(rows, dim)
    if b == 1 and start.norm().item() > 0.5:  # one unit row (not a zero v0): nothing to orthogonalise
        V[:1] = start
    else:
        V[:b] = _orthonormalize(start, start[:0], gen, 10 * eps * math.sqrt(b))[0]
    # Rows below `fresh` include random replacements for a breakdown: until they have been
    # multiplied, the basis spans an invariant subspace (e.g. v0 made of exact eigenvectors)
    # whose pairs look converged but may not be the top ones.
    fresh = 0
    T = torch.zeros(cap, cap, dtype=dtype, device=device)  # A V[:n_done]^T = V[:n_total]^T T
    colnorm = torch.zeros(cap, dtype=dtype, device=device)
    n_done, n_total, n_mv, steps, checked, next_check = 0, b, 0, 0, b, 1
    every_step = _host_reads_are_free(device)
    blocks = []  # (a, c, c + nb): expanding rows a:c created rows c:c+nb, since the last check
    start_kind = "warm" if m else "cold"
    may_join = m == 1 and b == 1 and hint_residual is not None and cap >= 2

    while True:
        a, c = n_done, n_total
        W = matvec(V[a].clone() if c - a == 1 else V[a:c].T)
        # Rows = products. One product is reshaped, not transposed: a [1, dim] view with strides
        # (1, 1) makes every later copy of the row walk it element by element (30x slower).
        W = (W.reshape(1, dim) if c - a == 1 else W.reshape(dim, c - a).T).to(dtype).contiguous()
        n_mv += c - a
        steps += 1
        T[:c, a:c] = _project_out(V[:c], W).T
        nb = min(c - a, dim - c)
        if nb:
            if c + nb > V.shape[0]:
                rows = min(cap, max(c + nb, 2 * V.shape[0]))
                storage = torch.empty(rows * dim, dtype=dtype, device=device)
                grown = storage.view(rows, dim)
                grown[:c] = V[:c]
                V = grown
            if c - a == 1:  # a single vector: QR is a normalisation, written straight into the basis
                Rn = torch.linalg.vector_norm(W).reshape(1, 1)
                torch.div(W, Rn.clamp_min(torch.finfo(dtype).tiny), out=V[c:c + 1])  # a zero row stays zero
            else:
                Qn, Rn = torch.linalg.qr(W.T)  # no host read here; rank problems are caught below
                V[c:c + nb] = Qn.T[:nb]
            T[c:c + nb, a:c] = Rn[:nb]
            colnorm[c:c + nb] = Rn.diagonal()[:nb].abs()
            blocks.append((a, c, c + nb))
        n_done, n_total = c, c + nb

        def stop_flags():
            full = n_total == n_done  # the basis spans the whole space: Ritz pairs are exact
            return (full, n_done >= k and n_mv + (n_total - n_done) > budget,
                    not full and cap < dim and n_total + b > cap)

        full, out_of_budget, need_restart = stop_flags()
        if not (full or out_of_budget or need_restart or every_step or steps >= next_check):
            continue
        next_check = steps + 1 + steps // 8
        theta, S, res = _ritz(T, n_done, n_total)  # NumPy: the checks below are host arithmetic
        scale = float(np.abs(theta).max())
        # Rank check: a new row much shorter than ||A|| may be a QR artefact of a (near) breakdown,
        # not orthogonal to the basis. Roll back to the block that made it and rebuild it carefully.
        suspect = np.flatnonzero(colnorm[checked:n_total].cpu().numpy() <= math.sqrt(eps) * scale)  # <=: exact zeros
        if suspect.size:
            j = checked + int(suspect[0])
            a, c, e = next(blk for blk in blocks if blk[1] <= j < blk[2])
            Wr = T[c:e, a:c].T @ V[c:e]  # the orthogonalised products, rows a:c
            Q, R, C, replaced = _orthonormalize(Wr, V[:c], gen, 10 * eps * scale * math.sqrt(c))
            fresh = e if replaced else fresh
            T[:, c:] = 0
            T[e:] = 0
            V[c:e], T[c:e, a:c] = Q[:e - c], R[:e - c]
            T[:c, a:c] += C.T
            n_done, n_total = c, e
            full, out_of_budget, need_restart = stop_flags()
            theta, S, res = _ritz(T, n_done, n_total)
        checked, blocks = n_total, []
        converged = (n_done >= max(k, fresh) or full) and bool((res[:k] <= tol * np.abs(theta[:k])).all())
        if converged or full or out_of_budget:
            break
        if may_join and steps == 1 and res[0] > hint_residual * abs(theta[0]) and n_mv < budget:
            may_join = False
            h = _hint_row(matvec, V[0], dim, dtype, device)
            joined = None if h is None else _join_hint(matvec, V, T, h, dtype)
            n_mv += h is not None
            if joined is not None:  # the basis restarts as (u, r): A u = theta u + beta r
                V[0], V[1], theta0, beta = joined
                T.zero_()
                T[0, 0], T[1, 0] = theta0, beta
                colnorm[1] = beta
                start_kind = "warm+hint"
                continue
        if need_restart:  # thick restart: keep the top p Ritz vectors and the unexpanded block
            p = min(n_done, max(k, cap // 2))
            Sp = torch.from_numpy(S[:, :p].copy()).to(device=device, dtype=dtype)
            Y = Sp.T @ V[:n_done]
            coupling = T[n_done:n_total, :n_done] @ Sp
            q = n_total - n_done
            V[p:p + q] = V[n_done:n_total].clone()
            V[:p] = Y
            T.zero_()
            T[:p, :p] = torch.diag(torch.from_numpy(theta[:p].copy()).to(device=device, dtype=dtype))
            T[p:p + q, :p] = coupling
            fresh = p + q if fresh > n_done else 0
            n_done, n_total, checked = p, p + q, p + q

    vectors = (torch.from_numpy(S[:, :k].copy()).to(device=device, dtype=dtype).T @ V[:n_done]).T
    vectors = vectors / vectors.norm(dim=0, keepdim=True)
    # Deterministic signs: agree with the warm start where there is one, else the
    # largest-magnitude component is positive.
    ref = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))[0]
    if m:
        j = min(m, k)
        ref[:j] = (vectors[:, :j] * V0[:, :j]).sum(0)
    vectors = vectors * torch.where(ref < 0, -1.0, 1.0).to(dtype)
    if device.type == "cpu":
        _spare_basis[:] = [storage]
    return EigenResult(torch.from_numpy(theta[:k].copy()), vectors, torch.from_numpy(res[:k].copy()), n_mv, converged,
                       torch.from_numpy(_ritz_gaps(theta, res, k)), start_kind)
