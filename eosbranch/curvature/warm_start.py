"""Where a Lanczos solve starts: the operator's free gradient hint, alone (a cold start) or joined
to a stale warm start v0 (opt-in), for ``eosbranch.curvature.lanczos.top_eigenpairs``."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .flat import project_out as _project_out

__all__ = ["HINT_RANDOM_WEIGHT", "WARM_HINT_RESIDUAL", "LOSS_JUMP", "stale_warm_start"]

# Weight of the seeded random part mixed into a start hint: it keeps every eigenvector present in
# the start (a hint exactly orthogonal to v1 must not yield a certified lambda_2), yet small
# enough not to slow convergence (4 products instead of 6 at 0.01-0.03 in the CIFAR-shaped
# benchmark setting, 5 at 0.1).
HINT_RANDOM_WEIGHT = 0.03


def _cold_start_hint(matvec, start: Tensor, dim: int, dtype, device) -> None:
    """Replace the first (unit, random) start row by hint + HINT_RANDOM_WEIGHT * that row, where
    the operator offers a free direction (``matvec.start_hint()``; HessianOperator: the gradient)."""
    hint_fn = getattr(matvec, "start_hint", None)
    hint = hint_fn() if callable(hint_fn) else None
    if hint is None:
        return
    hint = hint.detach().reshape(-1).to(device=device, dtype=dtype)
    norm = hint.norm()
    if hint.numel() != dim or not torch.isfinite(norm) or norm.item() <= torch.finfo(dtype).tiny:
        return  # no usable direction (e.g. the gradient vanishes at a minimum): stay random
    row = hint / norm + HINT_RANDOM_WEIGHT * start[0]
    start[0] = row / row.norm()


# Suggested ``hint_residual`` (opt-in; the default None keeps the plain warm start). A warm start
# v0 whose first product leaves a relative residual ||A v0 - theta v0|| / |theta| above it is
# taken as stale and the gradient hint joins it (``_join_hint``); below it the solve is the plain
# warm one, product for product. Measured with benchmarks/measurement.py (CIFAR-shaped MLP,
# float32, tol 1e-3; products joined / plain warm / cold): the first residual is 0.17 at the EoS
# state (N = 2,000 and 10,000: no join, 4 / 4 / 5); after a catapult (residual 7.2, 7.0) 20 / 19 /
# 19 at N = 2,000 and 13 / 10 / 14 at N = 10,000; at its peak (residual 9.3, 2.4) 4 / 5 / 3 and
# 7 / 5 / 6. The join pays the product that revealed the stale v0 and drops v0's Krylov
# direction, so it won only once in four: not the default.
WARM_HINT_RESIDUAL = 0.5


def _hint_row(matvec, first: Tensor, dim: int, dtype, device) -> Tensor | None:
    """The operator's start hint (the gradient) orthogonalised against the unit row ``first``
    and normalised, or None where there is no usable hint."""
    hint_fn = getattr(matvec, "start_hint", None)
    hint = hint_fn() if callable(hint_fn) else None
    if hint is None or hint.numel() != dim:
        return None
    h = hint.detach().reshape(1, dim).to(device=device, dtype=dtype).clone()
    norm = h.norm()
    if not torch.isfinite(norm) or norm.item() <= torch.finfo(dtype).tiny:
        return None
    h /= norm
    _project_out(first.reshape(1, dim), h)
    norm = h.norm()
    if norm.item() <= 1e-3:  # the hint is (almost) v0 itself: it adds nothing
        return None
    return h / norm


def _join_hint(matvec, V: Tensor, T: Tensor, h: Tensor, dtype):
    """Rayleigh-Ritz on span{v0, hint}, then single-vector Lanczos from the better combination.

    V[0] = v0 is multiplied (A v0 = T[0,0] V[0] + T[1,0] V[1]); one product A h gives the 2x2
    projected problem, whose top Ritz vector u is at least as good as either start in the
    Rayleigh-quotient sense. Its residual lies in the span of the two orthogonalised products,
    so the Krylov relation A u = theta u + beta r holds exactly and the solve goes on from
    (u, r) with no further product. Returns the new rows (u, r) and (theta, beta), or None where
    the new residual vanishes (leave the plain warm solve alone)."""
    dim = V.shape[1]
    Av0 = T[0, 0] * V[0] + T[1, 0] * V[1]
    Ah = matvec(h[0].clone()).reshape(1, dim).to(dtype)
    X = torch.cat([V[:1], h])
    W = torch.cat([Av0.reshape(1, dim), Ah])
    C = _project_out(X, W)  # W now holds the residual parts, C the 2x2 projection (rows = products)
    Q, R = torch.linalg.qr(W.T)
    M = C.T.to("cpu", torch.float64).numpy()
    theta, S = np.linalg.eigh(0.5 * (M + M.T))
    s = S[:, -1]
    coef = R.to("cpu", torch.float64).numpy() @ s  # residual of u in the basis Q
    beta = float(np.linalg.norm(coef))
    if beta <= math.sqrt(torch.finfo(dtype).eps) * abs(theta[-1]):
        return None
    st = torch.from_numpy(s.copy()).to(device=V.device, dtype=dtype)
    u = st @ X
    r = Q @ torch.from_numpy(coef / beta).to(device=V.device, dtype=dtype)
    return u / u.norm(), r / r.norm(), float(theta[-1]), beta


# The trainer's choice before the first product (eosbranch.measure): the previous measurement's
# vectors are taken as stale, and the solve starts cold from the gradient hint, when the training
# loss has grown by more than LOSS_JUMP times since that measurement (a catapult or a divergence
# under way: the iterate was thrown along a new direction and the top eigenvector moved with it).
# Measured with benchmarks/measurement.py (CIFAR-shaped MLP, float32, tol 1e-3; N = 2,000 / 10,000):
# at the EoS state the loss is 0.61 / 0.65 times that of the previous measurement, and warm costs
# 4 products against 5 cold (0.71 / 0.78 of the cold cost); 32 steps into a catapult (loss ratio
# 4.98 / 2.45) warm costs 19 / 10 products against 19 / 14 (0.97 / 0.70), at its peak (9.51 / 8.26)
# 5 / 5 against 3 / 6 (1.41 / 0.89). Which start wins in a catapult is not predictable from anything
# known before the first product (neither the loss ratio nor the first residual separates them), so
# the rule bounds the worst case: a fast-changing phase costs what a cold solve costs.
LOSS_JUMP = 2.0


def stale_warm_start(loss: float, previous_loss: float | None) -> bool:
    """True where a warm start from the previous measurement's vectors should give way to a cold
    one: the training loss is above LOSS_JUMP times the loss at that measurement. False without a
    previous loss, or where either is not finite and positive (no evidence either way)."""
    if previous_loss is None or not (math.isfinite(loss) and math.isfinite(previous_loss)) or previous_loss <= 0:
        return False
    return loss > LOSS_JUMP * previous_loss
