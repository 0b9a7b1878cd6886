"""``pruned-neurons``: structured pruning, whole channels removed so the network physically shrinks.

`torch-pruning` (DepGraph) finds which tensors are coupled to a channel (the conv's output, its
BatchNorm, the next conv's input, the classifier's input after pooling), so removing a channel
keeps every layer consistent. Importance is the L2 norm of each coupled group; the classifier's
outputs are never pruned (the class count stays). Pruning is iterative: a step of channels goes,
then a short fine-tune, repeated until the target ratio.

Any network torch-pruning can trace works, a user's ResNet included: DepGraph couples the channels
a residual addition joins (both branches, and every block that adds into the same stream), so they
go or stay together. The classifier — the last conv or linear layer a forward pass calls — keeps
its outputs.

The result is expressed as a spec and rebuilt with `build_model`, then loaded from the pruned
state, so the served model is a plain module tree (no pickled modules): for a `StagedCNN`, the spec
with per-block channel lists; for any other network, its spec plus a ``resize`` edit
(`compression.models.resized_spec`). A network torch-pruning cannot handle is `Unsupported`, and
the build leaves the variant out with torch-pruning's reason.

`narrower` is the same pruning on a freshly built copy, for a spec only: a distillation student
with a fraction of the base architecture's channels.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn

from compression import profile
from compression.core.errors import ConfigError, Unsupported
from compression.models import Spec, StagedCNN, build_model, layers_in_call_order, resized_spec
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.train import accuracy, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrunedNeuronsConfig:
    # the search backs off from the configured ratio toward wider networks
    strength: ClassVar[Knob] = Knob("ratio", (0.75, 0.6, 0.5, 0.4, 0.3, 0.2), continuous=True)

    ratio: float = 0.5  # share of channels removed from every prunable layer
    steps: int = 2  # pruning rounds (linear ratio schedule), each followed by a fine-tune
    epochs_per_step: int = 1
    final_epochs: int = 1  # extra fine-tune epochs after the last round
    lr: float = 2e-3
    global_pruning: bool = False  # one ranking across layers instead of the same ratio per layer

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be in (0, 1), got {self.ratio!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps!r}")
        if self.epochs_per_step < 0 or self.final_epochs < 0:
            raise ValueError(f"epochs must be ≥ 0, got epochs_per_step={self.epochs_per_step!r}, "
                             f"final_epochs={self.final_epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


def conv_widths(model: StagedCNN) -> list[list[int]]:
    """Output channels of each block, per stage (a block's width is its last conv's output)."""
    widths = []
    for stage in model.stages:
        blocks = [b for b in stage if isinstance(b, nn.Sequential)]
        widths.append([[m for m in b if isinstance(m, nn.Conv2d)][-1].out_channels
                       for b in blocks])
    return widths


def layer_widths(model: nn.Module) -> list[list[int]]:
    """Block widths per stage for a `StagedCNN`; for any other network, one list of every conv's
    and linear layer's output width, in module order."""
    if isinstance(model, StagedCNN):
        return conv_widths(model)
    return [[m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
             for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]]


def pruned_spec(spec: Spec, model: nn.Module) -> Spec:
    """The spec of the pruned ``model``: a staged CNN's spec with each stage's ``channels``
    replaced by the pruned per-block widths; any other spec plus a ``resize`` edit."""
    if not isinstance(model, StagedCNN) or spec.get("kind") != "cnn":
        return resized_spec(spec, model)
    stages = []
    for st, widths in zip(spec["stages"], conv_widths(model), strict=True):
        stages.append({**{k: v for k, v in st.items() if k != "depth"}, "channels": widths})
    return {**spec, "stages": stages}


def prune_channels(model: nn.Module, input_shape: tuple[int, int, int], ratio: float,
                   steps: int, *, global_pruning: bool = False,
                   between: Callable[[int], None] | None = None) -> None:
    """Remove ``ratio`` of the channels of ``model`` in place over ``steps`` rounds, calling
    ``between(step)`` after each (the fine-tune). The classifier's outputs stay."""
    classifier = layers_in_call_order(model, input_shape)[-1]
    example = torch.zeros((1, *input_shape))
    model.eval()
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio, iterative_steps=steps, global_pruning=global_pruning,
            ignored_layers=[classifier])
    except Exception as exc:  # torch-pruning's graph building fails in many ways on odd modules
        raise Unsupported(f"torch-pruning cannot build the dependency graph of "
                          f"{type(model).__name__} ({type(exc).__name__}: {exc})") from exc
    for step in range(1, steps + 1):
        pruner.step()
        if between is not None:
            between(step)


def narrower(spec: Spec, width: float, input_shape: tuple[int, int, int]) -> Spec:
    """The spec of ``spec``'s network with ``width`` of its channels (0 < width < 1): the same
    channel pruning, in one round, on a freshly built copy (a student starts from its own init)."""
    with torch.random.fork_rng(devices=[]):  # building the copy must not move the seed
        model = build_model(spec)
    prune_channels(model, input_shape, 1.0 - width, 1)
    return pruned_spec(spec, model)


@register("pruned-neurons", PrunedNeuronsConfig)
def apply(ctx: BuildContext, base: Built, config: PrunedNeuronsConfig) -> MethodOutput:
    if base.model is None or base.spec is None:
        raise ConfigError(f"pruned-neurons needs a torch base model with a spec; {base.name!r} "
                          "has none")
    shape = ctx.input_shape
    model = copy.deepcopy(base.model)
    macs_before = profile.count_macs(model, shape)
    ft = ctx.train.scaled(epochs=config.epochs_per_step, lr=config.lr)

    def fine_tune(step: int) -> None:
        epochs = ft.epochs + (config.final_epochs if step == config.steps else 0)
        if epochs:
            train(model, ctx.splits, ft.scaled(epochs=epochs), seed=ctx.seed + step,
                  desc=f"prune-channels {step}/{config.steps}", progress=ctx.progress)
        log.info("channel pruning round %d/%d: widths %s, %.1f M MACs, val accuracy %.4f",
                 step, config.steps, layer_widths(model), profile.count_macs(model, shape) / 1e6,
                 accuracy(model, ctx.splits.x_val, ctx.splits.y_val))

    prune_channels(model, shape, config.ratio, config.steps,
                   global_pruning=config.global_pruning, between=fine_tune)
    # a clean module tree from the spec: proves the spec describes the pruned network exactly
    spec = pruned_spec(base.spec, model)
    clean = build_model(spec)
    clean.load_state_dict(model.state_dict())
    clean.eval()
    macs_after = profile.count_macs(clean, shape)
    widths = layer_widths(clean)
    before = layer_widths(base.model)
    report = (
        f"Channels removed by L2-norm importance (torch-pruning DepGraph), ratio {config.ratio} "
        f"in {config.steps} rounds with {config.epochs_per_step} fine-tune epoch(s) each "
        f"(+{config.final_epochs} at the end). Block widths {before} → {widths}; MACs "
        f"{macs_before / 1e6:.2f} M → {macs_after / 1e6:.2f} M "
        f"({macs_before / max(macs_after, 1):.1f}x fewer).")
    return MethodOutput(model=clean, spec=spec,
                        details={"widths": widths, "macs_ratio":
                                 round(macs_before / max(macs_after, 1), 3)},
                        report_md=report)
