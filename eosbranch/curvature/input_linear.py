"""Group curvature through an input Linear layer: exact R_k and Q_k without the input layer's cost.

Most studied models begin with an ``nn.Linear`` applied to the (flattened) data: the 2026 study's
MLP 3072-512-512-2 keeps 85% of its parameters, and almost all of its arithmetic, there. Write the
model as f(x) = R(x W1^T + b1; phi), so the training loss is L(theta) = F(Z(theta), phi) with
Z = A W1^T + 1 b1^T *linear* in (W1, b1), A the data after parameter-free modules (e.g. Flatten).
For a direction u = (U1, c1, u_phi) the input layer's tangent is Zdot = A U1^T + 1 c1^T, and since
Z has no second derivative in theta (the Hessian of F, written H_F, acts on (Zdot, u_phi)):

    u^T H u     = (Zdot, u_phi)^T H_F (Zdot, u_phi)                          (R_k: u = g_k)
    <u, grad S> = <dS/dZ, Zdot> + <dS/dphi, u_phi>,                           (Q_k: u = g_k)
    S           = (Zdot_v, v_phi)^T H_F (Zdot_v, v_phi)  with Zdot_v = A V1^T + 1 c1^T held fixed.

Past Z everything is ordinary double (and triple) backward on F: the cheap layers. The input layer
contributes one product of the data with V1 (for S) and, per group, Zdot_k = A g_{k,W1}^T + g_{k,b1}.
The group gradient's input block g_{k,W1} = sum_{i in U} w_ki delta_i a_i^T has rank <= |U| (U the
union of the groups' points, delta_i = dl_i/dZ_i), so A g_{k,W1}^T = (A A_U^T)(w_k * Delta_U): no
product of the data with a width x D matrix per group. The contraction <dS/dZ, Zdot_k> replaces the
input-layer block of grad S, which is never formed. The input_linear backend
(``eosbranch.curvature.backend``) uses this where ``split`` accepts the model and the rest keeps
examples apart; its HVP batch is the autograd backend's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .flat import unflatten
from .objective import GroupBatch, Objective, running_stats_frozen
from ..mlp_chain import sequential_children

__all__ = ["InputSplit", "split", "group_curvature"]


@dataclass
class InputSplit:
    """A model cut at its input Linear layer: ``prefix`` (parameter-free modules), ``layer`` and
    its flat-parameter names, and the ``rest`` as (name prefix, module) pairs in order."""

    prefix: list[nn.Module]
    layer: nn.Linear
    weight: str
    bias: str | None
    rest: list[tuple[str, nn.Module]]

    def inputs(self, X: Tensor) -> Tensor:
        for mod in self.prefix:
            X = mod(X)
        return X

    def head(self, Z: Tensor, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
        """R(Z; phi): the modules after the input layer, with the given parameters and buffers."""
        for name, mod in self.rest:
            own = {k[len(name) + 1:]: v for k, v in params.items() if k.startswith(name + ".")}
            own.update({k[len(name) + 1:]: v for k, v in buffers.items() if k.startswith(name + ".")})
            Z = functional_call(mod, own, (Z,)) if own else mod(Z)
        return Z


def _holds_tensors(mod: nn.Module) -> bool:
    return any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())


def split(model: nn.Module, param_names: list[str], X_sample: Tensor | None = None) -> InputSplit | None:
    """An :class:`InputSplit` when ``model`` is an ``nn.Sequential`` whose first module holding
    tensors is an ``nn.Linear`` with a trainable weight (modules before it hold none, e.g.
    Flatten) that sees one row per example, else None. ``param_names``: the trainable parameters
    in flat-layout order; ``X_sample``: a batch of inputs (a Linear over the last axis of
    [n, tokens, features] would mix no rows, but its rows are then tokens, not examples, and the
    factorisation's per-example rows of Z do not exist: such models take the generic pass)."""
    children = sequential_children(model)
    if children is None:
        return None
    for j, (name, mod) in enumerate(children):
        if not _holds_tensors(mod):
            continue
        if type(mod) is not nn.Linear:  # a subclass may compute something else
            return None
        weight = f"{name}.weight"
        bias = f"{name}.bias" if mod.bias is not None else None
        if weight not in param_names or (bias is not None and bias not in param_names):
            return None  # a frozen input layer: its tangent is not a group-gradient block
        if param_names[:2 if bias else 1] != [weight] + ([bias] if bias else []):
            return None
        sp = InputSplit([m for _, m in children[:j]], mod, weight, bias, children[j + 1:])
        if X_sample is not None:
            with torch.no_grad():
                if sp.inputs(X_sample[:2]).dim() != 2:
                    return None
        return sp
    return None


def _affine(A: Tensor, U1: Tensor, c1: Tensor | None) -> Tensor:
    """A U1^T + c1: the input layer's output (U1 = W1) or its tangent along a direction (U1 [h, D]),
    or a batch of tangents (U1 [K, h, D] -> [K, n, h])."""
    out = A @ U1.transpose(-1, -2)
    return out if c1 is None else out + c1.unsqueeze(-2)


def group_curvature(obj: Objective, sp: InputSplit, batch: GroupBatch, v1: Tensor | None,
                    coupling: bool, quadratic: bool) -> dict:
    """``{"quadratic": [K] g_k^T H g_k, "coupling": [K] <g_k, grad S>, "s": v1^T H v1}`` for the
    groups of ``batch`` (after the group pass), with H the Hessian of ``obj`` (the one v1 came
    from: all points or a subset, weighted if it is)."""
    G = batch.grads  # [K, dim], from the group pass
    K = G.shape[0]
    P = dict(zip(obj.names, obj.params))
    W1, b1 = P[sp.weight], (P[sp.bias] if sp.bias else None)
    rest_names = [n for n in obj.names if n not in (sp.weight, sp.bias)]
    parts = dict(zip(obj.names, unflatten(G.T, obj.params)))  # each [K, *shape]
    u_rest = [parts[n] for n in rest_names]
    lowrank = _lowrank_factors(obj, sp, batch, W1, b1) if K else None
    if coupling:
        vparts = dict(zip(obj.names, unflatten(v1, obj.params)))
        V1, c1v, v_rest = vparts[sp.weight], (vparts[sp.bias] if sp.bias else None), [vparts[n] for n in rest_names]
    quad = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    coup = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    s_total = torch.zeros((), dtype=obj.dtype, device=obj.device)
    with running_stats_frozen(obj.model), torch.enable_grad():
        for chunk in obj.hessian_chunks():
            Xc, yc, weight = chunk.X, chunk.y, chunk.weight
            A = sp.inputs(Xc).reshape(Xc.shape[0], -1)
            with torch.no_grad():
                Z0 = _affine(A, W1, b1)
                if lowrank is not None:
                    A_U, coef = lowrank
                    Zk = (A @ A_U.T) @ coef  # [K, n_c, h]: (A A_U^T)(w_k * Delta_U)
                    if sp.bias:
                        Zk += parts[sp.bias].unsqueeze(1)
                else:
                    Zk = _affine(A, parts[sp.weight], parts[sp.bias] if sp.bias else None)
                Zv = _affine(A, V1, c1v) if coupling else None
            tk = [Zk] + u_rest  # the K group directions in (Z, phi)
            Z = Z0.requires_grad_(True)
            phi = [P[n].detach().requires_grad_(True) for n in rest_names]
            leaves = [Z] + phi
            out = sp.head(Z, dict(zip(rest_names, phi)), obj.buffers)
            F = obj.chunk_loss(out, chunk)
            gF = torch.autograd.grad(F, leaves, create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(gF) if g is not None and g.requires_grad]
            if not used:  # F at most linear: no curvature in this chunk
                continue
            gu = [gF[i] for i in used]
            if coupling:
                tv = [Zv] + v_rest
                hv = torch.autograd.grad(gu, leaves, grad_outputs=[tv[i] for i in used], create_graph=True,
                                         retain_graph=True, allow_unused=True)
                s = sum((h * t).sum() for h, t in zip(hv, tv) if h is not None)
                s_total += weight * s.detach()
                if K and s.requires_grad:  # else S is constant here: Q_k gets nothing from this chunk
                    dS = torch.autograd.grad(s, leaves, retain_graph=True, allow_unused=True)
                    for d, t in zip(dS, tk):
                        if d is not None:
                            coup += weight * (t * d.unsqueeze(0)).reshape(K, -1).sum(1)
            if quadratic and K:
                hk = torch.autograd.grad(gu, leaves, grad_outputs=[tk[i] for i in used],
                                         is_grads_batched=True, allow_unused=True)
                for h, t in zip(hk, tk):
                    if h is not None:
                        quad += weight * (h * t).reshape(K, -1).sum(1)
    return {"quadratic": quad, "coupling": coup, "s": s_total}


def _lowrank_factors(obj: Objective, sp: InputSplit, batch: GroupBatch, W1: Tensor, b1: Tensor | None):
    """(A_U, coef) with coef[k] = w_k * Delta_U, so that A g_{k,W1}^T = (A A_U^T) coef[k]; or None
    where the dense product A g_{k,W1}^T is cheaper (groups as large as the layer is wide)."""
    union, Wmat = batch.union, batch.W
    n_u, K = union.numel(), Wmat.shape[0]
    h, D = W1.shape
    n = obj.n_points
    if n * D * n_u + K * n * n_u * h >= K * n * D * h:
        return None
    phi = {k: v for k, v in zip(obj.names, obj.params) if k not in (sp.weight, sp.bias)}
    A_parts, D_parts = [], []
    with running_stats_frozen(obj.model), torch.enable_grad():
        for Xc, yc, _ in obj.chunks(union):
            A = sp.inputs(Xc).reshape(Xc.shape[0], -1)
            Z = _affine(A, W1, b1).detach().requires_grad_(True)
            out = sp.head(Z, phi, obj.buffers)
            per = obj.loss(out, yc, reduction="none")
            # Each loss depends on its own row of Z only, so row i of this gradient is dl_i / dZ_i.
            D_parts.append(torch.autograd.grad(per.sum(), Z)[0])
            A_parts.append(A)
    A_U, Delta = torch.cat(A_parts), torch.cat(D_parts)
    return A_U, Wmat.unsqueeze(-1) * Delta.unsqueeze(0)  # [K, |U|, h]
