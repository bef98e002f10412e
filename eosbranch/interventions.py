"""Interventions: what a branch changes at its fork, as small declarative records.

A branch spec lists interventions ``{kind: ..., **params}`` (catalog: ``interventions/``). Each
kind's function returns an :class:`Intervention`: a function ``(experiment, state, at) ->
(experiment, state)`` applied once at the fork step (``at``: the :class:`eosbranch.branch.ForkPoint`,
which gives the fork's curvature before any change and records certificate events). It has two
parts, neither of which changes its arguments:

- ``configure(exp) -> exp``: persistent changes to the (frozen) experiment, returned as a new one
  (data, labels, loss, optimizer, sample weights, a per-step gradient transform). A pure function
  of the parameters and the freshly built experiment, re-applied whenever the branch is rebuilt:
  at the fork and on every resume.
- ``edit(exp, state, at) -> state``: one-time edits of the training state at the fork step (step
  size, optimizer state), which the fork checkpoint then holds.

Interventions may record integrity-certificate events (``certificate_*``) at the fork.
The identity (no interventions) is the bit-exact control: see :mod:`eosbranch.certificate`.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import torch
from pydantic import Field, model_validator

from .errors import EosbranchError
from .loss import LOSSES
from .optimizer import OPTIMIZERS
from .prototypes import orthogonal_units
from .registry import Params, Registry

if TYPE_CHECKING:
    from .branch import ForkPoint
    from .experiment import Experiment
    from .state import TrainState

INTERVENTIONS = Registry("intervention")


class Intervention:
    """Base: no change. Subclasses override ``configure`` and/or ``edit``."""

    def configure(self, exp: "Experiment") -> "Experiment":
        return exp

    def edit(self, exp: "Experiment", st: "TrainState", at: "ForkPoint") -> "TrainState":
        return st

    def __call__(self, exp: "Experiment", st: "TrainState", at: "ForkPoint") -> tuple["Experiment", "TrainState"]:
        exp = self.configure(exp)
        return exp, self.edit(exp, st, at)


def _group(exp: "Experiment", name: str, kind: str) -> torch.Tensor:
    if name not in exp.groups:
        raise EosbranchError(f"{kind}.group: no group {name!r} in this run; groups: "
                             f"{', '.join(exp.groups) or 'none (the spec defines no groups)'}")
    return exp.groups[name]


def _with_data(exp: "Experiment", **tensors) -> "Experiment":
    """A new experiment whose data has ``tensors`` (e.g. X=...) in place of its own."""
    data = copy.copy(exp.data)
    for name, t in tensors.items():
        setattr(data, name, t)
    return replace(exp, data=data)


def _lr_for_margin(exp: "Experiment", st: "TrainState", at: "ForkPoint", margin: float, kind: str) -> float:
    """The step size whose threshold is S / margin (S measured at the fork, preconditioned for
    Adam): margin < 1 is stable (below the threshold), margin > 1 is past it. Thresholds scale as
    1 / eta for every optimizer, so eta' = eta * threshold(eta) * margin / S."""
    sharp = at.curvature()["compared"]
    if not sharp > 0:
        raise EosbranchError(f"{kind}: needs a positive sharpness at the fork, got {sharp}")
    return st.lr * exp.optimizer.threshold(st.lr) * margin / sharp


# ----------------------------------------------------------------------------- step size
class LRParams(Params):
    factor: Optional[float] = Field(None, gt=0, description="eta' = factor * eta")
    value: Optional[float] = Field(None, gt=0, description="eta' = value")
    stable_margin: Optional[float] = Field(None, gt=0, description="S(t_fork) = margin * threshold(eta')")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("factor", "value", "stable_margin") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of factor, value, stable_margin (got {given or 'none'})")
        return self


class _SetLR(Intervention):
    def __init__(self, p: LRParams):
        self.p = p

    def edit(self, exp, st, at):
        p = self.p
        if p.factor is not None:
            return replace(st, lr=st.lr * p.factor)
        if p.value is not None:
            return replace(st, lr=p.value)
        return replace(st, lr=_lr_for_margin(exp, st, at, p.stable_margin, "lr.stable_margin"))


@INTERVENTIONS.register("lr", LRParams)
def lr(p: LRParams) -> Intervention:
    """Change the step size from the fork on (t_eff then grows by the new eta per step)."""
    return _SetLR(p)


class EnterEoSParams(Params):
    margin: float = Field(1.5, gt=1, description="S(t_fork) = margin * threshold(eta'): past the threshold")


@INTERVENTIONS.register("enter_eos", EnterEoSParams)
def enter_eos(p: EnterEoSParams) -> Intervention:
    """Raise the step size so the current sharpness exceeds the new threshold by ``margin``."""
    return _SetLR(LRParams(stable_margin=p.margin))


# ----------------------------------------------------------------------------- data
class RandomDirectionParams(Params):
    group: str = "input_outlier"
    alpha: Optional[float] = Field(None, ge=0, description="default: the alpha the group was built with")
    seed: int = 0


class _RandomDirection(Intervention):
    """Move an input-outlier group from x_src + s*alpha*v_diff (coherent, s = -1/+1 by class) to
    x_src + alpha*||v_diff||*z, z a seeded random unit vector orthogonal to v_diff per point:
    the same distance from its source, a new direction (the alignment-destroying control)."""

    def __init__(self, p: RandomDirectionParams):
        self.p = p

    def _fits(self, exp):
        """The group's indices, v_diff and alpha, or a one-line error saying why this run has none."""
        p = self.p
        idx = _group(exp, p.group, "random_direction")
        v = exp.group_info.get("v_diff")
        alpha = p.alpha if p.alpha is not None else exp.group_info.get("alpha", {}).get(p.group)
        if v is None or alpha is None:
            raise EosbranchError(f"random_direction.group: {p.group!r} is not a coherent input-outlier group of "
                                 "a prototypes construction (no v_diff/alpha); give alpha or use prototype groups")
        return idx, v, alpha

    def configure(self, exp):
        p = self.p
        idx, v, alpha = self._fits(exp)
        X = exp.data.X.clone()
        cpu = idx.cpu()
        x = X[idx].flatten(1).double().cpu()
        sign = (2 * exp.data.y[idx].cpu().double() - 1).unsqueeze(1)
        source = x - sign * alpha * v
        z = orthogonal_units(len(cpu), v, p.seed, "random_direction")
        moved = source + alpha * torch.linalg.vector_norm(v) * z
        X[idx] = moved.to(device=X.device, dtype=X.dtype).reshape(len(cpu), *X.shape[1:])
        info = exp.group_info
        mu = info.get("mu")
        if mu is not None and "centroid_distance" in info:
            d = info["centroid_distance"].clone()
            d[cpu] = torch.linalg.vector_norm(moved - mu[exp.data.y[idx].cpu()], dim=1).to(d.dtype)
            info = {**info, "centroid_distance": d}
        return replace(_with_data(exp, X=X), group_info=info)

    def __call__(self, exp, st, at):
        self._fits(exp)  # before the certificate measures the group
        changed = self.configure(exp)
        at.perturbation_certificate(exp, changed, self.p.group)
        return changed, st


@INTERVENTIONS.register("random_direction", RandomDirectionParams)
def random_direction(p: RandomDirectionParams) -> Intervention:
    return _RandomDirection(p)


class LabelFlipParams(Params):
    group: str
    to: Optional[int] = Field(None, ge=0, description="new label; default: the other class of two")


class _LabelFlip(Intervention):
    def __init__(self, p: LabelFlipParams):
        self.p = p

    def configure(self, exp):
        p = self.p
        idx = _group(exp, p.group, "label_flip")
        y = exp.data.y.clone()
        if exp.data.task != "classification":
            raise EosbranchError("label_flip: needs a classification data set")
        if p.to is None:
            if exp.data.num_outputs != 2:
                raise EosbranchError(f"label_flip.to: give the new label; the data has {exp.data.num_outputs} classes")
            y[idx] = 1 - y[idx]
        else:
            if p.to >= exp.data.num_outputs:
                raise EosbranchError(f"label_flip.to: {p.to} is not a class (0..{exp.data.num_outputs - 1})")
            y[idx] = p.to
        return _with_data(exp, y=y)


@INTERVENTIONS.register("label_flip", LabelFlipParams)
def label_flip(p: LabelFlipParams) -> Intervention:
    """Flip the labels of a group (binary: y -> 1 - y; else to the class ``to``)."""
    return _LabelFlip(p)


class ReweightParams(Params):
    group: str
    weight: float = Field(ge=0, description="1 keeps, 0 drops, 2 doubles the group's weight")


class _Reweight(Intervention):
    def __init__(self, p: ReweightParams):
        self.p = p

    def configure(self, exp):
        idx = _group(exp, self.p.group, "reweight")
        w = exp.sample_weight
        if w is None:
            w = torch.ones(exp.data.X.shape[0], dtype=exp.dtype, device=exp.device)
        w = w.clone()
        w[idx] = self.p.weight
        if not (w if exp.train_index is None else w[exp.train_index]).sum() > 0:
            raise EosbranchError("reweight.weight: every training point would have weight 0")
        return replace(exp, sample_weight=w)


@INTERVENTIONS.register("reweight", ReweightParams)
def reweight(p: ReweightParams) -> Intervention:
    """Training loss sum_i w_i l_i / sum_i w_i with w = ``weight`` on the group, 1 elsewhere
    (weight 0 is the same as removing the group from the training set)."""
    return _Reweight(p)


# ----------------------------------------------------------------------------- loss, optimizer
class LossSwitchParams(Params):
    to: Union[str, dict[str, Any]] = Field(description="a loss: mse, ce, or {kind: mse, half: true}")


class _LossSwitch(Intervention):
    def __init__(self, p: LossSwitchParams):
        self.p = p
        entry, params = LOSSES.parse(p.to, where="to")  # validates now, before anything runs
        self.loss = entry.fn(params)

    def configure(self, exp):
        kind = self.p.to if isinstance(self.p.to, str) else self.p.to.get("kind")
        if kind == "ce" and exp.data.task != "classification":
            raise EosbranchError("loss_switch.to: ce needs a classification data set")
        return replace(exp, loss_fn=self.loss)


@INTERVENTIONS.register("loss_switch", LossSwitchParams)
def loss_switch(p: LossSwitchParams) -> Intervention:
    """Train on another loss from the fork on (MSE <-> CE)."""
    return _LossSwitch(p)


class OptimizerSwitchParams(Params):
    to: dict[str, Any] = Field(description="an optimizer section, e.g. {kind: adam, lr: 0.001}")
    state: Literal["fresh", "carried"] = Field(
        description="fresh: the new optimizer's initial state; carried: keep the current state "
                    "(its structure must match the new optimizer's)")


class _OptimizerSwitch(Intervention):
    def __init__(self, p: OptimizerSwitchParams):
        self.p = p
        entry, params = OPTIMIZERS.parse(p.to, where="to")  # errors name to.<field>; see BranchSpec.compose
        self.optimizer = entry.fn(params)

    def configure(self, exp):
        return replace(exp, optimizer=self.optimizer)

    def edit(self, exp, st, at):
        fresh = self.optimizer.init(exp.params)
        if self.p.state == "fresh":
            return replace(st, lr=self.optimizer.p.lr, opt_state=fresh)
        if _structure(fresh) != _structure(st.opt_state):
            raise EosbranchError(
                f"optimizer_switch.state: cannot carry the state into {self.p.to.get('kind')!r}: it holds "
                f"{sorted(fresh)}, the current optimizer {sorted(st.opt_state)}; use state: fresh")
        return replace(st, lr=self.optimizer.p.lr)


def _structure(state: dict) -> dict:
    return {k: (len(v), [tuple(t.shape) for t in v]) if isinstance(v, list) else tuple(v.shape)
            for k, v in state.items()}


@INTERVENTIONS.register("optimizer_switch", OptimizerSwitchParams)
def optimizer_switch(p: OptimizerSwitchParams) -> Intervention:
    """Continue with another optimizer (its own lr and threshold) from the fork on."""
    return _OptimizerSwitch(p)
