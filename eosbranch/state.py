"""The training state: everything that changes from step to step, and the checkpoint that holds it.

:class:`TrainState` is the state besides the model's parameters (step, t_eff, the step size,
optimizer state, data cursor, warm-start vectors, what measurements found); a checkpoint is that
state plus the parameters and every global RNG, as plain tensors and values
(:func:`checkpoint_state` / :func:`restore_state`: ``torch.save`` / ``weights_only`` loading).
The on-disk keys are fixed: existing run directories resume and forks stay bit-exact.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .experiment import Experiment


@dataclass
class TrainState:
    """The mutable state besides the model's parameters: all of it goes into a checkpoint."""

    step: int = 0
    t_eff: float = 0.0
    lr: float = 0.0
    opt_state: dict = field(default_factory=dict)
    cursor: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})
    eig_vectors: Optional[torch.Tensor] = None  # warm start for the next sharpness solve
    # The measurement's vectors before those (None after a cold start): with them the next warm
    # start is extrapolated along the eigenvectors' path (eosbranch.curvature.warm_start).
    prev_eig_vectors: Optional[torch.Tensor] = None
    precond_vectors: Optional[torch.Tensor] = None  # same, for lambda_1(P^-1 H) under Adam
    # What measurements found (last sharpness, t_star, t_star_star, the oscillation track) and the
    # fork step; kept as one mapping because the checkpoint format stores it so. Read the
    # events through the typed properties below.
    measured: dict = field(default_factory=dict)
    prev_example_losses: Optional[torch.Tensor] = None  # for fraction_loss_increased
    reference: Optional[dict] = None  # step, theta and v1 of the weight-projection reference
    intervention: dict = field(default_factory=dict)  # per-step intervention state (gradient surgery's v1)

    @property
    def t_star(self) -> Optional[int]:
        """The first measurement step at or past the threshold (None: not yet)."""
        return self.measured.get("t_star")

    @property
    def t_star_star(self) -> Optional[int]:
        """A branch's own t**: its first measurement after the fork at or past its threshold."""
        return self.measured.get("t_star_star")

    @property
    def fork_step(self) -> Optional[int]:
        """The step this branch was forked at (None: a trunk)."""
        return self.measured.get("fork_step")

    @fork_step.setter
    def fork_step(self, step: int) -> None:
        self.measured["fork_step"] = step


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # weights_only refuses object arrays: keep NumPy's legacy state as plain values.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(exp: Experiment, st: TrainState) -> dict:
    return {
        "step": st.step, "t_eff": st.t_eff, "lr": st.lr,
        "model": {k: v.detach().cpu().clone() for k, v in exp.model.state_dict().items()},
        "optimizer": _to_cpu(st.opt_state), "cursor": dict(st.cursor), "rng": _rng_state(),
        "eig_vectors": _to_cpu(st.eig_vectors), "precond_vectors": _to_cpu(st.precond_vectors),
        "prev_eig_vectors": _to_cpu(st.prev_eig_vectors),
        "measured": copy.deepcopy(st.measured), "prev_example_losses": _to_cpu(st.prev_example_losses),
        "reference": _to_cpu(st.reference), "intervention": _to_cpu(st.intervention),
    }


def restore_state(exp: Experiment, ckpt: dict) -> TrainState:
    """Load a checkpoint's parameters into ``exp.model`` and its RNGs into the process; return its state."""
    exp.model.load_state_dict(ckpt["model"])
    _set_rng_state(ckpt["rng"])
    return TrainState(
        step=int(ckpt["step"]), t_eff=float(ckpt["t_eff"]), lr=float(ckpt["lr"]),
        opt_state=_to_device(ckpt["optimizer"], exp.device), cursor=dict(ckpt["cursor"]),
        eig_vectors=_to_device(ckpt.get("eig_vectors"), exp.device),
        precond_vectors=_to_device(ckpt.get("precond_vectors"), exp.device),
        prev_eig_vectors=_to_device(ckpt.get("prev_eig_vectors"), exp.device),
        measured=copy.deepcopy(dict(ckpt.get("measured", {}))),
        prev_example_losses=_to_device(ckpt.get("prev_example_losses"), exp.device),
        reference=_to_device(ckpt.get("reference"), exp.device),
        intervention=_to_device(ckpt.get("intervention", {}), exp.device),
    )


def _to_cpu(obj):
    return _map_tensors(obj, lambda t: t.detach().cpu().clone())


def _to_device(obj, device):
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj
