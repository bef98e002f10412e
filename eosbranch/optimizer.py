"""Optimizers as explicit state (optax style): ``init(params) -> state``, ``update(...)`` in place.

The step size lives outside the optimizer, in the training state, so a branch that exits the EoS
edits one field. State is a plain dict of tensors (and lists of tensors) so it checkpoints with
``weights_only=True``. Each optimizer also knows its stability threshold (DESIGN §2).

Conventions match ``torch.optim`` where one exists (SGD with momentum/dampening/Nesterov, Adam),
so a hand computation or ``torch.optim`` is an oracle for the tests.
"""

from __future__ import annotations

import abc
from typing import Optional

import torch
from pydantic import Field, model_validator

from .registry import Params, Registry
from .limits import MAX_LR

OPTIMIZERS = Registry("optimizer")

State = dict


class OptimizerParams(Params):
    lr: float = Field(gt=0, le=MAX_LR, description="step size eta")
    batch_size: Optional[int] = Field(None, gt=0, description="None = full batch")


class Optimizer(abc.ABC):
    """Base: subclasses implement ``update``; ``init`` gives the state (here only a step count)."""

    preconditioned = False  # True when the threshold applies to lambda_1(P^-1 H)

    def __init__(self, params: OptimizerParams):
        self.p = params

    @property
    def batch_size(self) -> Optional[int]:
        return self.p.batch_size

    def init(self, params: list[torch.Tensor]) -> State:
        return {"step": torch.zeros((), dtype=torch.int64)}

    @abc.abstractmethod
    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: State, lr: float) -> None:
        """Apply one step in place with step size ``lr`` (the state's, not the spec's)."""

    def threshold(self, lr: float) -> float:
        return 2.0 / lr


class GDParams(OptimizerParams):
    pass


@OPTIMIZERS.register("gd", GDParams)
class GD(Optimizer):
    """Full-batch gradient descent: theta <- theta - eta g."""

    @torch.no_grad()
    def update(self, params, grads, state, lr):
        state["step"] += 1
        torch._foreach_add_(params, grads, alpha=-lr)


class SGDParams(OptimizerParams):
    batch_size: int = Field(gt=0)


@OPTIMIZERS.register("sgd", SGDParams)
class SGD(GD):
    """Minibatch SGD; the trainer draws a seeded, deterministic order of batches."""


class MomentumParams(OptimizerParams):
    beta: float = Field(0.9, ge=0, lt=1)
    dampening: float = Field(0.0, ge=0, lt=1, description="tau: buffer gets (1 - tau) g")
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_no_dampening(self):
        if self.nesterov and self.dampening != 0:
            raise ValueError("nesterov requires dampening 0 (as in torch.optim.SGD)")
        return self


@OPTIMIZERS.register("momentum", MomentumParams)
class Momentum(Optimizer):
    """Heavy ball: b <- beta b + (1 - tau) g (b_1 = g), d = b (or g + beta b, Nesterov), theta -= eta d."""

    def init(self, params):
        return {"step": torch.zeros((), dtype=torch.int64), "buf": [torch.zeros_like(p) for p in params]}

    @torch.no_grad()
    def update(self, params, grads, state, lr):
        p = self.p
        buf = state["buf"]
        if int(state["step"]) == 0:
            torch._foreach_copy_(buf, grads)
        else:
            torch._foreach_mul_(buf, p.beta)
            torch._foreach_add_(buf, grads, alpha=1 - p.dampening)
        state["step"] += 1
        if p.nesterov:
            torch._foreach_add_(params, torch._foreach_add(grads, buf, alpha=p.beta), alpha=-lr)
        else:
            torch._foreach_add_(params, buf, alpha=-lr)

    def threshold(self, lr):
        # Linear stability of heavy ball on a quadratic: eta (1 - tau) lambda < 2 + 2 beta;
        # Nesterov: eta lambda (1 + 2 beta) < 2 + 2 beta.
        p = self.p
        if p.nesterov:
            return (2 + 2 * p.beta) / (lr * (1 + 2 * p.beta))
        return (2 + 2 * p.beta) / (lr * (1 - p.dampening))


class AdamParams(OptimizerParams):
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, ge=0)


@OPTIMIZERS.register("adam", AdamParams)
class Adam(Optimizer):
    """Adam with bias correction, as torch.optim.Adam (no weight decay)."""

    preconditioned = True

    def init(self, params):
        return {
            "step": torch.zeros((), dtype=torch.int64),
            "m": [torch.zeros_like(p) for p in params],
            "v": [torch.zeros_like(p) for p in params],
        }

    @torch.no_grad()
    def update(self, params, grads, state, lr):
        p = self.p
        state["step"] += 1
        t = int(state["step"])
        torch._foreach_lerp_(state["m"], grads, 1 - p.beta1)
        torch._foreach_mul_(state["v"], p.beta2)
        torch._foreach_addcmul_(state["v"], grads, grads, value=1 - p.beta2)
        bc1, bc2 = 1 - p.beta1**t, 1 - p.beta2**t
        denom = torch._foreach_sqrt(state["v"])
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, p.eps)
        torch._foreach_addcdiv_(params, state["m"], denom, value=-lr / bc1)

    def preconditioner(self, state) -> list[torch.Tensor]:
        """Diagonal P = sqrt(v_hat) + eps of the next step (zeros-safe before the first step)."""
        t = max(int(state["step"]), 1)
        bc2 = 1 - self.p.beta2**t
        return [(v / bc2).sqrt() + self.p.eps for v in state["v"]]

    def threshold(self, lr):
        # On the preconditioned Hessian P^-1 H (DESIGN §2): (2 + 2 beta1) / ((1 - beta1) eta).
        b1 = self.p.beta1
        return (2 + 2 * b1) / ((1 - b1) * lr)


class SplitSGDParams(OptimizerParams):
    lr_sign: float = Field(gt=0, le=MAX_LR, description="eta_2: size of the signed step")
    beta: float = Field(0.9, ge=0, lt=1)
    dampening: float = Field(0.9, ge=0, lt=1)
    r: Optional[float] = Field(None, gt=0, description="|debiased momentum| threshold; default from r_quantile")
    r_quantile: float = Field(0.1, gt=0, lt=1, description="r = this quantile of |first gradient|")


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    # torch.quantile caps input size at 2^24 elements; a sort + linear interpolation does not.
    s = x.flatten().sort().values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@OPTIMIZERS.register("splitsgd", SplitSGDParams)
class SplitSGD(Optimizer):
    """SplitSGD (Rosenfeld & Risteski 2023): sign steps on large-momentum parameters, SGD on the rest.

    m <- beta m + (1 - tau) g; m_hat = m (1 - beta) / ((1 - tau)(1 - beta^t)) (weights sum to one);
    parameters with |m_hat| > r step by -eta_2 sign(m_hat), the rest by -eta_1 m_hat.
    """

    def init(self, params):
        return {
            "step": torch.zeros((), dtype=torch.int64),
            "m": [torch.zeros_like(p) for p in params],
            "r": torch.tensor(float("nan") if self.p.r is None else self.p.r, dtype=torch.float64),
        }

    @torch.no_grad()
    def update(self, params, grads, state, lr):
        p = self.p
        if torch.isnan(state["r"]):
            flat = torch.cat([g.detach().abs().flatten().double() for g in grads])
            state["r"] = _quantile(flat, p.r_quantile).cpu()
        state["step"] += 1
        t = int(state["step"])
        torch._foreach_mul_(state["m"], p.beta)
        torch._foreach_add_(state["m"], grads, alpha=1 - p.dampening)
        scale = (1 - p.beta) / ((1 - p.dampening) * (1 - p.beta**t))
        r = float(state["r"])
        for theta, m in zip(params, state["m"]):
            m_hat = m * scale
            step = torch.where(m_hat.abs() > r, p.lr_sign * m_hat.sign(), lr * m_hat)
            theta.sub_(step)

    def threshold(self, lr):
        # The SGD part with a debiased (unit-gain) momentum average: (2 + 2 beta) / ((1 - beta) eta_1).
        b = self.p.beta
        return (2 + 2 * b) / ((1 - b) * lr)


def build_optimizer(section, source: str = "") -> Optimizer:
    entry, params = OPTIMIZERS.parse(section, "optimizer", source)
    return entry.fn(params)
