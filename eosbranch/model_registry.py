"""The model registry and what every model shares: ``MODELS`` (name -> builder
``(params, input_shape, num_outputs) -> nn.Module``), the activations, the 2026 study's
initialisation (Kaiming-normal weights x ``init_scale``, zero biases) and reading an input shape
as an image. Below both :mod:`eosbranch.models` and :mod:`eosbranch.transformer`, which register
into it."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .errors import SpecError
from .registry import Registry

MODELS = Registry("model")

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}
Activation = Literal["relu", "tanh", "elu", "gelu"]


def scaled_kaiming_(module: nn.Module, init_scale: float) -> nn.Module:
    """Kaiming-normal weights x ``init_scale`` and zero biases on every linear/conv layer."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            with torch.no_grad():
                m.weight.mul_(init_scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    # Conv nets need (C, H, W); flat square inputs (digits: 64 = 8x8) are read as one channel.
    if len(input_shape) == 3:
        return tuple(input_shape)
    n = math.prod(input_shape)
    side = math.isqrt(n)
    if side * side != n:
        raise SpecError(f"model.kind: a conv model needs image inputs (C,H,W) or a square flat input; got {input_shape}")
    return (1, side, side)
