"""Curvature backends and the one place that chooses between them.

A backend computes, for one :class:`~eosbranch.curvature.objective.Objective`,

- the HVP batch: ``hvp(tangents, chunk)``, H_c v for a block of tangents on one chunk, and
  ``gradient_hint()`` (the full-batch gradient when it is free, a Lanczos start);
- the group batch: ``group_pass(batch)`` (group gradients, losses, accuracies) and
  ``curvature(batch, v1, quadratic, coupling, gradient)`` (g_k^T H g_k, Q_k = <g_k, grad S>,
  grad S and S = v1^T H v1).

Three backends, each exact (the same numbers up to rounding):

- ``autograd`` (``eosbranch.curvature.autograd``): any model;
- ``input_linear``: a model whose first module with tensors is an ``nn.Linear`` on one row per
  example, and whose rest keeps examples apart; the group batch by the input-layer factorisation
  (``eosbranch.curvature.input_linear``), the HVP batch by autograd;
- ``mlp``: an MLP chain (``eosbranch.mlp_chain``); HVPs by the R-operator
  (``eosbranch.curvature.mlp``), the group batch by Taylor-mode propagation
  (``eosbranch.curvature.taylor``).

MLP chains default to the R-operator: per product as cheap as double backward with a cached graph
or cheaper (1.26 vs 1.25 gradients on the CIFAR-shaped MLP of benchmarks/curvature.py, 1.13 vs
1.36 on quick.yaml), cheaper to build (a forward pass, 0.55, instead of a forward and a
create_graph backward) and with chunks (1.8 vs 2.3: no graph to rebuild per chunk and product).
``select_backend`` runs every eligibility check, so ``HessianOperator`` and the probes' ``Context``
cannot disagree about which models a route covers.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor

from .. import mlp_chain
from . import input_linear, mlp, taylor
from .autograd import AutogradBackend
from .objective import Chunk, GroupBatch, Objective

__all__ = ["BACKENDS", "AutogradBackend", "InputLinearBackend", "MLPBackend", "select_backend", "RECORD_BYTES"]

BACKENDS = ("auto", "mlp", "input_linear", "autograd")

# Memory the R-operator may hold for recombining first-layer tangents (MLPBackend.first_tangent):
# each product keeps its input [m, dim] and its R{z_1} [N, m, width]. An EoS solve of 4 products
# on the CIFAR-shaped MLP of benchmarks/measurement.py holds 36 MB at N = 2,000 and 110 MB at
# N = 10,000; a longer solve that would pass the cap stops recording (the passes then multiply
# the data themselves, as before).
RECORD_BYTES = 256 * 2**20


class FactoredBackend(AutogradBackend):
    """A backend whose group curvature (R_k, Q_k) comes from a factorisation that never forms the
    flat grad S; when grad S itself is asked for, autograd gives it. A subclass defines
    ``group_curvature(batch, v1, quadratic, coupling, forward)``."""

    def curvature(self, batch, v1, quadratic, coupling, gradient, forward=None, first_tangent=None) -> dict:
        out = (self.group_curvature(batch, v1, quadratic, coupling, forward, first_tangent)
               if quadratic or coupling else {})
        if gradient:
            out.update(AutogradBackend.curvature(self, batch, v1, False, False, True))
        return out


class InputLinearBackend(FactoredBackend):
    """Group curvature through the input-layer factorisation; everything else by autograd."""

    name = "input_linear"

    def __init__(self, obj: Objective, split: input_linear.InputSplit, form: str | None = None,
                 batched_vjp: bool = True):
        super().__init__(obj, form, batched_vjp)
        self.split = split

    def group_curvature(self, batch, v1, quadratic, coupling, forward=None, first_tangent=None) -> dict:
        return input_linear.group_curvature(self.obj, self.split, batch, v1, coupling, quadratic)


class MLPBackend(FactoredBackend):
    """HVPs by the R-operator, group gradients and curvature by Taylor-mode propagation."""

    name = "mlp"

    def __init__(self, obj: Objective, chain: mlp_chain.Chain, split=None, batched_vjp: bool = True):
        super().__init__(obj, "double_backward", batched_vjp)
        self.chain, self.split = chain, split
        self._cache = None  # mlp.Cache of the single chunk, built on first use
        # (inputs [m, dim], R{z_1} [N, m, width]) of every product over all points (one chunk, no
        # subset), while they fit in RECORD_BYTES; None once they did not.
        self._records: list[tuple[Tensor, Tensor]] | None = []
        self._record_bytes = 0

    @property
    def hvp_method(self) -> str:
        return "r_operator"

    def frozen(self):
        return nullcontext()  # the R-operator never calls the model's modules (a chain has no BatchNorm)

    def _build(self, chunk: Chunk) -> mlp.Cache:
        obj = self.obj
        omega = chunk.local_omega(obj.dtype, obj.device)
        return mlp.build(self.chain, dict(zip(obj.names, obj.params)), obj.loss, chunk.X, chunk.y, omega)

    def _cached(self, chunk: Chunk) -> mlp.Cache:
        self._cache = self._cache or self._build(chunk)
        return self._cache

    def hvp(self, tangents: list[Tensor], chunk: Chunk) -> list[Tensor | None]:
        cache = self._cached(chunk) if self.obj.single_chunk else self._build(chunk)
        record = self._records is not None and self.obj.single_chunk and self.obj.subset is None
        first: list = [] if record else None
        hv = mlp.hvp(cache, dict(zip(self.obj.names, tangents)), first)
        if record:
            self._record(tangents, first[0])
        return [hv.get(n) for n in self.obj.names]

    def _record(self, tangents: list[Tensor], first: Tensor) -> None:
        m = first.shape[1]
        size = (m * self.obj.dim + first.numel()) * first.element_size()
        if self._record_bytes + size > RECORD_BYTES:
            self._records = None  # a partial record cannot rebuild a vector of the whole span
            return
        inputs = torch.cat([t.reshape(m, -1) for t in tangents], dim=1)  # a copy: the solver reuses its rows
        self._records.append((inputs, first))
        self._record_bytes += size

    def first_tangent(self, v: Tensor) -> Tensor | None:
        """R{z_1} = x V_1^T + c_1 along the flat ``v`` over all points [N, width], recombined from
        the recorded products (R{z_1} is linear in v) when v lies in the span of their inputs, as a
        Lanczos Ritz vector does: the coefficients solve the least-squares problem in float64 and
        the part of v outside the span must be within rounding (100 eps relative); else None.
        The data are not touched: this is the product with v's first block the measurement's
        Taylor and per-example passes would otherwise each make."""
        if not self._records:
            return None
        B = torch.cat([inputs for inputs, _ in self._records])  # [r, dim]
        v = v.detach().reshape(-1).to(B.dtype)
        # Normal equations: the r x r system is solved on the host in float64 (gelsd copes with a
        # dependent row); the residual is then checked in the solver's dtype.
        G, rhs = (B @ B.T).to("cpu", torch.float64), (B @ v).to("cpu", torch.float64)
        coef = torch.linalg.lstsq(G, rhs.unsqueeze(1), driver="gelsd").solution[:, 0].to(B.device, B.dtype)
        outside = (v - coef @ B).norm()
        if not bool(outside <= 100 * torch.finfo(B.dtype).eps * v.norm()):
            return None
        out, at = None, 0
        for _, first in self._records:
            m = first.shape[1]
            part = torch.einsum("nmw,m->nw", first, coef[at:at + m])
            out = part if out is None else out.add_(part)
            at += m
        return out

    def shared_forward(self) -> mlp.Cache | None:
        """The R-operator cache over all points (one chunk, no subset), built once: the layer
        inputs, activation derivatives, outputs, per-example losses and dl_i/df that the loss,
        accuracy and per-example passes of the same measurement read instead of a forward pass."""
        if not self.obj.single_chunk or self.obj.subset is not None:
            return None
        return self._cached(next(self.obj.hessian_chunks()))

    def gradient_hint(self):
        if not self.obj.single_chunk:
            return None
        grads = mlp.gradient(self._cached(next(self.obj.hessian_chunks())))
        return [grads.get(n) for n in self.obj.names]

    def group_pass(self, batch: GroupBatch):
        return taylor.group_pass(self.obj, self.chain, batch)

    def group_curvature(self, batch, v1, quadratic, coupling, forward: mlp.Cache | None = None,
                        first_tangent: Tensor | None = None) -> dict:
        """``forward``: an R-operator cache over the Hessian's points at these parameters (the
        measurement's, ``shared_forward``), whose first-layer output it reuses; ``first_tangent``:
        R{z_1} along v1 over those points (``first_tangent``), if known."""
        shared = forward is not None and self.obj.subset is None
        return taylor.group_curvature(self.obj, self.chain, batch, v1, coupling, quadratic,
                                      forward.first_out if shared else None, first_tangent if shared else None)


def select_backend(obj: Objective, method: str = "auto", *, form: str | None = None, batched_vjp: bool = True,
                   label: str | None = None, hint: str = "") -> AutogradBackend:
    """The backend for ``obj``: ``method`` "auto" takes the most specific one the model qualifies
    for (mlp, then input_linear, then autograd); a named one raises ValueError (``label`` names the
    option the user set, ``hint`` what to use instead) if the model does not qualify. ``form``: the
    autograd HVP form ("double_backward" or "forward_over_reverse"; default per device)."""
    if method not in BACKENDS:
        raise ValueError(f"select_backend: method must be one of {BACKENDS}, got {method!r}")
    label = label or f"method {method!r}"
    chain = split = None
    if method in ("auto", "mlp"):
        chain = mlp_chain.split(obj.model, obj.names, obj.X)
        if chain is None and method == "mlp":
            raise ValueError(f"{obj.who}: {label} needs an nn.Sequential of Flatten/Identity, then nn.Linear "
                             f"layers (all trainable) and elementwise activations, with one row per example{hint}")
    if method in ("auto", "input_linear"):
        split = input_linear.split(obj.model, obj.names, obj.X)
        if split is not None and not obj.rows_independent():
            split = None  # e.g. a BatchNorm in training mode after the input layer: dl_i/dZ_j != 0
        if split is None and method == "input_linear":
            raise ValueError(f"{obj.who}: {label} needs an nn.Sequential whose first module with tensors is an "
                             "nn.Linear with trainable weights, seeing one row per example, and whose rest "
                             f"keeps examples apart{hint}")
    if (chain is not None or split is not None) and not obj.per_example_loss_ok():
        if method != "auto":
            raise ValueError(f"{obj.who}: {label} needs a loss that accepts reduction='none' "
                             "and then returns one loss per example whose mean is the loss")
        chain = split = None  # e.g. F.mse_loss (its per-element losses) or a loss without `reduction`
    if chain is not None:
        return MLPBackend(obj, chain, split, batched_vjp)
    if split is not None:
        return InputLinearBackend(obj, split, form, batched_vjp)
    return AutogradBackend(obj, form, batched_vjp)
