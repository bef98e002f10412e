"""The resource estimate (issue 17): what a run of a spec needs, checked against the machine's
memory before anything is allocated or written. The hard bounds on sizes are in limits.py.

Parameters are counted exactly from the model built on PyTorch's ``meta`` device (shapes only, no
memory), activations from a forward pass there at the training batch size, and the data's size
from its parameters, compared with the machine's physical memory. A spec that needs more is refused
in one line naming the file and the largest term; ``eosbranch train/sweep --no-limits``
(``limits=False`` in Python) skips the estimate.

The estimate is deliberately rough (a constant factor over the sizes: gradients, optimizer state,
Lanczos vectors, the backward and Hessian-vector products' intermediates); its job is to refuse
what cannot possibly run, not to predict peak memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import SpecError
from .models import build_model

# Bytes per element and factors over the sizes (see the module docstring).
PARAM_COPIES = 8  # weights, gradient, up to two optimizer buffers, Lanczos/HVP work vectors, a checkpoint
ACTIVATION_COPIES = 3  # forward outputs kept for backward, their gradients, the HVP's second pass
DATA_COPIES = 3  # generated in float64 (and concatenated), then placed in the run's dtype


@dataclass(frozen=True)
class Estimate:
    parameters: int
    data_bytes: int
    param_bytes: int
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.data_bytes + self.param_bytes + self.activation_bytes

    def largest(self) -> str:
        terms = {"data": self.data_bytes, "parameters": self.param_bytes, "activations": self.activation_bytes}
        return max(terms, key=terms.get)


def machine_memory() -> int:
    """Physical memory of this machine in bytes (0 if the system does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def data_shape(section: dict) -> Optional[tuple[int, tuple[int, ...], int]]:
    """(points, input shape, outputs) of a resolved ``data`` section, from its parameters alone;
    None for kinds whose size lives in a file (``tensors``: its archive's sizes are checked
    before decompression) or that are not known here."""
    kind = section.get("kind")
    if kind == "digits":
        per = section.get("n_per_class")
        classes = len(section.get("classes") or [0, 1])
        return (min(per * classes, 1797) if per else 1797), (64,), classes
    if kind == "prototypes":
        n = 2 * (section["n_per_class"] + (section.get("n_test_per_class") or 0))
        return n, (section["dim"],), 2
    if kind == "cifar10":
        return (section.get("n") or 12_000) + (section.get("n_test") or 0), (3, 32, 32), 2
    if kind == "chebyshev":
        return section["n"], (1,), 1
    if kind == "linear_opposing":
        return section["n"], (section["d1"] + section["d2"],), 1
    return None


def estimate(spec) -> Optional[Estimate]:
    """The rough memory a run of ``spec`` (a resolved :class:`~eosbranch.spec.Spec`) needs."""
    shape = data_shape(spec.data)
    if shape is None:
        return None
    n, input_shape, outputs = shape
    elem = 8 if spec.dtype == "float64" else 4
    batch = spec.optimizer.get("batch_size") or n
    with torch.device("meta"):
        model = build_model(spec.model, input_shape, outputs)
        parameters = sum(p.numel() for p in model.parameters())
        acts = [0]

        def count(_module, _inputs, output):
            if isinstance(output, torch.Tensor):
                acts[0] += output.numel()

        hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                model(torch.empty((min(batch, n), *input_shape)))
        except Exception:  # noqa: BLE001 - a shape problem is reported by the real build, in its words
            acts[0] = 0
        finally:
            for h in hooks:
                h.remove()
    return Estimate(parameters=parameters, data_bytes=n * math.prod(input_shape) * 8 * DATA_COPIES,
                    param_bytes=parameters * elem * PARAM_COPIES, activation_bytes=acts[0] * elem * ACTIVATION_COPIES)


def _gib(b: float) -> str:
    return f"{b / 2**30:.1f} GiB" if b >= 2**28 else f"{b / 2**20:.0f} MiB"


def check_resources(spec, source: str = "<spec>", memory: Optional[int] = None) -> Optional[Estimate]:
    """Refuse, in one line naming ``source`` and the largest term, a spec whose estimate exceeds
    the machine's physical memory. Allocates nothing (the model is built on the meta device)."""
    est = estimate(spec)
    memory = machine_memory() if memory is None else memory
    if est is None or not memory or est.total <= memory:
        return est
    field = {"data": "data", "parameters": "model", "activations": "model"}[est.largest()]
    raise SpecError(
        f"{source}: {field}: this run needs about {_gib(est.total)} ({est.parameters:,} parameters; "
        f"data {_gib(est.data_bytes)}, parameters {_gib(est.param_bytes)}, activations {_gib(est.activation_bytes)}), "
        f"more than this machine's {_gib(memory)}; make it smaller, or pass --no-limits to try anyway")
