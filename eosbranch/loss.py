"""Losses, with the paper's MSE convention (DESIGN §2).

MSE: l_i = sum_j (f_j(x_i) - y_ij)^2 over outputs, one-hot targets for class labels, mean over
samples, no 1/2 (``half=True`` gives the 1/2 convention). CE: mean cross-entropy on logits.
Each loss has a per-example form (``reduction="none"``) used by probes.
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


class MSEParams(Params):
    half: bool = False


@LOSSES.register("mse", MSEParams)
def _make_mse(p: MSEParams) -> Callable:
    def loss(outputs, targets, reduction="mean"):
        return mse(outputs, targets, half=p.half, reduction=reduction)

    return loss


@LOSSES.register("ce")
def _make_ce(p: Params) -> Callable:
    return ce


def get_loss(name_or_spec) -> Callable:
    """A loss callable ``(outputs, targets, reduction="mean")`` from a name or a spec section."""
    if callable(name_or_spec):
        return name_or_spec
    entry, params = LOSSES.parse(name_or_spec, where="loss")
    return entry.fn(params)
