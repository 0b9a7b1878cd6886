"""``binary``: BinaryConnect weights (Courbariaux, Bengio & David 2015), XNOR-Net style scales.

Every Conv2d / Linear weight is used as ``sign(W) · α`` in the forward pass, one ``α = mean |W|``
per output channel; the real-valued ``W`` is kept and updated with straight-through gradients
(passed where ``|W| ≤ 1``, and ``W`` clipped to [−1, 1] after each step, as in the paper).
After training the binarised values replace the real ones.

Served as an ordinary float graph of ±α weights: ORT has no binary kernels, so expect no speed-up.
The exporter folds BatchNorm into the convs, which multiplies each output channel by one number,
so every channel still holds exactly two values ±a; the ``binary`` codec stores a sign bit per
weight plus one float32 per output channel, and refuses any tensor that is not of that form.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression import export
from compression.core import encoding
from compression.core.errors import ConfigError
from compression.registry import BuildContext, Built, MethodOutput, register
from compression.train import accuracy, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BinaryConfig:
    epochs: int = 2  # fine-tune from the base's real weights with binarised forward passes
    lr: float = 1e-3
    clip: float = 1.0  # real weights are clipped to [−clip, clip]; no gradient beyond

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be ≥ 0, got {self.epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.clip <= 0:
            raise ValueError(f"clip must be > 0, got {self.clip!r}")


def binarize(w: torch.Tensor) -> torch.Tensor:
    """sign(w) · mean|w| per output channel (dim 0); sign(0) = +1 so there are only two values."""
    alpha = w.abs().mean(dim=tuple(range(1, w.ndim)), keepdim=True)
    return torch.where(w >= 0, alpha, -alpha)


class _BinarizeSTE(torch.autograd.Function):
    """Forward: `binarize`. Backward: the straight-through estimator, cancelled where |w| > clip."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, clip: float) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.clip = clip
        return binarize(w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (w,) = ctx.saved_tensors
        return grad * (w.abs() <= ctx.clip), None


class BinaryWeights(nn.Module):
    """Parametrization: the layer computes with `binarize(W)`, ``W`` stays real-valued."""

    def __init__(self, clip: float = 1.0) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _BinarizeSTE.apply(w, self.clip)


def binarized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def attach(model: nn.Module, clip: float = 1.0) -> None:
    """Binarise every Conv2d / Linear weight of ``model`` (in place) for training."""
    for m in binarized_layers(model):
        parametrize.register_parametrization(m, "weight", BinaryWeights(clip))


def bake(model: nn.Module) -> None:
    """Replace the real weights by their binarised values (exactly ±α per output channel)."""
    for m in binarized_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            m.weight.copy_(binarize(m.weight))


@torch.no_grad()
def clip_weights(model: nn.Module, clip: float) -> None:
    for m in binarized_layers(model):
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight.original.clamp_(-clip, clip)


@register("binary", BinaryConfig)
def apply(ctx: BuildContext, base: Built, config: BinaryConfig) -> MethodOutput:
    if base.model is None:
        raise ConfigError(f"binary needs a torch base model; {base.name!r} is graph-only")
    model = copy.deepcopy(base.model)
    attach(model, config.clip)
    clip_weights(model, config.clip)
    acc_before = accuracy(model, ctx.splits.x_test, ctx.splits.y_test)
    if config.epochs:
        train(model, ctx.splits, ctx.train.scaled(epochs=config.epochs, lr=config.lr),
              seed=ctx.seed, after_step=lambda m: clip_weights(m, config.clip),
              desc="binaryconnect", progress=ctx.progress)
    bake(model)
    model.eval()
    tensors = {k: v for k, v in export.initializers(export.to_onnx(model, ctx.input_shape)).items()
               if v.dtype == np.float32 and v.ndim >= 2}
    n_weights = sum(v.size for v in tensors.values())
    stored = len(encoding.encode("binary", tensors))  # fails loudly if anything is not ±a
    report = (
        f"BinaryConnect fine-tune of `{base.name}` for {config.epochs} epoch(s): every conv and "
        "linear weight is sign(W)·α with α = mean|W| per output channel (first conv and "
        f"classifier included). Test accuracy right after binarising {100 * acc_before:.2f}%, "
        f"after fine-tuning {100 * accuracy(model, ctx.splits.x_test, ctx.splits.y_test):.2f}%. "
        f"Weights: {n_weights:,} × 1 bit + one float32 per output channel = {stored / 1e3:.1f} kB "
        f"against {4 * n_weights / 1e3:.1f} kB as fp32 ({4 * n_weights / stored:.1f}x smaller). "
        "Served as a float graph of ±α weights, so no speed-up is expected.")
    return MethodOutput(model=model, spec=base.spec, weights_codec="binary", report_md=report,
                        details={"weight_bytes": stored, "fp32_weight_bytes": 4 * n_weights})
