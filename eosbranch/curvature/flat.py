"""Flat parameter vectors: the layout every curvature quantity (v1, gradients, HVPs) shares."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["flatten", "unflatten", "project_out"]


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (e.g. ``model.parameters()``) into one flat vector, in order."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat [dim] vector into tensors shaped like ``like``; a [dim, m] block gives
    tensors of shape [m, *t.shape] (batch first, the layout ``torch.func.vmap`` expects)."""
    out, i = [], 0
    for t in like:
        n = t.numel()
        piece = vec[i:i + n]
        out.append(piece.reshape(t.shape) if vec.dim() == 1 else piece.T.reshape(vec.shape[1], *t.shape))
        i += n
    if i != vec.shape[0]:
        raise ValueError(f"unflatten: vector has {vec.shape[0]} entries, the tensors hold {i}")
    return out


def project_out(basis: Tensor, w: Tensor) -> Tensor:
    """Remove from rows of ``w`` their components along the orthonormal rows of ``basis``, twice
    (one classical Gram-Schmidt pass loses orthogonality when w is nearly in the span)."""
    c = w @ basis.T
    w.addmm_(c, basis, alpha=-1)  # in place: no [rows, dim] temporary
    c2 = w @ basis.T
    w.addmm_(c2, basis, alpha=-1)
    return c + c2
