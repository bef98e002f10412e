"""Transformers with exact curvature: the ``transformer`` (token sequences) and ``vit`` (images) models.

Every operation is written out so that its second and third derivatives are plain autograd:
attention is ``softmax(Q K^T / sqrt(d_head)) V`` in explicit matrix products (the fused
``F.scaled_dot_product_attention`` kernels have no double backward, and the curvature code needs
double backward for HVPs and a third reverse pass for Q_k), and :class:`LayerNorm` is computed from
its formula rather than by ``F.layer_norm`` (whose third derivatives the tests compare against this
one: the native kernel's derivative formulas are a separate implementation, this one is ordinary
autograd on mean, variance and a square root). Blocks are pre-norm: ``x + attn(ln1(x))`` then
``x + mlp(ln2(x))`` with a GELU MLP (smooth, so Q_k is the derivative of S everywhere).

Inputs: ``transformer`` takes X of shape (N, T) holding integer-valued token ids (the ``modular``
data set's [a, b]); ``vit`` takes images (C, H, W) or flat square inputs (digits: 64 = 1x8x8), cut
into ``patch`` x ``patch`` patches, each flattened and mapped by one Linear layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .errors import SpecError
from .model_registry import MODELS, image_shape, scaled_kaiming_
from .registry import Params

__all__ = ["LayerNorm", "Attention", "Block", "Transformer", "ViT"]


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, by its formula."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x: Tensor) -> Tensor:
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        var = (xc * xc).mean(-1, keepdim=True)
        return xc / torch.sqrt(var + self.eps) * self.weight + self.bias


class Attention(nn.Module):
    """Multi-head self-attention, ``softmax(Q K^T / sqrt(d_head) [+ causal mask]) V``, written out."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        if d % heads:
            raise SpecError(f"model.heads: d_model {d} is not divisible by {heads} heads")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        H = self.heads
        q, k, v = self.qkv(x).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, T, dh]
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // H)
        if self.causal:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        att = torch.softmax(scores, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, causal: bool):
        super().__init__()
        self.ln1, self.attn = LayerNorm(d), Attention(d, heads, causal)
        self.ln2 = LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def _init(model: nn.Module, init_scale: float) -> nn.Module:
    """Kaiming-normal x init_scale on Linear weights, zero biases (as every model); embeddings
    N(0, 1) x init_scale; LayerNorm weights 1, biases 0."""
    scaled_kaiming_(model, init_scale)
    for name, p in model.named_parameters():
        if name.endswith("embed") or name.endswith("embed.weight") or name == "cls":
            with torch.no_grad():
                p.normal_().mul_(init_scale)
    return model


class Transformer(nn.Module):
    """Token embedding + positional embedding, pre-norm blocks, final LayerNorm, a linear readout
    of the last token (``readout: last``) or the mean over tokens (``mean``)."""

    def __init__(self, vocab: int, length: int, d: int, depth: int, heads: int, mlp_ratio: int,
                 causal: bool, readout: str, num_outputs: int):
        super().__init__()
        self.vocab, self.readout = vocab, readout
        self.tok_embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Parameter(torch.zeros(length, d))
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio, causal) for _ in range(depth)])
        self.ln = LayerNorm(d)
        self.head = nn.Linear(d, num_outputs)

    def forward(self, X: Tensor) -> Tensor:
        h = self.tok_embed(X.long()) + self.pos_embed
        h = self.ln(self.blocks(h))
        return self.head(h[:, -1] if self.readout == "last" else h.mean(1))


class ViT(nn.Module):
    """Patches (flattened, one Linear layer) + positional embedding (+ a class token), pre-norm
    blocks, final LayerNorm, a linear readout of the class token (``pool: cls``) or the mean over
    patches (``mean``)."""

    def __init__(self, image: tuple[int, int, int], patch: int, d: int, depth: int, heads: int,
                 mlp_ratio: int, pool: str, num_outputs: int):
        super().__init__()
        c, h, w = image
        self.image, self.patch, self.pool = image, patch, pool
        n = (h // patch) * (w // patch)
        self.patch_embed = nn.Linear(c * patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(1, d)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(n + (pool == "cls"), d))
        self.blocks = nn.Sequential(*[Block(d, heads, mlp_ratio, False) for _ in range(depth)])
        self.ln = LayerNorm(d)
        self.head = nn.Linear(d, num_outputs)

    def patches(self, X: Tensor) -> Tensor:
        c, h, w = self.image
        p = self.patch
        x = X.reshape(X.shape[0], c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(X.shape[0], (h // p) * (w // p), c * p * p)

    def forward(self, X: Tensor) -> Tensor:
        t = self.patch_embed(self.patches(X))
        if self.cls is not None:
            t = torch.cat([self.cls.expand(X.shape[0], -1).unsqueeze(1), t], dim=1)
        h = self.ln(self.blocks(t + self.pos_embed))
        return self.head(h[:, 0] if self.cls is not None else h.mean(1))


class TransformerParams(Params):
    d_model: int = Field(64, gt=0)
    depth: int = Field(1, ge=0, description="number of blocks")
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    vocab: int | None = Field(None, ge=2, description="token ids 0..vocab-1; default: the number of outputs")
    causal: bool = True
    readout: Literal["last", "mean"] = "last"
    init_scale: float = Field(1.0, gt=0)


@MODELS.register("transformer", TransformerParams)
def transformer(p: TransformerParams, input_shape, num_outputs) -> nn.Module:
    if len(input_shape) != 1:
        raise SpecError(f"model.kind: transformer needs token sequences of shape (N, length); got inputs {input_shape}")
    vocab = p.vocab or num_outputs
    return _init(Transformer(vocab, input_shape[0], p.d_model, p.depth, p.heads, p.mlp_ratio, p.causal,
                             p.readout, num_outputs), p.init_scale)


class ViTParams(Params):
    patch: int = Field(4, ge=1)
    d_model: int = Field(64, gt=0)
    depth: int = Field(1, ge=0)
    heads: int = Field(4, ge=1)
    mlp_ratio: int = Field(4, ge=1)
    pool: Literal["cls", "mean"] = "cls"
    init_scale: float = Field(1.0, gt=0)


@MODELS.register("vit", ViTParams)
def vit(p: ViTParams, input_shape, num_outputs) -> nn.Module:
    image = image_shape(input_shape)
    if image[1] % p.patch or image[2] % p.patch:
        raise SpecError(f"model.patch: {p.patch} does not divide the image size {image[1]}x{image[2]}")
    return _init(ViT(image, p.patch, p.d_model, p.depth, p.heads, p.mlp_ratio, p.pool, num_outputs), p.init_scale)
