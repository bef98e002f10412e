"""Per-example passes of the probes' gradient engine: losses l_i, projections <grad l_i, v1> and
gradient norms ||grad l_i|| over all points of an objective (``eosbranch.curvature.objective``).

Each assumes an example's loss depends on its own input only (no BatchNorm in training mode).
The norms come from exact per-layer identities when every trainable tensor belongs to an
``nn.Linear`` applied once to [batch, features] inputs, else from chunked
``torch.func.vmap(grad)``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .curvature import mlp as r_operator
from .curvature.flat import unflatten
from .curvature.objective import Objective, running_stats_frozen

# torch 2.14's forward-mode AD scripts a helper on first use and warns that torch.jit.script is
# deprecated; the warning is torch's own and nothing a user of eosbranch can act on.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__all__ = ["NotLinear", "losses", "projections", "grad_norm_sq_linear", "grad_norm_sq_vmap",
           "projections_from_forward", "grad_norm_sq_from_forward"]

# Per-sample gradients with vmap materialise [chunk, dim]; cap that block at this many entries.
VMAP_BLOCK_ENTRIES = 2 ** 24
VMAP_BLOCK_POINTS = 256


class NotLinear(Exception):
    """The per-layer norm identity does not apply to this model; use vmap(grad) instead."""


def losses(obj: Objective) -> Tensor:
    """[N] l_i at the snapshotted parameters."""
    out = torch.empty(obj.n, dtype=obj.dtype, device=obj.device)
    with torch.no_grad(), running_stats_frozen(obj.model):
        for Xc, yc, pos in obj.chunks():
            out[pos.to(obj.device)] = obj.loss(obj.outputs(obj.params, Xc), yc, reduction="none")
    return out


def projections(obj: Objective, v1: Tensor) -> tuple[Tensor, Tensor]:
    """([N] <grad l_i, v1>, [N] l_i) in one forward-mode pass: the jvp of the per-example loss
    vector along v1, whose primal output is the per-example loss."""
    tangent = tuple(unflatten(v1, obj.params))
    proj = torch.empty(obj.n, dtype=obj.dtype, device=obj.device)
    loss = torch.empty(obj.n, dtype=obj.dtype, device=obj.device)
    with running_stats_frozen(obj.model):
        for Xc, yc, pos in obj.chunks():
            def per(*params):
                return obj.loss(obj.outputs(params, Xc), yc, reduction="none")

            lc, pc = torch.func.jvp(per, tuple(obj.params), tangent)
            proj[pos.to(obj.device)], loss[pos.to(obj.device)] = pc.detach(), lc.detach()
    return proj, loss


def _linear_layers(model: nn.Module) -> list[tuple[nn.Linear, bool, bool]]:
    """(layer, weight trainable, bias trainable) for each nn.Linear owning trainable tensors;
    raises NotLinear if any trainable tensor lives elsewhere."""
    owners = {}
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if p.requires_grad:
                if type(mod) is not nn.Linear:  # a subclass may compute something else
                    raise NotLinear
                owners.setdefault(id(mod), [mod, False, False])[1 if pname == "weight" else 2] = True
    return [tuple(v) for v in owners.values()]


def grad_norm_sq_linear(obj: Objective) -> Tensor:
    """Exact per-example ||grad l_i||^2 for all-Linear models: a Linear layer's per-example
    gradient is delta_i a_i^T (bias: delta_i), so its squared norm is ||delta_i||^2 ||a_i||^2
    (+ ||delta_i||^2). One forward and one backward to the layer outputs (no [N, dim] block).
    Raises NotLinear where the identity does not hold."""
    layers = _linear_layers(obj.model)
    sq = torch.zeros(obj.n, dtype=obj.dtype, device=obj.device)
    for Xc, yc, pos in obj.chunks():
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        ok = [True]

        def hook(mod, inp, out):
            if id(mod) in seen or inp[0].dim() != 2:  # shared layer or sequence input: no identity
                ok[0] = False
            seen[id(mod)] = (inp[0].detach(), out)

        handles = [mod.register_forward_hook(hook) for mod, _, _ in layers]
        try:
            with running_stats_frozen(obj.model), torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) for p in obj.params]
                per = obj.loss(obj.outputs(leaves, Xc), yc, reduction="none")
        finally:
            for h in handles:
                h.remove()
        if not ok[0] or len(seen) != len(layers):
            raise NotLinear
        outs = [seen[id(mod)][1] for mod, _, _ in layers]
        # Each loss depends only on its own row, so grad of sum_i l_i wrt row i of an output is delta_i.
        deltas = torch.autograd.grad(per.sum(), outs, allow_unused=True)
        total = torch.zeros(pos.numel(), dtype=obj.dtype, device=obj.device)
        for (mod, w, b), d in zip(layers, deltas):
            if d is None:
                continue
            d2 = d.pow(2).sum(1)
            if w:
                total += d2 * seen[id(mod)][0].pow(2).sum(1)
            if b:
                total += d2
        sq[pos.to(obj.device)] = total
    return sq


def grad_norm_sq_vmap(obj: Objective) -> Tensor:
    """Per-example ||grad l_i||^2 from torch.func.vmap(grad), in blocks of at most
    VMAP_BLOCK_ENTRIES gradient entries (and VMAP_BLOCK_POINTS points)."""
    block = max(1, min(obj.chunk_size, VMAP_BLOCK_POINTS, VMAP_BLOCK_ENTRIES // obj.dim))
    params = tuple(obj.params)
    sq = torch.empty(obj.n, dtype=obj.dtype, device=obj.device)
    with running_stats_frozen(obj.model):
        for Xc, yc, pos in obj.chunks():
            for i in range(0, Xc.shape[0], block):
                xb, yb = Xc[i:i + block], yc[i:i + block]

                def one(p, x, mask, yb=yb):
                    out = obj.outputs(p, x.unsqueeze(0))
                    # The targets stay outside vmap (a loss that one-hot encodes labels cannot
                    # run on batched targets): score this output against every target of the
                    # block, keep entry i. The extra cost is block^2 loss terms, not passes.
                    per = obj.loss(out.expand(yb.shape[0], *out.shape[1:]), yb, reduction="none")
                    return (per * mask).sum()

                masks = torch.eye(xb.shape[0], dtype=obj.dtype, device=obj.device)
                gs = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, xb, masks)
                rows = pos[i:i + block].to(obj.device)
                sq[rows] = sum(g.reshape(xb.shape[0], -1).pow(2).sum(1) for g in gs)
    return sq


# ---------------------------------------------------------------------- from a shared forward pass
# An MLP chain's R-operator cache (``eosbranch.curvature.mlp.build`` over all points, one chunk)
# already holds each layer's input, the activations' derivatives, the outputs and dl_i/df: the
# measurement builds it once for the Hessian, and these read it instead of running the data
# through the first layer again.
def projections_from_forward(c: r_operator.Cache, names: list[str], v1: Tensor,
                             output: Tensor | None = None) -> Tensor:
    """[N] <grad l_i, v1> = (dl_i/df_i) . R{f_i} along v1: one product of the data with v1's first
    block (a jvp also recomputes the forward, a second one), none where ``output`` (R{f} along
    v1, [N, C]) is given."""
    if output is None:
        params = [c.params[n] for n in names]
        output = r_operator.output_tangent(c, dict(zip(names, unflatten(v1, params))))
    return (c.loss_grad.detach() * output).sum(-1)


def grad_norm_sq_from_forward(c: r_operator.Cache) -> Tensor:
    """[N] ||grad l_i||^2 = sum over Linear layers of ||delta_i||^2 (||a_i||^2 + 1 if it has a bias),
    the identity of :func:`grad_norm_sq_linear`, from the cached inputs and per-example adjoints
    (no product with the data)."""
    deltas = r_operator.example_adjoints(c)
    total = None
    li = 0
    with torch.no_grad():
        for i, step in enumerate(c.chain.steps):
            if step[0] != "linear":
                continue
            d2 = deltas[i].pow(2).sum(1)
            part = d2 * (c.inputs[li].pow(2).sum(1) + (1.0 if step[3] else 0.0))
            total = part if total is None else total + part
            li += 1
    return total
