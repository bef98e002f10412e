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

from torch import Tensor

from .. import mlp_chain
from . import input_linear, mlp, taylor
from .autograd import AutogradBackend
from .objective import Chunk, GroupBatch, Objective
from .records import ProductRecords

__all__ = ["BACKENDS", "AutogradBackend", "InputLinearBackend", "MLPBackend", "select_backend"]

BACKENDS = ("auto", "mlp", "input_linear", "autograd")


class FactoredBackend(AutogradBackend):
    """A backend whose group curvature (R_k, Q_k) comes from a factorisation that never forms the
    flat grad S; when grad S itself is asked for, autograd gives it. A subclass defines
    ``group_curvature(batch, v1, quadratic, coupling, forward)``."""

    def curvature(self, batch, v1, quadratic, coupling, gradient, forward=None, tangents=None) -> dict:
        # tangents: v1's tangents over the Hessian's points, if known (MLPBackend.tangents_along)
        out = (self.group_curvature(batch, v1, quadratic, coupling, forward, tangents)
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

    def group_curvature(self, batch, v1, quadratic, coupling, forward=None, tangents=None) -> dict:
        return input_linear.group_curvature(self.obj, self.split, batch, v1, coupling, quadratic)


class MLPBackend(FactoredBackend):
    """HVPs by the R-operator, group gradients and curvature by Taylor-mode propagation."""

    name = "mlp"

    def __init__(self, obj: Objective, chain: mlp_chain.Chain, split=None, batched_vjp: bool = True):
        super().__init__(obj, "double_backward", batched_vjp)
        self.chain, self.split = chain, split
        self._cache = None  # mlp.Cache of the single chunk, built on first use
        # Every product's vectors and tangents over all points (one chunk, no subset), once a
        # measurement asks for them (record_products): other operators' products copy nothing.
        self.records: ProductRecords | None = None

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
        record = self.records is not None and not self.records.disabled and self.obj.single_chunk \
            and self.obj.subset is None
        seen: dict | None = {} if record else None
        hv = mlp.hvp(cache, dict(zip(self.obj.names, tangents)), seen)
        if record:
            self.records.add(tangents, seen)
        return [hv.get(n) for n in self.obj.names]

    def tangents_along(self, v: Tensor) -> dict[str, Tensor] | None:
        """Along the flat ``v``, over all points: {"first": R{z_1} = x V_1^T + c_1 [N, width],
        "linear<j>": R{z_j} of each later Linear, "output": R{f} [N, C]}, recombined from this
        operator's products where v lies in the span of their vectors, as a Lanczos Ritz vector
        does (``eosbranch.curvature.records``); else None. The data are not touched: these are the
        products with v's first block that the measurement's Taylor and per-example passes would
        otherwise each make."""
        return None if self.records is None else self.records.along(v)

    def record_products(self) -> None:
        self.records = self.records or ProductRecords()

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
                        tangents: dict[str, Tensor] | None = None) -> dict:
        """``forward``: an R-operator cache over the Hessian's points at these parameters (the
        measurement's, ``shared_forward``), whose Linear outputs it reuses; ``tangents``: v1's
        tangents over those points (``tangents_along``), if known."""
        shared = forward is not None and self.obj.subset is None
        return taylor.group_curvature(self.obj, self.chain, batch, v1, coupling, quadratic,
                                      forward if shared else None, tangents if shared else None)


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
