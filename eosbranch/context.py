"""The measurement context: a cache over one curvature backend (DESIGN §2).

A :class:`Context` is built once per measurement step from the model, the loss, the training data,
the groups and ``v1`` -- the *global* top eigenvector of the full training-loss Hessian. Every
shared quantity is computed at most once and cached in ``ctx.cache`` under an explicit key
(``KEYS``); the context holds exactly one eigenvector, the global one, and nothing here computes a
group's own Hessian, so the two cannot be confused (the published research code did, through a
shared cache). The arithmetic lives elsewhere: the objective (points, weights, chunks) and the
group gradients and curvature in ``eosbranch.curvature`` (one backend, chosen by
``select_backend``), the per-example passes in ``eosbranch.per_example``.

Definitions (group k with indices G_k, l_k = mean_{i in G_k} l_i, g_k = grad l_k, H the Hessian of
the mean training loss, S = v1^T H v1 with v1 held fixed): the group gradients g_k, losses and
accuracies; g_k^T H g_k; grad S and Q_k = <g_k, grad S>; per example l_i, <grad l_i, v1> and
||grad l_i||. Measuring never changes the model: parameters and buffers are snapshotted.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from . import per_example
from .curvature.backend import select_backend
from .curvature.objective import GroupBatch, Objective

__all__ = ["Context", "KEYS", "CURVATURE_METHODS"]

# Cache keys. Everything derived from an eigenvector says so ("v1_global"), so a reader of
# ``ctx.cache`` sees which vector a number belongs to.
KEYS = {
    "group_grads": "group_grads",                     # name -> flat g_k
    "group_loss": "group_loss",                       # name -> l_k
    "group_accuracy": "group_accuracy",               # name -> accuracy (classification only)
    "group_hessian_quadratic": "group_hessian_quadratic",  # name -> g_k^T H g_k
    "sharpness_gradient": "sharpness_gradient_v1_global",  # flat grad_theta(v1^T H v1), v1 fixed
    "sharpness_coupling": "sharpness_coupling_v1_global",  # name -> Q_k = <g_k, grad S>
    "v1_hessian_quadratic": "v1_hessian_quadratic_v1_global",  # v1^T H v1 (= sharpness if v1 is top)
    "per_example_loss": "per_example_loss",           # [N]
    "per_example_projection": "per_example_projection_v1_global",  # [N] <grad l_i, v1>
    "per_example_grad_norm": "per_example_grad_norm",  # [N] ||grad l_i||
    "tangents": "tangents_v1_global",  # {"first": x V1^T + c1, "linear<j>": R{z_j}, "output": R{f}}, from the solve
}

# The probes' names for the curvature backends (eosbranch.curvature.backend).
CURVATURE_METHODS = {"auto": "auto", "taylor": "mlp", "input_layer": "input_linear", "generic": "autograd"}


class Context:
    """Everything a probe needs at one measurement step, with shared quantities cached.

    ``model``: an ``nn.Module``; its trainable parameters (``requires_grad``, in
    ``model.parameters()`` order) define the flat layout of ``v1`` and of every gradient.
    ``loss_fn``: a name ("mse", "ce") or a callable ``(outputs, targets, reduction="mean"|"none")``.
    ``X``, ``y``: the full training set. ``groups``: name -> LongTensor of indices into it.
    ``v1``: the global top eigenvector of the training-loss Hessian ([dim] or [dim, 1]), or None
    (v1-dependent metrics are then skipped). ``chunk_size``: points per pass (None: all at once).
    ``hessian_subset``: the fixed indices the Hessian (and so v1) was computed on, if not all
    points; ``rayleigh`` and ``sharpness_coupling`` then use that same Hessian. ``weights``:
    per-point weights of the training loss (a reweighting branch): the Hessian behind v1, R_k and
    Q_k is then that of sum_i w_i l_i / sum_i w_i; group losses stay unweighted.
    ``grad_norm_method``: "auto" (per-layer identity for all-``nn.Linear`` models, else vmap),
    "linear" or "vmap". ``batched_vjp``: one vmapped backward for K cotangents (default) rather
    than K sequential ones; both give the same numbers. ``curvature_method``: "auto" (the most
    specific backend the model qualifies for: Taylor-mode forward propagation for MLPs of Linear
    layers and elementwise activations, else the input-layer factorisation when the model starts
    with an ``nn.Linear``, else the generic autograd pass), "taylor", "input_layer" or "generic";
    the same numbers. The Taylor route also takes the group gradients from per-layer factors.
    ``operator``: the measurement's ``HessianOperator`` at the same parameters, if any: where it
    caches a forward pass over these same points (an MLP chain in one chunk, no subset), the
    per-example losses, projections and gradient norms read it instead of passing the data
    through the first layer again (the same numbers up to rounding).
    """

    def __init__(self, model: nn.Module, loss_fn, X: Tensor, y: Tensor,
                 groups: dict[str, Tensor] | None = None, v1: Tensor | None = None,
                 chunk_size: int | None = None, hessian_subset: Tensor | None = None,
                 grad_norm_method: str = "auto", batched_vjp: bool = True, weights: Tensor | None = None,
                 curvature_method: str = "auto", operator=None):
        obj = Objective(model, loss_fn, X, y, chunk_size=chunk_size, subset=hessian_subset, weights=weights,
                        who="Context", subset_name="hessian_subset")
        self.objective = obj
        self.model, self.weights, self.loss_fn = model, weights, obj.loss
        self.X, self.y, self.n, self.chunk_size = X, y, obj.n, obj.chunk_size
        if grad_norm_method not in ("auto", "linear", "vmap"):
            raise ValueError(f"Context: grad_norm_method must be 'auto', 'linear' or 'vmap', got {grad_norm_method!r}")
        self.grad_norm_method = grad_norm_method
        self.batched_vjp = batched_vjp
        self.param_names, self.params, self.buffers = obj.names, obj.params, obj.buffers
        self.dim, self.dtype, self.device = obj.dim, obj.dtype, obj.device
        self.classification = obj.classification
        self.groups = {name: obj.indices(idx, f"group {name!r}") for name, idx in (groups or {}).items()}
        self.hessian_subset = obj.subset
        self.v1 = None if v1 is None else self._unit(v1)
        if curvature_method not in CURVATURE_METHODS:
            raise ValueError("Context: curvature_method must be 'auto', 'taylor', 'input_layer' or 'generic', "
                             f"got {curvature_method!r}")
        self.backend = select_backend(obj, CURVATURE_METHODS[curvature_method], batched_vjp=batched_vjp,
                                      label=f"curvature_method={curvature_method!r}", hint="; use 'auto'")
        self._batch: GroupBatch | None = None
        self.cache: dict[str, object] = {}
        self.forward = self._shared_forward(operator)
        self._operator = operator if self.forward is not None else None

    def _shared_forward(self, operator):
        """The operator's cached forward pass if it is over these points at these parameters."""
        fwd = None if operator is None else operator.shared_forward()
        if fwd is None or operator.objective.X is not self.X or operator.objective.y is not self.y:
            return None
        theirs = operator.objective
        if theirs.names != self.param_names or not all(torch.equal(a, b) for a, b in zip(theirs.params, self.params)):
            return None  # the model moved since the operator was made: its forward is another one
        return fwd

    @property
    def tangents_v1(self) -> dict[str, Tensor] | None:
        """Along v1, over all points: {"first": [N, width] x V1^T + c1, "linear<j>": R{z_j} of each
        later Linear, "output": [N, C] R{f}}, recombined from the products of the operator's solve
        (``MLPBackend.tangents_along``) where v1 lies in their span, else None (the passes then
        multiply the data by v1's block themselves)."""
        key = KEYS["tangents"]
        if key not in self.cache:
            self.cache[key] = None if self._operator is None or self.v1 is None else \
                self._operator.backend.tangents_along(self.v1)
        return self.cache[key]

    @property
    def taylor(self):
        """The MLP chain of the Taylor route, or None where another backend measures."""
        return self.backend.chain

    @property
    def input_split(self):
        """The input-layer split of the model where the method allows that route, else None."""
        return self.backend.split

    # ------------------------------------------------------------------ input checks
    def _unit(self, v1: Tensor) -> Tensor:
        if v1.numel() != self.dim or not (v1.dim() == 1 or (v1.dim() == 2 and v1.shape[1] == 1)):
            raise ValueError(f"Context: v1 must be a [{self.dim}] vector (one entry per trainable parameter), "
                             f"got shape {tuple(v1.shape)}")
        v = v1.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
        norm = v.norm().item()
        # A solver's eigenvector is unit up to rounding; anything else is a wrong vector.
        if not math.isfinite(norm) or abs(norm - 1.0) > 1e-2:
            raise ValueError(f"Context: v1 must be a unit eigenvector, got norm {norm:.6g}")
        return v / norm

    # ------------------------------------------------------------------ cache
    def _get(self, key: str, producer: Callable[[], None]):
        # A producer may fill several keys in one pass (e.g. group grads, losses and accuracies).
        if key not in self.cache:
            producer()
        return self.cache[key]

    def _need_v1(self, what: str) -> Tensor:
        if self.v1 is None:
            raise ValueError(f"Context: {what} needs v1 (the global top eigenvector); none was given")
        return self.v1

    # ------------------------------------------------------------------ group pass
    def group_weights(self) -> tuple[Tensor, Tensor]:
        """(union, W): the sorted union of the groups' indices and the [K, |union|] matrix whose
        row k holds 1/|G_k| on G_k, so that l_k = W[k] @ l[union]."""
        batch = self.objective.group_batch(self.groups)
        return batch.union, batch.W

    def _group_pass(self) -> None:
        """g_k, l_k and accuracy for every group, by the backend's group pass."""
        names = list(self.groups)
        if not names:
            self.cache[KEYS["group_grads"]], self.cache[KEYS["group_loss"]] = {}, {}
            self.cache[KEYS["group_accuracy"]] = {} if self.classification else None
            return
        self._batch = self.objective.group_batch(self.groups)
        grads, losses, correct = self.backend.group_pass(self._batch)
        if self._batch.factors is not None:
            self.cache["taylor_factors"] = self._batch.factors
        self.cache[KEYS["group_grads"]] = dict(zip(names, grads))
        self.cache[KEYS["group_loss"]] = {k: losses[i].item() for i, k in enumerate(names)}
        self.cache[KEYS["group_accuracy"]] = (None if correct is None else
                                              {k: correct[i].item() for i, k in enumerate(names)})

    @property
    def group_grads(self) -> dict[str, Tensor]:
        """name -> flat gradient g_k of the group's mean loss."""
        return self._get(KEYS["group_grads"], self._group_pass)

    @property
    def group_loss(self) -> dict[str, float]:
        return self._get(KEYS["group_loss"], self._group_pass)

    @property
    def group_accuracy(self) -> dict[str, float] | None:
        """name -> argmax accuracy, or None for float (regression) targets."""
        return self._get(KEYS["group_accuracy"], self._group_pass)

    # ------------------------------------------------------------------ curvature pass
    def curvature(self, sharpness_gradient: bool = True, group_quadratic: bool = True,
                  sharpness_coupling: bool = False) -> None:
        """Compute (and cache) whichever of grad S (the flat vector), the g_k^T H g_k and the
        Q_k = <g_k, grad S> are asked for and missing, in one call to the backend (H: the Hessian
        v1 came from, all points or ``hessian_subset``, weighted if the context is)."""
        names = list(self.groups)
        want_quad = group_quadratic and KEYS["group_hessian_quadratic"] not in self.cache
        want_coup = sharpness_coupling and KEYS["sharpness_coupling"] not in self.cache
        want_dS = sharpness_gradient and KEYS["sharpness_gradient"] not in self.cache
        if want_coup:
            self._need_v1("sharpness_coupling")
        if want_dS:
            self._need_v1("sharpness_gradient")
        if not names:  # nothing per group to compute
            for key, wanted in (("group_hessian_quadratic", want_quad), ("sharpness_coupling", want_coup)):
                if wanted:
                    self.cache[KEYS[key]] = {}
            want_quad = want_coup = False
        if not (want_quad or want_coup or want_dS):
            return
        if want_quad or want_coup:
            self.group_grads  # the group pass, which the curvature pass builds on
        kw = {} if self.forward is None or self.taylor is None else {"forward": self.forward}
        if kw and want_coup and self.tangents_v1 is not None:
            kw["tangents"] = self.tangents_v1
        r = self.backend.curvature(self._batch, self.v1, quadratic=want_quad, coupling=want_coup, gradient=want_dS,
                                   **kw)
        if want_quad:
            self.cache[KEYS["group_hessian_quadratic"]] = dict(zip(names, r["quadratic"].tolist()))
        if want_coup:
            self.cache[KEYS["sharpness_coupling"]] = dict(zip(names, r["coupling"].tolist()))
        if "gradient" in r:
            self.cache[KEYS["sharpness_gradient"]] = r["gradient"]
        if "s" in r:
            self.cache.setdefault(KEYS["v1_hessian_quadratic"], r["s"].item())

    @property
    def sharpness_gradient(self) -> Tensor:
        """Flat grad_theta (v1^T H(theta) v1) with the global v1 held fixed."""
        return self._get(KEYS["sharpness_gradient"], lambda: self.curvature(group_quadratic=False))

    @property
    def v1_hessian_quadratic(self) -> float:
        """v1^T H v1: equals the sharpness when v1 is the converged top eigenvector (a check)."""
        return self._get(KEYS["v1_hessian_quadratic"], lambda: self.curvature(group_quadratic=False))

    @property
    def sharpness_coupling(self) -> dict[str, float]:
        """name -> Q_k = <g_k, grad S> with the global v1 held fixed."""
        return self._get(KEYS["sharpness_coupling"],
                         lambda: self.curvature(sharpness_gradient=False, group_quadratic=False, sharpness_coupling=True))

    @property
    def group_hessian_quadratic(self) -> dict[str, float]:
        """name -> g_k^T H g_k with H the training-loss Hessian."""
        return self._get(KEYS["group_hessian_quadratic"], lambda: self.curvature(sharpness_gradient=False))

    # ------------------------------------------------------------------ per-example quantities
    @property
    def per_example_loss(self) -> Tensor:
        """[N] l_i at the snapshotted parameters."""
        return self._get(KEYS["per_example_loss"],
                         lambda: self.cache.setdefault(KEYS["per_example_loss"], per_example.losses(self.objective)
                                                       if self.forward is None else self.forward.losses))

    def _projection_pass(self) -> None:
        v1 = self._need_v1("per_example_projection")
        if self.forward is not None:
            self.cache[KEYS["per_example_projection"]] = per_example.projections_from_forward(
                self.forward, self.param_names, v1, None if self.tangents_v1 is None else self.tangents_v1["output"])
            self.cache.setdefault(KEYS["per_example_loss"], self.forward.losses)
            return
        proj, loss = per_example.projections(self.objective, v1)
        self.cache[KEYS["per_example_projection"]] = proj
        self.cache.setdefault(KEYS["per_example_loss"], loss)

    @property
    def per_example_projection(self) -> Tensor:
        """[N] <grad l_i, v1> with the global v1 (one forward-mode pass; caches the losses too)."""
        return self._get(KEYS["per_example_projection"], self._projection_pass)

    def _grad_norm_pass(self) -> None:
        sq = None
        if self.forward is not None and self.grad_norm_method in ("auto", "linear"):
            sq = per_example.grad_norm_sq_from_forward(self.forward)  # the same identity, no data product
        elif self.grad_norm_method in ("auto", "linear"):
            try:
                sq = per_example.grad_norm_sq_linear(self.objective)
            except per_example.NotLinear:
                if self.grad_norm_method == "linear":
                    raise ValueError("Context: grad_norm_method='linear' needs every trainable tensor to be the "
                                     "weight or bias of an nn.Linear applied once to [batch, features] inputs; "
                                     "use 'vmap' (or 'auto') for this model") from None
        if sq is None:
            sq = per_example.grad_norm_sq_vmap(self.objective)
        self.cache[KEYS["per_example_grad_norm"]] = sq.clamp_min(0).sqrt()

    @property
    def per_example_grad_norm(self) -> Tensor:
        """[N] ||grad l_i||."""
        return self._get(KEYS["per_example_grad_norm"], self._grad_norm_pass)
