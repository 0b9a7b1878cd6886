"""``binary``: BinaryConnect weights (Courbariaux, Bengio & David 2015), XNOR-Net style scales.

Every Conv2d / Linear weight is used as ``sign(W) · α`` in the forward pass, one ``α = mean |W|``
per output channel; the real-valued ``W`` is kept and updated with straight-through gradients
(passed where ``|W| ≤ 1``, and ``W`` clipped to [−1, 1] after each step, as in the paper).
After training the binarised values replace the real ones.

Served as an ordinary float graph of ±α weights: ORT has no binary kernels, so expect no speed-up.
The exporter folds BatchNorm into the convs, which multiplies each output channel by one number,
so every channel still holds exactly two values ±a; the ``binary`` codec stores a sign bit per
weight plus one float32 per output channel, and refuses any tensor that is not of that form.

The strength knob is ``full_precision``: ``"none"`` binarises every conv and linear layer,
``"ends"`` keeps the first layer and the classifier in float32 (as XNOR-Net and most binary
networks do: they hold few weights and cost the most accuracy). First and last are the first and
last layers a forward pass calls, so a user's network that declares its classifier first is
treated right. Those stay dense in the graph; the codec stores the binary ones.

The codec gets the conv and linear weights of the exported graph only (`export.layer_weights`),
never the other ≥2-D constants: the normalisation's mean and std [1, C, 1, 1] hold C different
values, which no binary tensor does once C > 1 (an RGB model).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression import export
from compression.core import encoding
from compression.core.errors import ConfigError
from compression.core.stats import format_rate
from compression.models import layers_in_call_order
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.train import accuracy, train

log = logging.getLogger(__name__)

FULL_PRECISION = ("none", "ends")  # layers kept in float32, most compressed first


@dataclass(frozen=True)
class BinaryConfig:
    # the search backs off from every layer binary to the first and last in float32
    strength: ClassVar[Knob] = Knob("full_precision", FULL_PRECISION)

    epochs: int = 2  # fine-tune from the base's real weights with binarised forward passes
    lr: float = 1e-3
    clip: float = 1.0  # real weights are clipped to [−clip, clip]; no gradient beyond
    full_precision: str = "none"  # "none": every conv/linear binary; "ends": first + last fp32

    def __post_init__(self) -> None:
        if self.full_precision not in FULL_PRECISION:
            raise ValueError(f"full_precision must be one of {FULL_PRECISION}, got "
                             f"{self.full_precision!r}")
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


def binarized_layers(model: nn.Module, input_shape: Sequence[int],
                     full_precision: str = "none") -> list[nn.Module]:
    """The Conv2d / Linear layers that get binary weights, in the order a forward pass calls
    them; ``"ends"`` leaves out the first and the last (the input layer and the classifier)."""
    layers = layers_in_call_order(model, input_shape)
    return layers[1:-1] if full_precision == "ends" else layers


def attach(layers: Sequence[nn.Module], clip: float = 1.0) -> None:
    """Binarise the weights of ``layers`` (in place) for training."""
    for m in layers:
        parametrize.register_parametrization(m, "weight", BinaryWeights(clip))


def bake(layers: Sequence[nn.Module]) -> None:
    """Replace the real weights by their binarised values (exactly ±α per output channel)."""
    for m in layers:
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        with torch.no_grad():
            m.weight.copy_(binarize(m.weight))


@torch.no_grad()
def clip_weights(model: nn.Module, clip: float) -> None:
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            m.parametrizations.weight.original.clamp_(-clip, clip)


@register("binary", BinaryConfig)
def apply(ctx: BuildContext, base: Built, config: BinaryConfig) -> MethodOutput:
    if base.model is None:
        raise ConfigError(f"binary needs a torch base model; {base.name!r} is graph-only")
    model = copy.deepcopy(base.model)
    every = layers_in_call_order(model, ctx.input_shape)
    layers = binarized_layers(model, ctx.input_shape, config.full_precision)
    attach(layers, config.clip)
    clip_weights(model, config.clip)
    acc_before = accuracy(model, ctx.splits.x_test, ctx.splits.y_test)
    if config.epochs:
        train(model, ctx.splits, ctx.train.scaled(epochs=config.epochs, lr=config.lr),
              seed=ctx.seed, after_step=lambda m: clip_weights(m, config.clip),
              desc="binaryconnect", progress=ctx.progress)
    bake(layers)
    model.eval()
    weights = export.layer_weights(export.to_onnx(model, ctx.input_shape))
    # The codec stores the weights the graph holds as ±α per output channel (BN folded in keeps
    # that form): with "ends", the first and last layers' float32 weights are not, and nor is a
    # binarised matrix the exporter stored transposed (a user's Linear run as a MatMul). Those
    # stay dense in the graph, counted in the report.
    tensors = {k: v for k, v in weights.items() if _is_binary(v)}
    n_weights = sum(v.size for v in tensors.values())
    binarized = {id(m) for m in layers}
    n_fp32 = sum(m.weight.numel() for m in every if id(m) not in binarized)
    n_dense_binary = sum(m.weight.numel() for m in layers) - n_weights
    stored = len(encoding.encode("binary", tensors))
    scope = ("first conv and classifier included" if config.full_precision == "none" else
             f"first layer and classifier kept float32: {n_fp32:,} weights")
    if n_dense_binary:
        log.warning("binary: %d binarised weights are not stored ±α per output channel in the "
                    "graph (transposed by the exporter); they stay dense float32", n_dense_binary)
        scope += f"; {n_dense_binary:,} binarised weights stored dense (not per-row in ONNX)"
    n_test = len(ctx.splits.y_test)
    acc_after = accuracy(model, ctx.splits.x_test, ctx.splits.y_test)
    report = (
        f"BinaryConnect fine-tune of `{base.name}` for {config.epochs} epoch(s): every conv and "
        f"linear weight is sign(W)·α with α = mean|W| per output channel ({scope}). Test "
        f"accuracy [95% Wilson] right after binarising {format_rate(acc_before, n_test)}, after "
        f"fine-tuning {format_rate(acc_after, n_test)}. "
        f"Binary weights: {n_weights:,} × 1 bit + one float32 per output channel = "
        f"{stored / 1e3:.1f} kB against {4 * n_weights / 1e3:.1f} kB as fp32 "
        f"({4 * n_weights / stored:.1f}x smaller). "
        "Served as a float graph of ±α weights, so no speed-up is expected.")
    return MethodOutput(model=model, spec=base.spec, weights_codec="binary", report_md=report,
                        codec_tensors=sorted(tensors),
                        details={"weight_bytes": stored, "fp32_weight_bytes": 4 * n_weights,
                                 "full_precision": config.full_precision,
                                 "float32_weights": n_fp32,
                                 "dense_binary_weights": n_dense_binary})


def _is_binary(a: np.ndarray) -> bool:
    """A binarised weight: every output channel holds several ±a of one magnitude a (a lone
    value per channel, such as a 1×1 conv on one channel, is trivially so, and is not)."""
    mag = np.abs(a.reshape(a.shape[0], -1))
    return mag.shape[1] > 1 and bool((mag == mag.max(axis=1, keepdims=True)).all())
