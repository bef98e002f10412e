"""Hessian-vector products of MLPs by Pearlmutter's R-operator, written out layer by layer.

For the models ``eosbranch.mlp_chain.split`` accepts (parameter-free modules, then ``nn.Linear``
layers and elementwise activations), a product H v is a forward pass of tangents and a backward
pass of their adjoints through quantities computed once per operator: each Linear layer's input
a, each activation's derivatives s' and s'', and the adjoints delta = dL/dz of the loss. Per layer
(W, b; tangent V, c) with R{.} the derivative along v:

    forward    R{z} = R{a} W^T + a V^T + c                 R{h} = s'(z) R{z}
    loss       R{delta_f} = omega * (d2l/df2) R{f}
    backward   R{dW} = R{delta_z}^T a + delta_z^T R{a}     R{db} = sum_n R{delta_z}
               R{delta_a} = R{delta_z} W + delta_z V      R{delta_z} = s' R{delta_h} + s'' R{z} delta_h

At the first layer R{a} = 0 and the data enter only through a V^T and R{delta_z}^T a: two products
of the data with a width x D matrix, the least any exact product needs. Compared with double
backward through autograd's gradient graph the arithmetic is the same, but building the operator
costs a forward pass (not a forward and a create_graph backward), a block of m vectors runs as m
times wider matrix products, and there is no per-node autograd overhead, which dominates on small
models. The HVP batch of the mlp backend (``eosbranch.curvature.backend``; method "r_operator").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..loss import output_derivatives
from ..mlp_chain import Chain, activation

__all__ = ["Cache", "build", "hvp", "gradient", "example_adjoints", "output_tangent"]


class Cache:
    """Everything a product needs at fixed parameters on one chunk of data."""

    def __init__(self, chain: Chain, params: dict[str, Tensor]):
        self.chain, self.params = chain, params
        self.inputs: list[Tensor] = []   # per Linear: its input a [n, in]
        self.derivs: list[tuple] = []    # per activation: (s', s'' or None)
        self.s2_delta: list[Tensor | None] = []  # per activation: s'' * its output's adjoint (fixed)
        self.deltas: list[Tensor] = []   # per step, the adjoint of the step's output [n, out]
        self.omega: Tensor | None = None
        self.f: Tensor | None = None
        self.loss_grad: Tensor | None = None  # per-example dl/df (with its graph unless loss_hess is known)
        self.loss_hess = None  # closed-form v -> (d2l/df2) v of a built-in loss (eosbranch.loss)
        self.losses: Tensor | None = None     # per-example losses l_i [n]
        self.pre: list[Tensor] = []  # per Linear: its output z [n, out] (pre[0] = x W1^T + b1)


def build(chain: Chain, params: dict[str, Tensor], loss_fn, X: Tensor, y: Tensor, omega: Tensor) -> Cache:
    """Forward and adjoint pass at ``params`` on (X, y); ``omega`` [n] are the points' weights in the
    objective sum_i omega_i l_i (all ones: the adjoints are each example's own dl_i/dz, which
    ``eosbranch.curvature.taylor`` uses for the group gradients' factors)."""
    c = Cache(chain, params)
    x = chain.inputs(X)
    with torch.no_grad():
        for step in chain.steps:
            if step[0] == "linear":
                _, _, w, b = step
                c.inputs.append(x)
                x = F.linear(x, params[w], params[b] if b else None)
                c.pre.append(x)
            else:
                h, s1, s2 = activation(step[1], x, graph=False)
                c.derivs.append((s1, s2))
                x = h
    known = output_derivatives(loss_fn, x, y)  # built-in losses: no autograd graph of the loss
    if known is not None:
        c.f, c.loss_grad, c.losses, c.loss_hess = x, known.grad, known.losses, known.hess_times
    else:
        with torch.enable_grad():
            f = x.detach().requires_grad_(True)
            per = loss_fn(f, y, reduction="none")
            gl = torch.autograd.grad(per.sum(), f, create_graph=True)[0]
        c.f, c.loss_grad, c.losses = f, gl, per.detach()
    c.omega = omega
    deltas = _adjoints(c, omega.unsqueeze(-1) * c.loss_grad.detach())
    c.deltas = deltas
    acts = [i for i, step in enumerate(chain.steps) if step[0] != "linear"]
    with torch.no_grad():
        c.s2_delta = [None if s2 is None else s2 * deltas[i] for i, (_, s2) in zip(acts, c.derivs)]
    return c


def _adjoints(c: Cache, d: Tensor) -> list[Tensor]:
    """Per step, the adjoint of its output, from ``d`` at the model's output, backward. The first
    layer's input is data and needs no adjoint, so no product here touches the data."""
    chain, params = c.chain, c.params
    deltas: list[Tensor] = [None] * len(chain.steps)
    with torch.no_grad():
        li, ai = len(c.inputs), len(c.derivs)
        for i in range(len(chain.steps) - 1, -1, -1):
            deltas[i] = d
            step = chain.steps[i]
            if step[0] == "linear":
                li -= 1
                if li > 0:
                    d = d @ params[step[2]]
            else:
                ai -= 1
                d = c.derivs[ai][0] * d
    return deltas


def example_adjoints(c: Cache) -> list[Tensor]:
    """Per step, each example's own dl_i/d(output of the step) [n, width]: the cache's adjoints
    where the points' weights are all one, else a backward pass from dl_i/df (no data product)."""
    if bool((c.omega == 1).all()):
        return c.deltas
    return _adjoints(c, c.loss_grad.detach())


def output_tangent(c: Cache, tangent: dict[str, Tensor]) -> Tensor:
    """[n, C] R{f}: the derivative of each example's output along one tangent (name -> tensor of
    the parameter's shape), forward through the cached inputs and activation derivatives: one
    product of the data with the first layer's tangent, none with its weight."""
    R, li, ai = None, 0, 0
    with torch.no_grad():
        for step in c.chain.steps:
            if step[0] == "linear":
                _, _, w, b = step
                out = c.inputs[li] @ tangent[w].T
                if R is not None:
                    out.addmm_(R, c.params[w].T)
                if b:
                    out += tangent[b]
                R, li = out, li + 1
            else:
                R, ai = c.derivs[ai][0] * R, ai + 1
    return R


def _loss_hessian_times(c: Cache, Rf: Tensor) -> Tensor:
    """omega * (d2l/df2) R{f} per example, for a block [n, m, C] (points first, as in ``hvp``)."""
    per_tangent = Rf.transpose(0, 1)  # [m, n, C]: the loss's own layout (tangents first)
    if c.loss_hess is not None:
        hf = c.loss_hess(per_tangent)
    elif not c.loss_grad.requires_grad:  # loss linear in f
        return torch.zeros_like(Rf)
    else:
        hf = torch.autograd.grad(c.loss_grad, c.f, grad_outputs=per_tangent, retain_graph=True,
                                 is_grads_batched=True, allow_unused=True)[0]
        if hf is None:
            return torch.zeros_like(Rf)
    return (c.omega.unsqueeze(-1) * hf).transpose(0, 1).contiguous()


def _wide(V: Tensor) -> Tensor:
    """[m, out, in] -> [in, m*out]: m tangents side by side, so x @ _wide(V) is one product."""
    m, o, i = V.shape
    return V.reshape(m * o, i).T


def hvp(c: Cache, tangents: dict[str, Tensor], record: dict | None = None) -> dict[str, Tensor]:
    """H v for a block of m tangents (name -> [m, *shape]); returns name -> [m, *shape].
    ``record``: a dict that receives the block's first-layer tangent R{z_1} = x V_1^T + c_1
    [n, m, width] under "first" (the product's one forward contact with the data), each later
    Linear's output tangent R{z_j} under "linear<j>" (j counted from 0), and the model's output
    tangent R{f} [n, m, C] under "output". All are linear in v, so
    ``eosbranch.curvature.backend.MLPBackend.tangents_along`` recombines them for a Ritz vector.

    Internally a block is laid out points first, [n, m, width], contiguous: every product with a
    weight matrix is then one matrix product over n*m rows, and the per-point factors (s', the
    adjoints, [n, width]) broadcast over m along a contiguous axis. (Tangents first, [m, n, width]
    as transposed views, made the elementwise steps strided: a block of 5 took 10.0 ms instead of
    8.6 on quick.yaml.)"""
    chain, P = c.chain, c.params
    m = next(iter(tangents.values())).shape[0]
    result: dict[str, Tensor] = {}
    with torch.no_grad():
        R, Ra, Rz = None, [], []  # R{} of the current output [n, m, width]; per Linear R{a}; per activation R{z}
        li = ai = 0
        for step in chain.steps:
            if step[0] == "linear":
                _, mod, w, b = step
                a = c.inputs[li]
                n = a.shape[0]
                Ra.append(R)
                out = (a @ _wide(tangents[w])).view(n, m, -1)  # a V_k^T, all k
                if R is not None:  # in place: on small models each temporary costs as much as its product
                    out.view(n * m, -1).addmm_(R.reshape(n * m, -1), P[w].T)
                if b:
                    out += tangents[b]
                if record is not None:  # never written to below
                    record["first" if li == 0 else f"linear{li}"] = out
                R = out
                li += 1
            else:
                Rz.append(R)
                R = c.derivs[ai][0].unsqueeze(1) * R
                ai += 1
        if record is not None:
            record["output"] = R
        Rd = _loss_hessian_times(c, R)  # R{delta} at the output
        for i in range(len(chain.steps) - 1, -1, -1):
            step = chain.steps[i]
            if step[0] == "linear":
                li -= 1
                _, mod, w, b = step
                a, dz, out_f = c.inputs[li], c.deltas[i], mod.out_features
                n = a.shape[0]
                gW = Rd.reshape(n, m * out_f).T @ a
                if Ra[li] is not None and m == 1:  # + delta_z^T R{a}
                    gW.addmm_(dz.T, Ra[li].reshape(n, -1))
                elif Ra[li] is not None:  # all k: [out, m*in] -> [m, out, in]
                    gW.view(m, out_f, -1).add_((dz.T @ Ra[li].reshape(n, -1)).view(out_f, m, -1).transpose(0, 1))
                gW = gW.view(m, out_f, -1)
                result[w] = gW
                if b:
                    result[b] = Rd.sum(0)
                if li > 0:  # R{delta_a} = R{delta_z} W + delta_z V
                    Rd_next = Rd.reshape(n * m, out_f) @ P[w]
                    if m == 1:
                        Rd_next.addmm_(dz, tangents[w][0])
                    else:
                        Rd_next.view(n, -1).add_(dz @ tangents[w].transpose(0, 1).reshape(out_f, -1))
                    Rd = Rd_next.view(n, m, -1)
            else:
                ai -= 1
                Rd = c.derivs[ai][0].unsqueeze(1) * Rd
                if c.s2_delta[ai] is not None:
                    Rd.addcmul_(c.s2_delta[ai].unsqueeze(1), Rz[ai])
    return result


def gradient(c: Cache) -> dict[str, Tensor]:
    """The gradient of the objective (name -> tensor) from the cached adjoints: one product of the
    data with the first layer's adjoint, the rest small."""
    out = {}
    li = 0
    with torch.no_grad():
        for i, step in enumerate(c.chain.steps):
            if step[0] == "linear":
                _, _, w, b = step
                out[w] = c.deltas[i].T @ c.inputs[li]
                if b:
                    out[b] = c.deltas[i].sum(0)
                li += 1
    return out
