"""Where a Lanczos solve starts: the operator's free gradient hint, alone (a cold start) or joined
to a stale warm start v0 (opt-in), for ``eosbranch.curvature.lanczos.top_eigenpairs``; and the
trainer's warm start between measurements: cold after a loss jump (``stale_warm_start``), else the
last vectors extrapolated along their path (``extrapolated_start``)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .flat import project_out as _project_out

__all__ = ["HINT_RANDOM_WEIGHT", "WARM_HINT_RESIDUAL", "LOSS_JUMP", "stale_warm_start", "PATH_STEP",
           "PATH_MIN_COS", "path_ratio", "extrapolated_start"]

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


# The warm start along the eigenvector's path. Between measurements the top eigenvectors turn
# steadily (at the EoS of the benchmark setting, by sin 0.04-0.10 per 32 steps), so the vectors
# of the last two measurements predict the next better than the last alone: u = v + s r (v - v'),
# v' the previous measurement's vector (sign-aligned with v), r the ratio of this interval to the
# last (in t_eff, clamped to [0, 1]) and s = PATH_STEP (1: the straight continuation of the chord).
# Measured in the EoS phase of benchmarks/measurement.py (float32, tol 1e-3, measurements 32 steps
# apart, each solve started from the ones before as the trainer does): at N = 2,000, 7 of 8 solves
# take 3 products against 5 of 8 from v alone (the others 4); over 12 measurements s = 0.5, 0.7
# and 1 took 3 after the first (0.3 once 4), and s = 1 left the smallest residual after those 3
# (1.6e-4 to 7.4e-4, against up to 9.3e-4 at 0.5: the margin before a fourth product at 1e-3).
# Right after the onset (v1 at 0 and 32 steps nearly orthogonal) nothing helps: 4 products at
# any s up to 2.
# A column turns by more than acos(PATH_MIN_COS) in one interval only where the path is not
# smooth (a crossing of eigenvalues, a catapult, the onset): there the last vector is used as it is.
PATH_STEP = 1.0
PATH_MIN_COS = 0.9


def path_ratio(t_now: float, t_last: float, t_before: float) -> float:
    """How far to extrapolate: (t_now - t_last) / (t_last - t_before), in [0, 1] (0 where the two
    measurements are not in order)."""
    span = t_last - t_before
    if not (math.isfinite(span) and span > 0):
        return 0.0
    return min(max((t_now - t_last) / span, 0.0), 1.0)


def extrapolated_start(last: Tensor, before: Tensor | None, ratio: float, step: float = PATH_STEP) -> Tensor:
    """[dim, k] unit columns: each column of ``last`` moved by ``step * ratio`` times its change
    since ``before`` (the measurement before; its columns sign-aligned first), where that change is
    smooth (|cos| >= PATH_MIN_COS); otherwise, and without ``before``, the column as it is."""
    if before is None or ratio <= 0 or step <= 0:
        return last
    out = last.clone()
    for j in range(min(last.shape[1], before.shape[1])):
        v, w = last[:, j], before[:, j].to(device=last.device, dtype=last.dtype)
        vn, wn = v.norm(), w.norm()
        if vn.item() == 0 or wn.item() == 0:
            continue
        cos = float(torch.dot(v.double(), w.double()) / (vn.double() * wn.double()))
        if not abs(cos) >= PATH_MIN_COS:  # also NaN: a non-finite vector moves nothing
            continue
        w = w * (math.copysign(1.0, cos) * vn / wn)
        u = v + (step * ratio) * (v - w)
        out[:, j] = u / u.norm()
    return out
