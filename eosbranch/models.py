"""Models: the MLP, CNN, ResNet, VGG-11 and two-layer linear builders, registered in ``MODELS``
(:mod:`eosbranch.model_registry`); importing this module also registers the transformers."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn
from torchvision.models import vgg11 as tv_vgg11, vgg11_bn

from .errors import SpecError
from .limits import MAX_DEPTH, MAX_WIDTH
from .model_registry import ACTIVATIONS, MODELS, Activation, image_shape, scaled_kaiming_
from .registry import Params
# Imported for its registrations (`transformer`, `vit`): MODELS is complete once models is imported.
from . import transformer as _transformer  # noqa: F401

class MLPParams(Params):
    width: int = Field(512, gt=0, le=MAX_WIDTH)
    depth: int = Field(2, ge=0, le=MAX_DEPTH, description="number of hidden layers")
    activation: Activation = "relu"
    init_scale: float = Field(1.0, gt=0)
    bias: bool = True


@MODELS.register("mlp", MLPParams)
def mlp(p: MLPParams, input_shape, num_outputs) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for _ in range(p.depth):
        layers += [nn.Linear(fan_in, p.width, bias=p.bias), ACTIVATIONS[p.activation]()]
        fan_in = p.width
    layers.append(nn.Linear(fan_in, num_outputs, bias=p.bias))
    return scaled_kaiming_(nn.Sequential(*layers), p.init_scale)


class CNNParams(Params):
    channels: list[Annotated[int, Field(gt=0, le=MAX_WIDTH)]] = Field(default_factory=lambda: [32, 32], min_length=1, max_length=MAX_DEPTH)
    activation: Activation = "relu"
    init_scale: float = Field(1.0, gt=0)
    pool: bool = True


@MODELS.register("cnn", CNNParams)
def cnn(p: CNNParams, input_shape, num_outputs) -> nn.Module:
    c, h, w = image_shape(input_shape)
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))] if len(input_shape) != 3 else []
    for out in p.channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), ACTIVATIONS[p.activation]()]
        if p.pool and min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers += [nn.Flatten(), nn.Linear(c * h * w, num_outputs)]
    return scaled_kaiming_(nn.Sequential(*layers), p.init_scale)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, batchnorm: bool, act: type[nn.Module]):
        super().__init__()
        norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not batchnorm)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not batchnorm)
        self.bn2 = norm(cout)
        self.act = act()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not batchnorm), norm(cout))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetParams(Params):
    widths: list[Annotated[int, Field(gt=0, le=MAX_WIDTH)]] = Field(default_factory=lambda: [16, 32, 64], min_length=1, max_length=MAX_DEPTH)
    blocks_per_stage: int = Field(1, ge=1, le=MAX_DEPTH)
    batchnorm: bool = False
    activation: Activation = "relu"
    init_scale: float = Field(1.0, gt=0)


@MODELS.register("resnet", ResNetParams)
def resnet(p: ResNetParams, input_shape, num_outputs) -> nn.Module:
    """CIFAR-style ResNet (3x3 stem, stages with stride 2 after the first); BatchNorm off by default."""
    c, h, w = image_shape(input_shape)
    act = ACTIVATIONS[p.activation]
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))] if len(input_shape) != 3 else []
    layers += [nn.Conv2d(c, p.widths[0], 3, 1, 1, bias=not p.batchnorm)]
    layers += [nn.BatchNorm2d(p.widths[0]) if p.batchnorm else nn.Identity(), act()]
    cin = p.widths[0]
    for i, width in enumerate(p.widths):
        for j in range(p.blocks_per_stage):
            stride = 2 if (i > 0 and j == 0) else 1
            layers.append(_Block(cin, width, stride, p.batchnorm, act))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_outputs)]
    return scaled_kaiming_(nn.Sequential(*layers), p.init_scale)


class VGGParams(Params):
    batchnorm: bool = False
    init_scale: float = Field(1.0, gt=0)


@MODELS.register("vgg11", VGGParams)
def vgg11(p: VGGParams, input_shape, num_outputs) -> nn.Module:
    """torchvision's VGG-11 feature stack with a CIFAR head (global pool + one linear layer)."""

    c, h, w = image_shape(input_shape)
    if c != 3:
        raise SpecError(f"model.kind: vgg11 expects 3-channel images; got input shape {input_shape}")
    net = (vgg11_bn if p.batchnorm else tv_vgg11)(weights=None)
    model = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_outputs))
    return scaled_kaiming_(model, p.init_scale)


class Linear2(nn.Module):
    """f(x) = c * (b^T x + b_o^T x_o): the two-layer linear model of the opposing-signal theorem.

    The input is the concatenation [x, x_o]; ``c`` is a trainable scalar (the second layer).
    """

    def __init__(self, dim: int, c: float):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.c = nn.Parameter(torch.tensor(float(c)))

    def forward(self, x):
        return (self.c * (x.flatten(1) @ self.w)).unsqueeze(1)


class Linear2Params(Params):
    c: float = 1.0


@MODELS.register("linear2", Linear2Params)
def linear2(p: Linear2Params, input_shape, num_outputs) -> nn.Module:
    if num_outputs != 1:
        raise SpecError(f"model.kind: linear2 has one output; the data has {num_outputs} "
                        "(use it with a one-output regression set such as linear_opposing)")
    return Linear2(math.prod(input_shape), p.c)


def build_model(section, input_shape, num_outputs, source: str = "") -> nn.Module:
    entry, params = MODELS.parse(section, "model", source)
    return entry.fn(params, tuple(input_shape), int(num_outputs))

