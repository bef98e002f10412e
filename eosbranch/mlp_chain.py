"""MLP chains: the models whose curvature eosbranch computes by hand-written passes.

An ``nn.Sequential`` of reshapes (``PREFIX``: Flatten, Identity) up to the first ``nn.Linear``, then
``nn.Linear`` layers (every weight and bias trainable, in the flat layout's order) and elementwise
activations (``ELEMENTWISE``), with one row per example at the first Linear. ``eosbranch.curvature.taylor``
(group curvature) and ``eosbranch.curvature.mlp`` (Hessian-vector products) work on such chains;
:func:`split` returns None for anything else and callers fall back to autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PREFIX", "ELEMENTWISE", "Chain", "sequential_children", "split", "activation"]

# Modules allowed before the first Linear: reshapes that act on each example alone.
PREFIX = (nn.Flatten, nn.Identity)
# Activations applied entry by entry, so their Jacobian is diagonal: the Taylor rules hold.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity)


@dataclass
class Chain:
    """A model as ``prefix`` (parameter-free modules) then ``steps``: ("linear", module, weight
    name, bias name or None) or ("act", module)."""

    prefix: list[nn.Module]
    steps: list[tuple]

    def inputs(self, X: Tensor) -> Tensor:
        for mod in self.prefix:
            X = mod(X)
        return X

    @property
    def linears(self) -> list[tuple]:
        return [s for s in self.steps if s[0] == "linear"]


def sequential_children(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """(name, module) of each position of a plain ``nn.Sequential``, or None for anything else and
    for a module used at two positions (named_children() and named_parameters() list it once, so a
    pass over them would skip a step the model takes)."""
    if type(model) is not nn.Sequential:
        return None
    children = list(model._modules.items())
    return children if len({id(m) for _, m in children}) == len(children) else None


def split(model: nn.Module, param_names: list[str], X_sample: Tensor) -> Chain | None:
    """A :class:`Chain` if ``model`` has the form this module covers and its first Linear sees one
    row per example (``X_sample``: a batch of inputs), else None."""
    children = sequential_children(model)
    if children is None:
        return None
    prefix, steps, expected = [], [], []
    for name, mod in children:
        if type(mod) is nn.Linear:
            bias = f"{name}.bias" if mod.bias is not None else None
            steps.append(("linear", mod, f"{name}.weight", bias))
            expected += [f"{name}.weight"] + ([bias] if bias else [])
        elif steps and type(mod) in ELEMENTWISE and not getattr(mod, "inplace", False):
            steps.append(("act", mod))
        elif not steps and type(mod) in PREFIX:
            prefix.append(mod)
        else:
            return None
    if not steps or param_names != expected:  # a frozen layer has no block in a group gradient
        return None
    chain = Chain(prefix, steps)
    with torch.no_grad():
        if chain.inputs(X_sample[:2]).dim() != 2:  # a Linear over a trailing axis mixes no rows, but
            return None                            # its rows would no longer be examples
    return chain


def activation(mod: nn.Module, z: Tensor, graph: bool):
    """(sigma(z), sigma'(z), sigma''(z) or None where it is 0 almost everywhere). With ``graph`` the
    three stay differentiable in z (the reverse pass of S goes through them)."""
    t = type(mod)
    if t is nn.ReLU:
        return F.relu(z), (z > 0).to(z.dtype), None
    if t is nn.Identity:
        return z, torch.ones_like(z), None
    if t is nn.Tanh:
        h = torch.tanh(z)
        s1 = 1 - h * h
        return h, s1, -2 * h * s1
    if t is nn.Sigmoid:
        h = torch.sigmoid(z)
        s1 = h * (1 - h)
        return h, s1, s1 * (1 - 2 * h)
    # Other smooth activations: their derivatives by autograd, elementwise and cheap.
    with torch.enable_grad():
        zz = z if graph and z.requires_grad else z.detach().requires_grad_(True)
        h = mod(zz)
        s1 = torch.autograd.grad(h.sum(), zz, create_graph=True)[0]
        s2 = torch.autograd.grad(s1.sum(), zz, create_graph=graph, allow_unused=True)[0]
    if not (graph and z.requires_grad):
        h, s1 = h.detach(), s1.detach()
        s2 = None if s2 is None else s2.detach()
    return h, s1, s2
