"""Group curvature by Taylor-mode forward propagation through an MLP: R_k and Q_k for every group
in one pass over the data, without the double and triple backward of the generic pass.

Applies to the models ``eosbranch.mlp_chain.split`` accepts (parameter-free modules, then
``nn.Linear`` layers and elementwise activations): the group batch of the mlp backend
(``eosbranch.curvature.backend``); its HVP batch is ``eosbranch.curvature.mlp``.

Along a direction u (W -> W + aU, b -> b + ac in every layer) the first two derivatives in a of
every pre-activation z and activation h propagate forward:

    Linear       z' = h' W^T + h U^T + c          z'' = h'' W^T + 2 h' U^T
    activation   h' = s'(z) z'                    h'' = s''(z) z'^2 + s'(z) z''
    loss         l'' = f'^T (d2l/df2) f' + (dl/df) . f''

and u^T H u = sum_i omega_i l_i'' (omega_i the point's weight in the training loss).

- R_k (u = g_k): a layer's block of a group gradient is U_k = sum_{i in G_k} w_ki delta_i a_i^T
  (a_i the layer's input, delta_i = dl_i/dz_i), of rank <= |G_k|, so h U_k^T = (h A_k^T)(w_k delta_k)
  costs n |G_k| (in + out) rather than n in out. Each group's stream then costs about one dense
  product per hidden layer (two for curved activations), and no backward pass at all.
- Q_k = <g_k, grad S>, S = v1^T H v1 with v1 fixed: S is the same forward along v1, recorded by
  autograd; one reverse pass gives dS/dZ_1 (the first layer's output, so dS/dW_1 is never formed)
  and dS/dphi for the later layers, and Q_k = <dS/dZ_1, Z_1,k'> + <dS/dphi, g_k,phi>. This
  reverse-over-forward costs about half of the triple backward through an HVP. Within a
  measurement the forward values it needs are known already: the Linear outputs z from the
  R-operator's cache, v1's tangents R{z} recombined from the solve's products; they enter through
  ``_KnownAffine`` (value given, backward the layer's own), so along v1 only its second-order
  tangent and the reverse pass multiply by the hidden weights (the group streams still do).

The factors (a_i, delta_i) come from one forward and one backward to the pre-activations over the
union of the groups' points, which also give the group gradients, losses and accuracies
(:func:`group_pass`). Each example's loss must depend on its own input only (true of these models).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from . import mlp as r_operator
from .flat import unflatten
from .objective import GroupBatch, Objective
from ..loss import output_derivatives
from ..mlp_chain import Chain, activation

__all__ = ["group_pass", "group_curvature"]

# Points per block of the data pass (measured on 2 CPU cores: 1024 balances matrix-product
# efficiency against the memory traffic of the K group streams).
SUB_CHUNK = 1024


def _act_jet(s1: Tensor, s2: Tensor | None, x1: Tensor, x2: Tensor | None):
    """(h', h'') of an activation from (z', z''); z'' None means 0. Shapes broadcast over groups."""
    h2 = None
    if s2 is not None:
        h2 = s2 * x1 * x1
    if x2 is not None:
        h2 = s1 * x2 if h2 is None else h2 + s1 * x2
    return s1 * x1, h2


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


# ---------------------------------------------------------------------- group pass
def group_pass(obj: Objective, chain: Chain, batch: GroupBatch) -> tuple[Tensor, Tensor, Tensor | None]:
    """([K, dim] group gradients, [K] losses, [K] accuracies or None) and the per-layer factors of
    the gradient blocks (``batch.factors``), from one forward and adjoint pass
    (``eosbranch.curvature.mlp.build``) over the union of the groups' points."""
    union, Wmat = batch.union, batch.W
    P = dict(zip(obj.names, obj.params))
    K, L = Wmat.shape[0], len(chain.linears)
    # The flat group gradients, written in place through per-layer views [K, out, in] and [K, out].
    grads = torch.zeros(K, obj.dim, dtype=obj.dtype, device=obj.device)
    named = dict(zip(obj.names, unflatten(grads.T, obj.params)))  # [K, *shape] views into grads
    zero_bias = [torch.zeros(K, mod.out_features, dtype=obj.dtype, device=obj.device) for _, mod, _, _ in chain.linears]
    blocks = [(named[w], named[b] if b else zero_bias[j]) for j, (_, _, w, b) in enumerate(chain.linears)]
    a_rows = [[] for _ in range(L)]
    d_rows = [[] for _ in range(L)]
    losses = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    correct = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    cols = [torch.nonzero(Wmat[k]).reshape(-1) for k in range(K)]  # each group's positions in the union
    low = _low_rank_groups(chain, [c.numel() for c in cols])
    keep = [torch.unique(torch.cat([cols[k] for k in ks])) if ks else None for ks in low]  # sorted
    linear_steps = [i for i, step in enumerate(chain.steps) if step[0] == "linear"]
    for Xc, yc, pos in obj.chunks(union):
        Wc = Wmat[:, pos.to(obj.device)]
        # Weights all 1: the adjoint at each pre-activation is each example's own dl_i/dz_j.
        ab = r_operator.build(chain, P, obj.loss, Xc, yc, torch.ones(len(pos), dtype=obj.dtype, device=obj.device))
        own = [torch.nonzero(Wc[k]).reshape(-1) for k in range(K)]  # each group's points in this chunk
        for j, (a, step) in enumerate(zip(ab.inputs, linear_steps)):
            d = ab.deltas[step]
            for k, c in enumerate(own):  # each group's own points only: U_k = (w_k delta)^T A
                wd = Wc[k, c].unsqueeze(1) * d[c]
                blocks[j][0][k].addmm_(wd.T, a[c])
                blocks[j][1][k] += wd.sum(0)
            if keep[j] is not None:
                rows = torch.isin(pos.to(keep[j].device), keep[j])
                a_rows[j].append(a[rows])
                d_rows[j].append(d[rows])
        losses += Wc @ ab.losses
        if obj.classification:
            correct += Wc @ obj.correct(ab.f.detach(), yc)
    # Per layer: the inputs a_i and pre-activation gradients delta_i of the points of the groups that
    # take the low-rank route there, and for each such group k its rows and weights w_ki.
    factors = [None if keep[j] is None else
               {"A": torch.cat(a_rows[j]), "D": torch.cat(d_rows[j]),
                "groups": {k: (torch.searchsorted(keep[j], cols[k]), Wmat[k, cols[k]]) for k in low[j]}}
               for j in range(L)]
    batch.grads, batch.factors = grads, {"layers": factors, "blocks": named}
    return grads, losses, correct if obj.classification else None


def _low_rank_groups(chain: Chain, sizes: list[int]) -> list[list[int]]:
    """Per Linear layer, the groups whose gradient block is cheaper applied through its factors:
    x U_k^T = (x A_k^T)(w_k delta_k) costs n |G_k| (in + out), the dense block n in out."""
    return [[k for k, m in enumerate(sizes)
             if m * (mod.in_features + mod.out_features) < mod.in_features * mod.out_features]
            for _, mod, _, _ in chain.linears]


def _times_group_blocks(x: Tensor, j: int, fac: dict, U: Tensor, xA: Tensor | None = None) -> Tensor:
    """[K, n, out]: x_k U_k^T for every group k, x [n, in] shared or [K, n, in] per group; through
    the factors of layer ``j`` for the groups that have them, else the dense blocks U [K, out, in].
    ``xA``: x times the factors' rows, when the caller has it already."""
    layer = fac["layers"][j]
    if layer is None:
        return x @ U.transpose(1, 2) if x.dim() == 3 else torch.einsum("ni,koi->kno", x, U)
    A, D = layer["A"], layer["D"]
    if xA is None and x.dim() == 2:
        xA = x @ A.T  # one pass over a shared x (it may be the data)
    # Each group's product is written straight into its slice (stacking K results copied them all).
    out = torch.empty(U.shape[0], x.shape[-2], U.shape[1], dtype=x.dtype, device=x.device)
    for k in range(U.shape[0]):
        xk = x if x.dim() == 2 else x[k]
        if k in layer["groups"]:
            c, w = layer["groups"][k]
            torch.matmul(xA[:, c] if xA is not None else xk @ A[c].T, w.unsqueeze(1) * D[c], out=out[k])
        else:
            torch.matmul(xk, U[k].T, out=out[k])
    return out


# ---------------------------------------------------------------------- the data's Gram
# x A^T of every point with the groups' first-layer rows (their inputs) depends on neither the
# parameters nor v1, so a run's measurements share it: kept for the last data tensor seen (a run
# has one), released with that tensor, and read only while it is unmodified and the rows are the
# same. (A dict keyed by tensors cannot be used: tensors compare elementwise.)
_last_gram: list[tuple] = []  # [(weakref to X, X._version, rows, gram)]


def _forget(ref) -> None:
    if _last_gram and _last_gram[0][0] is ref:
        _last_gram.clear()


def _data_gram(obj: Objective, chain: Chain, rows: Tensor) -> Tensor:
    """[N, len(rows)] chain.inputs(X) @ rows^T over all of ``obj.X`` (one chunk, no subset)."""
    X = obj.X
    if _last_gram:
        ref, version, kept, gram = _last_gram[0]
        if (ref() is X and version == X._version and kept.shape == rows.shape and kept.dtype == rows.dtype
                and kept.device == rows.device and torch.equal(kept, rows)):
            return gram
    with torch.no_grad():
        gram = chain.inputs(X.to(obj.device)) @ rows.T
    _last_gram[:] = [(weakref.ref(X, _forget), X._version, rows.clone(), gram)]
    return gram


# ---------------------------------------------------------------------- known values
class _KnownAffine(torch.autograd.Function):
    """``value`` = a0 M0^T (+ a1 M1^T) (+ bias), where the value is known already (the R-operator's
    cached pre-activations, or v1's tangents recombined from the solve's products): the forward
    returns it without the products, the backward is the affine map's own (one product per input
    that needs a gradient, as autograd's linear would make)."""

    @staticmethod
    def forward(ctx, value, bias, a0, M0, a1=None, M1=None):
        ctx.save_for_backward(a0, M0, a1, M1)
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        a0, M0, a1, M1 = ctx.saved_tensors
        need = ctx.needs_input_grad
        out = [None] * 6
        rows = g.reshape(-1, g.shape[-1])
        if need[1]:
            out[1] = rows.sum(0)
        for k, (a, M) in enumerate(((a0, M0), (a1, M1))):
            if a is None:
                continue
            if need[2 + 2 * k]:
                out[2 + 2 * k] = g @ M
            if need[3 + 2 * k]:
                out[3 + 2 * k] = rows.T @ a.reshape(-1, a.shape[-1])
        return tuple(out)


# ---------------------------------------------------------------------- curvature
def _loss_jet(loss_fn, f: Tensor, yc: Tensor, f1: Tensor, f2: Tensor | None, graph: bool, batched: bool) -> Tensor:
    """Per-example l'' = f'^T (d2l/df2) f' + (dl/df) . f'' ([n], or [K, n] when ``batched``).
    Built-in losses give their derivatives in closed form (``loss.output_derivatives``, which
    stays differentiable in f when ``graph``); other losses are differentiated by autograd."""
    known = output_derivatives(loss_fn, f if graph else f.detach(), yc)
    if known is not None:
        gl, hf = known.grad, known.hess_times(f1)
    else:
        if not graph:
            f = f.detach().requires_grad_(True)
        with torch.enable_grad():
            per = loss_fn(f, yc, reduction="none")
            gl = torch.autograd.grad(per.sum(), f, create_graph=True)[0]
            hf = None
            if gl.requires_grad:  # else the loss is linear in f: no curvature term
                hf = torch.autograd.grad(gl, f, grad_outputs=f1, create_graph=graph, is_grads_batched=batched,
                                         allow_unused=True)[0]
    axes = tuple(range(-(f.dim() - 1), 0))
    total = 0 if hf is None else (hf * f1).sum(axes)
    if f2 is not None:
        total = total + ((gl if graph else gl.detach()) * f2).sum(axes)
    return total if torch.is_tensor(total) else torch.zeros(f1.shape[:-1], dtype=f1.dtype, device=f1.device)


def group_curvature(obj: Objective, chain: Chain, batch: GroupBatch, v1: Tensor | None,
                    coupling: bool, quadratic: bool, forward: r_operator.Cache | None = None,
                    tangents: dict[str, Tensor] | None = None) -> dict:
    """``{"quadratic": [K] g_k^T H g_k, "coupling": [K] <g_k, grad S>, "s": v1^T H v1}`` for the
    groups of ``batch`` (after :func:`group_pass`), H the Hessian of ``obj`` (the one v1 came from:
    all points or a subset, weighted if it is). ``forward``: an R-operator cache over the Hessian's
    points in one chunk at these parameters (the measurement's), whose Linear outputs are read,
    not recomputed: the data then meet only v1's block and the groups' rows. ``tangents``: with
    ``forward``, v1's tangents over the same points recombined from the solve's products
    (``MLPBackend.tangents_along``: "first" x V_1^T + c_1, "linear<j>", "output"), read for the v1
    stream instead of its products: the data then meet the groups' rows only."""
    K = batch.W.shape[0]
    fac = batch.factors  # from group_pass
    P = dict(zip(obj.names, obj.params))
    gparts = fac["blocks"]  # name -> [K, *shape]
    vparts = dict(zip(obj.names, unflatten(v1, obj.params))) if coupling else None
    (_, _, w1, b1), later = chain.linears[0], obj.names[2 if chain.linears[0][3] else 1:]
    quad = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    coup = torch.zeros(K, dtype=obj.dtype, device=obj.device)
    s_total = torch.zeros((), dtype=obj.dtype, device=obj.device)
    # Everything the data meet in the first layer, as one matrix: its weight, v1's block and the
    # groups' points (their factors' rows), so a single product with the data gives all three.
    shared = forward is not None and obj.single_chunk
    first_out = forward.pre[0] if shared else None
    given_v = coupling and shared and tangents is not None  # v1's tangents known already
    first_tangent = tangents["first"] if given_v else None
    # Known Linear outputs by Linear index: the main stream's (the cache's pre-activations) and the
    # v1 stream's (the recombined tangents); the first layer's are read directly below.
    known_z = forward.pre if shared else None
    known_v = ({j: tangents[f"linear{j}"] for j in range(1, len(chain.linears)) if f"linear{j}" in tangents}
               if given_v else {})
    first_rows = ([] if shared else [P[w1]]) + ([vparts[w1]] if coupling and not given_v else [])
    gram = None  # the data times the groups' rows, [N, rows]: the same at every measurement of a run
    if shared and fac["layers"][0] is not None:
        gram = _data_gram(obj, chain, fac["layers"][0]["A"])
    elif fac["layers"][0] is not None:
        first_rows.append(fac["layers"][0]["A"])
    first_rows = torch.cat(first_rows) if first_rows else None
    width = P[w1].shape[0]
    at = 0 if shared else width  # where v1's block starts in the product's columns
    for chunk in obj.hessian_chunks():
        Xh, yh, om = chunk.X, chunk.y, chunk.global_omega(obj.dtype, obj.device)
        # At most SUB_CHUNK points at a time: the K group streams are K times the size of an
        # activation, and smaller blocks stay in cache and reuse the allocator's memory.
        for i in range(0, Xh.shape[0], SUB_CHUNK):
            Xc, yc, omega = Xh[i:i + SUB_CHUNK], yh[i:i + SUB_CHUNK], om[i:i + SUB_CHUNK]
            A = chain.inputs(Xc)
            with torch.no_grad():
                out = None if first_rows is None else A @ first_rows.T
                if shared:
                    Z0 = first_out[i:i + SUB_CHUNK].detach()  # a leaf of its own: it may record below
                else:
                    Z0 = out[:, :width] + P[b1] if b1 else out[:, :width]
                Zv = None
                if given_v:
                    Zv = first_tangent[i:i + SUB_CHUNK].detach()
                elif coupling:
                    Zv = out[:, at:at + width] + vparts[b1] if b1 else out[:, at:at + width]
                if gram is not None:
                    xA = gram[i:i + SUB_CHUNK]
                else:
                    xA = (out[:, at + (width if coupling and not given_v else 0):]
                          if fac["layers"][0] is not None else None)
                Zk = _times_group_blocks(A, 0, fac, gparts[w1], xA)  # [K, n, h]: the groups' first tangents
                if b1:
                    Zk += gparts[b1].unsqueeze(1)
            with torch.set_grad_enabled(coupling):
                Z = Z0.requires_grad_(coupling)
                phi = {n: P[n].detach().requires_grad_(coupling) for n in later}
                x, xa, xaa = Z, Zv, None        # the v1 stream (recorded when coupling)
                xb, xbb = Zk, None               # the K group streams (never recorded)
                j = 0
                for step in chain.steps[1:]:
                    if step[0] == "act":
                        h, s1, s2 = activation(step[1], x, graph=coupling)
                        if coupling:
                            xa, xaa = _act_jet(s1, s2, xa, xaa)
                        if quadratic:
                            with torch.no_grad():
                                xb, xbb = _act_jet(s1.detach(), None if s2 is None else s2.detach(), xb, xbb)
                        x = h
                        continue
                    _, mod, wname, bname = step
                    j += 1
                    W, b = phi[wname], phi[bname] if bname else None
                    if coupling:
                        V = vparts[wname]
                        if j in known_v:  # R{z} = R{a} W^T + a V^T + c, recombined: no product forward
                            new_a = _KnownAffine.apply(known_v[j][i:i + SUB_CHUNK], None, xa, W, x, V)
                        else:
                            new_a = F.linear(xa, W) + F.linear(x, V, vparts[bname] if bname else None)
                        xa, xaa = new_a, _add(None if xaa is None else F.linear(xaa, W), 2 * F.linear(xa, V))
                    if quadratic:
                        with torch.no_grad():
                            Wd, xd = W.detach(), x.detach()
                            new_b = xb @ Wd.T + _times_group_blocks(xd, j, fac, gparts[wname])
                            if bname:
                                new_b += gparts[bname].unsqueeze(1)
                            xbb = _add(None if xbb is None else xbb @ Wd.T, 2 * _times_group_blocks(xb, j, fac, gparts[wname]))
                            xb = new_b
                    if known_z is not None:  # the cache's z = a W^T + b: no product forward
                        x = _KnownAffine.apply(known_z[j][i:i + SUB_CHUNK], b, x, W)
                    else:
                        x = F.linear(x, W, b)
                if coupling:
                    S = (omega * _loss_jet(obj.loss, x, yc, xa, xaa, graph=True, batched=False)).sum()
                    s_total += S.detach()
                    if S.requires_grad:  # else S is constant here: Q_k gets nothing from this chunk
                        leaves = [Z] + [phi[n] for n in later]
                        dS = torch.autograd.grad(S, leaves, allow_unused=True)
                        if dS[0] is not None:
                            coup += Zk.reshape(K, -1) @ dS[0].reshape(-1)
                        for name, d in zip(later, dS[1:]):
                            if d is not None:
                                coup += gparts[name].reshape(K, -1) @ d.reshape(-1)
            if quadratic:
                with torch.no_grad():
                    quad += _loss_jet(obj.loss, x.detach(), yc, xb, xbb, graph=False, batched=True) @ omega
    return {"quadratic": quad, "coupling": coup, "s": s_total}

