"""The autograd backend: curvature of any model by double (and triple) backward.

HVP batch: double backward through the chunk's gradient graph (built once and reused by every
product when there is a single chunk: one backward pass per product) or forward-over-reverse
(``torch.func.jvp`` of ``torch.func.grad``, vmapped over a block). Group batch: the group gradients
from one forward over the union of the groups' points and one K-batched vector-Jacobian product;
grad S (S = v1^T H v1, v1 fixed) and the K products H g_k share one gradient graph per chunk
(grad S is one extra reverse pass through the HVP of v1). The other backends
(``eosbranch.curvature.backend``) derive from this one and replace what their models allow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .flat import unflatten
from .objective import Chunk, GroupBatch, Objective, running_stats_frozen

__all__ = ["AutogradBackend", "DEFAULT_HVP_METHOD", "AUTOGRAD_FORMS"]

# Default HVP form per device type. A fixed table, not a timing at run time: a timing-dependent
# choice would break bit-for-bit reproducibility. CPU, measured with benchmarks/curvature.py
# (cost of one product in full-batch gradients, double backward vs forward-over-reverse):
# MLP 3072-512-512-2 on 2,000 points 1.24 vs 3.11 (one chunk, graph cached), 2.31 vs 3.20
# (two chunks); the same MLP on digits 2.15 vs 3.97 and 3.63 vs 4.36. CUDA: not measured here;
# double backward too, since with the cached graph a product is a single backward pass.
DEFAULT_HVP_METHOD = {"cpu": "double_backward", "cuda": "double_backward"}
AUTOGRAD_FORMS = ("double_backward", "forward_over_reverse")


class AutogradBackend:
    """Curvature of any model (see the module docstring). ``chain``/``split`` are the structures
    the factorised backends use; None here."""

    name = "autograd"
    chain = None
    split = None

    def __init__(self, obj: Objective, form: str | None = None, batched_vjp: bool = True):
        self.obj = obj
        self.form = form or DEFAULT_HVP_METHOD.get(obj.device.type, "double_backward")
        self.batched_vjp = batched_vjp
        self._graph = None  # (leaves, gradients) of the single chunk, built on first use

    @property
    def hvp_method(self) -> str:
        return self.form

    def frozen(self):
        """The context a pass through the model's modules runs in (BatchNorm buffers untouched)."""
        return running_stats_frozen(self.obj.model)

    # ------------------------------------------------------------------ HVP batch
    def _gradient_graph(self, chunk: Chunk):
        obj = self.obj
        leaves = [p.detach().requires_grad_(True) for p in obj.params]
        with torch.enable_grad():
            loss = obj.chunk_loss(obj.outputs(leaves, chunk.X), chunk)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        return leaves, [(i, grads[i]) for i in used]

    def _cached_graph(self, chunk: Chunk):
        """The single chunk's gradient graph, built once and reused by every product."""
        self._graph = self._graph or self._gradient_graph(chunk)
        return self._graph

    def hvp(self, tangents: list[Tensor], chunk: Chunk) -> list[Tensor | None]:
        """H_c v for a block of m tangents (per parameter [m, *shape]), H_c the Hessian of the chunk's
        L_c; per parameter [m, *shape], None for a zero block."""
        batched = tangents[0].shape[0] > 1
        if self.form == "forward_over_reverse":
            return self._hvp_forward_over_reverse(tangents, chunk, batched)
        single = self.obj.single_chunk
        leaves, grads = self._cached_graph(chunk) if single else self._gradient_graph(chunk)
        if not grads:  # loss at most linear in the parameters: H = 0
            return [None] * len(leaves)
        tg = [tangents[i] if batched else tangents[i][0] for i, _ in grads]
        hv = torch.autograd.grad([g for _, g in grads], leaves, grad_outputs=tg, retain_graph=single,
                                 is_grads_batched=batched, allow_unused=True)
        return [h if h is None or batched else h.unsqueeze(0) for h in hv]

    def _hvp_forward_over_reverse(self, tangents, chunk: Chunk, batched: bool):
        obj = self.obj
        primals = dict(zip(obj.names, obj.params))
        grad_fn = torch.func.grad(lambda pd: obj.chunk_loss(obj.outputs(pd, chunk.X), chunk))

        def hvp(td):
            return torch.func.jvp(grad_fn, (primals,), (td,))[1]

        td = dict(zip(obj.names, tangents))
        if batched:  # one vmapped product for the whole block: the primal pass is shared
            out = torch.func.vmap(hvp)(td)
        else:
            out = {n: t.unsqueeze(0) for n, t in hvp({n: t[0] for n, t in td.items()}).items()}
        return [out[n] for n in obj.names]

    def shared_forward(self):
        """The forward and adjoint cache over all the objective's points that other passes of a
        measurement may read (an MLP chain's R-operator cache), or None: autograd keeps none."""
        return None

    def record_products(self) -> None:
        """Keep what later products leave for ``tangents_along``: nothing on this route."""

    def tangents_along(self, v: Tensor) -> dict[str, Tensor] | None:
        """Tangents along ``v`` recombined from the products made so far, or None: only the
        R-operator records them (``MLPBackend.tangents_along``)."""
        return None

    def gradient_hint(self) -> list[Tensor | None] | None:
        """The full-batch gradient (per parameter) when it is free: double backward on a single
        chunk, whose graph every product reuses; else None."""
        if self.form == "forward_over_reverse" or not self.obj.single_chunk:
            return None
        with self.frozen():
            _, grads = self._cached_graph(next(self.obj.hessian_chunks()))
        parts = dict(grads)
        return [parts[i].detach() if i in parts else None for i in range(len(self.obj.params))]

    # ------------------------------------------------------------------ group batch
    def _vjp(self, outputs: list[Tensor], leaves, cotangents: list[Tensor], retain: bool = False) -> Tensor:
        """[K, dim]: row k = sum_j <cotangents[j][k], d outputs[j] / d theta>. One vmapped backward
        for all K rows (measured faster than K sequential ones on CPU), or K sequential ones."""
        obj = self.obj
        K = cotangents[0].shape[0]
        if self.batched_vjp and K > 1:
            parts = torch.autograd.grad(outputs, leaves, grad_outputs=cotangents, is_grads_batched=True,
                                        retain_graph=retain, allow_unused=True)
        else:
            rows = [torch.autograd.grad(outputs, leaves, grad_outputs=[c[k] for c in cotangents],
                                        retain_graph=retain or k < K - 1, allow_unused=True) for k in range(K)]
            parts = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(leaves))]
        return torch.cat([torch.zeros(K, p.numel(), dtype=obj.dtype, device=obj.device) if g is None
                          else g.reshape(K, -1) for g, p in zip(parts, obj.params)], dim=1)

    def group_pass(self, batch: GroupBatch) -> tuple[Tensor, Tensor, Tensor | None]:
        """([K, dim] g_k, [K] l_k, [K] accuracies or None) from one forward over the union of the
        groups' points and one K-batched vjp with the [K, |union|] weights; sets ``batch.grads``."""
        obj, K = self.obj, batch.W.shape[0]
        grads = torch.zeros(K, obj.dim, dtype=obj.dtype, device=obj.device)
        losses = torch.zeros(K, dtype=obj.dtype, device=obj.device)
        correct = torch.zeros(K, dtype=obj.dtype, device=obj.device)
        with self.frozen(), torch.enable_grad():
            for Xc, yc, pos in obj.chunks(batch.union):
                Wc = batch.W[:, pos.to(obj.device)]
                leaves = [p.detach().requires_grad_(True) for p in obj.params]
                out = obj.outputs(leaves, Xc)
                per = obj.loss(out, yc, reduction="none")
                grads += self._vjp([per], leaves, [Wc])
                losses += Wc @ per.detach()
                if obj.classification:
                    correct += Wc @ obj.correct(out.detach(), yc)
        batch.grads = grads
        return grads, losses, correct if obj.classification else None

    def curvature(self, batch: GroupBatch | None, v1: Tensor | None, quadratic: bool, coupling: bool,
                  gradient: bool) -> dict:
        """Whichever is asked of ``quadratic`` [K] g_k^T H g_k, ``coupling`` [K] Q_k = <g_k, grad S>
        and ``gradient`` (the flat grad S), with ``s`` = v1^T H v1 whenever grad S is formed.

        Per chunk c (weight_c): g = grad L_c with create_graph; H v1 by a backward through g, itself
        with a graph; grad S = backward of <H v1, v1> (the one extra reverse pass); the K products
        H g_k by one batched backward through g."""
        obj = self.obj
        want_dS = gradient or coupling
        G = batch.grads if quadratic else None
        K = 0 if G is None else G.shape[0]
        v_parts = unflatten(v1, obj.params) if want_dS else None
        dS = torch.zeros(obj.dim, dtype=obj.dtype, device=obj.device)
        s_total = torch.zeros((), dtype=obj.dtype, device=obj.device)
        quad = torch.zeros(K, dtype=obj.dtype, device=obj.device)
        with self.frozen(), torch.enable_grad():
            for chunk in obj.hessian_chunks():
                leaves = [p.detach().requires_grad_(True) for p in obj.params]
                loss = obj.chunk_loss(obj.outputs(leaves, chunk.X), chunk)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if not used:  # loss at most linear in the parameters: H = 0 and grad S = 0
                    continue
                gu = [grads[i] for i in used]
                weight = chunk.weight
                if want_dS:
                    hv = torch.autograd.grad(gu, leaves, grad_outputs=[v_parts[i] for i in used],
                                             create_graph=True, retain_graph=True, allow_unused=True)
                    s = torch.stack([(h * v).sum() for h, v in zip(hv, v_parts) if h is not None]).sum()
                    s_total += weight * s.detach()
                    if s.requires_grad:  # else H is constant here and grad S = 0
                        dS += weight * self._vjp([s], leaves, [s.new_ones(1)], retain=True)[0]
                if K:
                    tangents = unflatten(G.T, obj.params)  # each [K, *shape]
                    quad += weight * (self._vjp(gu, leaves, [tangents[i] for i in used]) * G).sum(1)
        out = {}
        if quadratic:
            out["quadratic"] = quad
        if want_dS:
            out["gradient"], out["s"] = dS, s_total
        if coupling:
            out["coupling"] = torch.stack([g @ dS for g in batch.grads])
        return out
