"""Losses, with the paper's MSE convention (DESIGN §2).

MSE: l_i = sum_j (f_j(x_i) - y_ij)^2 over outputs, one-hot targets for class labels, mean over
samples, no 1/2 (``half=True`` gives the 1/2 convention). CE: mean cross-entropy on logits.
Each loss has a per-example form (``reduction="none"``) used by probes, and the built-in losses
carry their derivatives in the outputs in closed form (``output_derivatives``), which the
hand-written curvature passes use instead of an autograd graph of the loss.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Params, Registry

LOSSES = Registry("loss")


def _targets_like(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Integer targets are class labels: one-hot over the outputs; float targets are used as is.
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        # A comparison rather than F.one_hot, which fails under torch.func.vmap.
        classes = torch.arange(outputs.shape[-1], device=targets.device)
        return (targets.long()[..., None] == classes).to(outputs.dtype)
    return targets.reshape(outputs.shape).to(outputs.dtype)


def mse(outputs: torch.Tensor, targets: torch.Tensor, half: bool = False, reduction: str = "mean"):
    per = (outputs - _targets_like(outputs, targets)).pow(2).reshape(outputs.shape[0], -1).sum(1)
    if half:
        per = 0.5 * per
    return per.mean() if reduction == "mean" else per


def ce(outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"):
    return F.cross_entropy(outputs, targets.long(), reduction=reduction)


class OutputDerivatives:
    """Per-example l_i, dl_i/df_i [n, C] and v -> (d2l_i/df_i^2) v for blocks [..., n, C]."""

    def __init__(self, losses: torch.Tensor, grad: torch.Tensor, hess_times: Callable):
        self.losses, self.grad, self.hess_times = losses, grad, hess_times


def _mse_derivatives(outputs, targets, half: bool) -> OutputDerivatives:
    c = 1.0 if half else 2.0  # l = (c/2) ||f - y||^2: gradient c (f - y), Hessian c I
    r = outputs - _targets_like(outputs, targets)
    per = (0.5 * c) * r.pow(2).reshape(outputs.shape[0], -1).sum(1)
    return OutputDerivatives(per, c * r, lambda v: c * v)


def _ce_derivatives(outputs, targets) -> OutputDerivatives:
    # l = logsumexp(f) - f_y: gradient p - e_y, Hessian diag(p) - p p^T (p = softmax(f)).
    logp = torch.log_softmax(outputs, dim=-1)
    p = logp.exp()
    y = targets.long()
    per = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    grad = p - (y.unsqueeze(-1) == torch.arange(outputs.shape[-1], device=outputs.device)).to(p.dtype)
    return OutputDerivatives(per, grad, lambda v: p * v - p * (p * v).sum(-1, keepdim=True))


def output_derivatives(loss: Callable, outputs: torch.Tensor, targets: torch.Tensor) -> OutputDerivatives | None:
    """Closed-form derivatives of a built-in loss (``get_loss``) at 2-d ``outputs`` [n, C], or None
    for any other callable (callers then differentiate it with autograd)."""
    fn = getattr(loss, "output_derivatives", None)
    return None if fn is None or outputs.dim() != 2 else fn(outputs, targets)


class MSEParams(Params):
    half: bool = False


@LOSSES.register("mse", MSEParams)
def _make_mse(p: MSEParams) -> Callable:
    def loss(outputs, targets, reduction="mean"):
        return mse(outputs, targets, half=p.half, reduction=reduction)

    loss.output_derivatives = lambda outputs, targets: _mse_derivatives(outputs, targets, p.half)
    return loss


@LOSSES.register("ce")
def _make_ce(p: Params) -> Callable:
    def loss(outputs, targets, reduction="mean"):
        return ce(outputs, targets, reduction=reduction)

    loss.output_derivatives = _ce_derivatives
    return loss


def get_loss(name_or_spec) -> Callable:
    """A loss callable ``(outputs, targets, reduction="mean")`` from a name or a spec section."""
    if callable(name_or_spec):
        return name_or_spec
    entry, params = LOSSES.parse(name_or_spec, where="loss")
    return entry.fn(params)
