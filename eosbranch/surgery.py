"""Gradient surgery: remove the top-eigenvector component from part of each step's gradient.

With ``group`` set, the group's contribution c_k to the training-loss gradient (its terms of the
(weighted) mean over the batch) loses its component along v1: g' = g - <c_k, v1> v1, so the
group can no longer push along the sharpest direction while every other point can. Without a
group, the whole update loses it: g' = g - <g, v1> v1.

v1 is the top eigenvector of the training-loss Hessian at the current parameters, recomputed by
a warm-started Lanczos solve every ``refresh_every`` steps; it is kept in the training state (and
so in checkpoints), which keeps a resumed branch bit-identical to an uninterrupted one.
Every step records ``surgery_cos2``: cos2 of the edited part with v1 (certificate 4: <= 1e-6),
and ``surgery_removed``: the removed coefficient <c, v1>.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from pydantic import Field

from .curvature import flatten, unflatten
from .interventions import INTERVENTIONS, Intervention, _group
from .measure import solve_sharpness
from .registry import Params


class Surgery(Intervention):
    def __init__(self, p: GradientSurgeryParams):
        self.p = p

    def configure(self, exp):
        if self.p.group is not None:
            _group(exp, self.p.group, "gradient_surgery")
        return replace(exp, grad_hook=self.hook)

    def _v1(self, exp, st) -> torch.Tensor:
        mem = st.intervention
        fork = st.fork_step or 0
        if "surgery_v1" not in mem or (st.step - fork) % self.p.refresh_every == 0:
            prev = mem.get("surgery_v1")
            v0 = None if prev is None else prev[:, None]  # None: the state's warm start (measure.warm_vectors)
            mem["surgery_v1"] = solve_sharpness(exp, st, v0=v0, preconditioned=False)["v1"]
        return mem["surgery_v1"]

    def hook(self, exp, st, idx, per, grads, record):
        v1 = self._v1(exp, st).to(grads[0].dtype)
        g = flatten(grads)
        if self.p.group is None:
            c = g
        else:
            member = torch.isin(exp.rows(idx), exp.groups[self.p.group]).to(per.dtype)
            w = exp.train_weight
            w = torch.ones_like(per) if w is None else (w if idx is None else w[idx]).to(per.dtype)
            share = (per * w * member).sum() / w.sum().clamp_min(1e-30)  # the group's terms of the objective
            c = flatten(torch.autograd.grad(share, exp.params, allow_unused=True, materialize_grads=True))
        coef = c @ v1
        edited = c - coef * v1
        # 0-dim tensors: the trainer holds them on the device until its next measurement or
        # checkpoint (no wait at each step); only the v1 refresh (a Lanczos solve) reads back.
        record(self.p.group or "all", "surgery_removed", coef)
        record(self.p.group or "all", "surgery_cos2", (edited @ v1) ** 2 / (edited @ edited).clamp_min(1e-300))
        return unflatten(g - coef * v1, exp.params)


# ----------------------------------------------------------------------------- gradient surgery
class GradientSurgeryParams(Params):
    group: Optional[str] = Field(None, description="whose gradient contribution loses its v1 component; "
                                                   "None: the whole update")
    refresh_every: int = Field(1, ge=1, description="recompute v1 (warm-started Lanczos) every this many steps")


@INTERVENTIONS.register("gradient_surgery", GradientSurgeryParams)
def gradient_surgery(p: GradientSurgeryParams) -> Intervention:
    """Each step, remove the component along the current top Hessian eigenvector v1 from one
    group's contribution to the gradient (or from the whole update): alignment destroyed at the
    gradient level. Records ``surgery_cos2`` (cos^2 of the edited part with v1) every step."""
    return Surgery(p)
