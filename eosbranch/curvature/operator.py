"""The Hessian operator: x -> H x as a flat matvec, over whichever backend the model allows."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .autograd import AUTOGRAD_FORMS
from .backend import select_backend
from .flat import unflatten
from .objective import Objective

__all__ = ["HessianOperator", "hessian_matvec", "preconditioned_matvec", "HVP_METHODS"]

HVP_METHODS = AUTOGRAD_FORMS + ("r_operator",)


class HessianOperator:
    """x -> H x for the Hessian of the mean loss over ``data``, at the parameters (and buffers)
    the model had when the operator was made: they are snapshotted, so the operator is one fixed
    symmetric matrix however the model changes afterwards.

    Data are processed in chunks; each chunk's mean-loss HVP is weighted by n_chunk / N, so a short
    last chunk does not bias the mean (``eosbranch.curvature.objective``). With a single chunk,
    double backward builds the gradient graph once and reuses it, so each product costs one
    backward pass through it (1.2-2.2 gradients in benchmarks/curvature.py) instead of a forward
    and two backward passes; the graph (activation memory of one double-backward pass) lives as
    long as the operator. A BatchNorm in training mode normalises with batch statistics as usual
    but its running statistics are not updated (measuring must not change the model, and
    torch.func transforms cannot mutate captured buffers).
    """

    def __init__(self, model: nn.Module, loss, data, chunk_size=None, subset=None, method=None, weights=None,
                 record: bool = False):
        if method is not None and method not in HVP_METHODS:
            raise ValueError(f"hessian_matvec: method must be one of {HVP_METHODS}, got {method!r}")
        X, y = data
        obj = Objective(model, loss, X, y, chunk_size=chunk_size, subset=subset, weights=weights)
        self.objective, self.model, self.loss = obj, model, obj.loss
        self.names, self.params, self.buffers = obj.names, obj.params, obj.buffers
        self.n, self.chunk_size, self.dim = obj.n_points, obj.chunk_size, obj.dim
        self.dtype, self.device = obj.dtype, obj.device
        route = {None: "auto", "r_operator": "mlp"}.get(method, "autograd")
        self.backend = select_backend(obj, route, form=method if method in AUTOGRAD_FORMS else None,
                                      label=f"method {method!r}")
        self.method = self.backend.hvp_method
        self.chain = self.backend.chain  # the MLP chain of the R-operator route, or None
        if record:  # a measurement's operator: its Context reads v1's tangents from the products
            self.backend.record_products()

    def start_hint(self) -> Tensor | None:
        """The flat full-batch gradient when it is free (one chunk: double backward's cached graph,
        or the R-operator's adjoints), else None. At the EoS the gradient oscillates along v1
        (cos^2 0.57 in benchmarks/curvature.py's CIFAR-shaped setting), so a cold Lanczos start
        along it saves products; ``top_eigenpairs`` mixes in a random part (see there)."""
        parts = self.backend.gradient_hint()
        return None if parts is None else self._flat(parts, 1)[0]

    def shared_forward(self):
        """The forward pass this operator caches over all of ``data`` (an MLP chain's R-operator
        cache, ``eosbranch.curvature.mlp.Cache``: layer inputs, outputs ``f``, per-example
        ``losses`` and dl_i/df), for the other passes of a measurement at the same parameters;
        None where the backend keeps none (other models, chunks, a subset)."""
        return self.backend.shared_forward()

    def _flat(self, parts, m: int) -> Tensor:
        """[m, dim] from per-parameter blocks of m rows; None stands for a zero block."""
        return torch.cat([torch.zeros(m, p.numel(), dtype=self.dtype, device=self.device) if h is None
                          else h.reshape(m, -1) for h, p in zip(parts, self.params)], dim=1)

    def __call__(self, v: Tensor) -> Tensor:
        single = v.dim() == 1
        block = v.reshape(self.dim, -1).to(self.dtype)
        m = block.shape[1]
        tangents = unflatten(block, self.params)  # each [m, *shape]
        total = None
        with self.backend.frozen():
            for chunk in self.objective.hessian_chunks():
                part = self._flat(self.backend.hvp(tangents, chunk), m)
                weight = chunk.weight
                if not (isinstance(weight, float) and weight == 1.0):  # no extra pass (or device read) for one chunk
                    part *= weight
                total = part if total is None else total.add_(part)
        return total[0] if single else total.T.contiguous()


def hessian_matvec(model, loss, data, chunk_size=None, subset=None, method=None, weights=None,
                   record: bool = False) -> HessianOperator:
    """Flat matvec of the Hessian of the mean training loss over the trainable parameters
    (``requires_grad``, in ``model.parameters()`` order), at the current parameters (snapshotted:
    make a new operator after the model changes).

    ``loss``: callable ``(outputs, targets) -> mean loss`` or a built-in name ("mse", "ce").
    ``data``: ``(X, y)``; ``subset``: fixed LongTensor of indices; ``chunk_size``: points per pass.
    ``weights``: optional per-point weights w_i (aligned with ``data``): the Hessian of
    sum_i w_i l_i / sum_i w_i instead (``loss`` must then accept ``reduction="none"``).
    ``method``: "double_backward", "forward_over_reverse" or "r_operator"; default "r_operator"
    for MLP chains (``eosbranch.mlp_chain``) whose loss also gives per-example losses with
    ``reduction="none"``, else per device from ``DEFAULT_HVP_METHOD`` (the backend choice is
    ``eosbranch.curvature.backend.select_backend``). The model is evaluated in whatever mode
    (train/eval) it is in.
    ``record``: keep each product's vectors and tangents (MLP chains, one chunk, no subset;
    ``eosbranch.curvature.records``) so that a measurement's Context recombines v1's tangents
    instead of multiplying the data again; off by default (each product then copies nothing).
    The callable takes a [dim] vector or a [dim, m] block (one batched product) and carries
    ``.dim``, ``.dtype``, ``.device``, which ``top_eigenpairs`` picks up.
    """
    return HessianOperator(model, loss, data, chunk_size=chunk_size, subset=subset, method=method, weights=weights,
                           record=record)


class _Preconditioned:
    def __init__(self, matvec, diag):
        self.matvec = matvec
        self.scale = diag.detach().reshape(-1).rsqrt()
        self.dim = self.scale.numel()
        self.dtype = getattr(matvec, "dtype", diag.dtype)
        self.device = getattr(matvec, "device", diag.device)

    def __call__(self, x: Tensor) -> Tensor:
        s = self.scale if x.dim() == 1 else self.scale[:, None]
        return s * self.matvec(s * x)

    def start_hint(self) -> Tensor | None:
        """D^{-1/2} g: the gradient hint of the Hessian's operator in this operator's coordinates (a
        cold start of the preconditioned solve, eosbranch.measure), None where it has none."""
        hint_fn = getattr(self.matvec, "start_hint", None)
        hint = hint_fn() if callable(hint_fn) else None
        return None if hint is None else self.scale * hint.reshape(-1)


def preconditioned_matvec(matvec: Callable, diag: Tensor) -> Callable:
    """x -> D^{-1/2} H D^{-1/2} x for P = diag(``diag``) > 0: symmetric, with the spectrum of P^{-1} H.

    Used for Adam's preconditioned sharpness lambda_1(P^{-1} H), P = diag(sqrt(v_hat) + eps)
    (bias-corrected second moment). Mapping eigenvectors back: if u is a unit eigenvector here,
    w = D^{-1/2} u is an eigenvector of P^{-1} H (right; normalise if needed) and D^{1/2} u one of
    H P^{-1} (left), with the same eigenvalue.
    """
    return _Preconditioned(matvec, diag)
