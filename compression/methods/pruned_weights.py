"""``pruned-weights``: iterative unstructured magnitude pruning, with lottery-ticket rewinds.

Train big → rank weights by magnitude → remove a little → fine-tune with the mask held → repeat
until the target sparsity (Han et al. 2015). The mask covers the weights of every Conv2d and
Linear; biases and BatchNorm stay dense. The ONNX graph stays dense too (ORT has no sparse conv
kernel worth using here), so this variant is smaller on disk — stored with the ``sparse`` codec —
but not faster.

Lottery ticket (Frankle & Carbin 2019): with the mask found, ``rewind = "init"`` retrains the
surviving weights from the base model's original initial values, ``"random"`` from a fresh
random init. The builder seeds ``torch.manual_seed(ctx.seed)`` right before building the base
model, so `initial_weights` rebuilds that init exactly (see its test); a base loaded with
``--base-checkpoint`` has no known init, and "init" then means this seed's init. The report
compares all three at the same sparsity.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compression import profile
from compression.core.errors import ConfigError
from compression.core.stats import format_bits
from compression.models import Spec, build_model
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.report import markdown_table, paired_cells, paired_columns
from compression.train import accuracy, logits, seed_everything, train

log = logging.getLogger(__name__)

REWINDS = ("none", "init", "random")
Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PrunedWeightsConfig:
    # the search backs off from the configured sparsity toward denser models
    strength: ClassVar[Knob] = Knob("sparsity", (0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
                                    continuous=True)

    sparsity: float = 0.9  # share of all conv + linear weights that end up zero
    steps: int = 3  # pruning rounds, sparsity rising on a cubic schedule (Zhu & Gupta 2017)
    epochs_per_step: int = 1  # fine-tune epochs after each round
    final_epochs: int = 0  # extra fine-tune epochs at the final sparsity
    lr: float = 1e-3
    scope: str = "layer"  # "layer": each layer to the same sparsity; "global": one threshold
    min_layer_weights: int = 2048  # smaller layers (first conv, classifier) stay dense
    rewind: str = "none"  # which model is served: fine-tuned, rewound to init, random reinit
    compare: bool = True  # also train the other two rewinds for the report
    rewind_epochs: int = 2  # training budget of a rewound model

    def __post_init__(self) -> None:
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps!r}")
        if self.epochs_per_step < 0 or self.final_epochs < 0 or self.rewind_epochs < 1:
            raise ValueError("epochs_per_step and final_epochs must be ≥ 0 and rewind_epochs ≥ 1, "
                             f"got {self.epochs_per_step!r}, {self.final_epochs!r}, "
                             f"{self.rewind_epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.rewind not in REWINDS:
            raise ValueError(f"rewind must be one of {REWINDS}, got {self.rewind!r}")


# --- masks -----------------------------------------------------------------------------------

def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Name → weight of every Conv2d and Linear (the tensors the sparsity target counts)."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)}


def magnitude_masks(model: nn.Module, sparsity: float, *, scope: str = "layer",
                    min_layer_weights: int = 0) -> Masks:
    """Keep-masks that zero the smallest-magnitude weights so that ``sparsity`` of all prunable
    weights are zero. Layers under ``min_layer_weights`` are kept dense and the others are pruned
    a little harder to make up for them."""
    weights = prunable(model)
    total = sum(w.numel() for w in weights.values())
    pruned = {k: w for k, w in weights.items() if w.numel() >= min_layer_weights}
    budget = sparsity * total  # weights to remove, all from the layers that may be pruned
    n_pruned = sum(w.numel() for w in pruned.values())
    if budget > n_pruned:
        raise ConfigError(f"sparsity {sparsity!r} is unreachable: layers under "
                          f"min_layer_weights={min_layer_weights} hold too many weights")
    masks = {k: torch.ones_like(w, dtype=torch.bool) for k, w in weights.items()}
    if scope == "global":
        mags = torch.cat([w.detach().abs().reshape(-1) for w in pruned.values()])
        k = round(budget)
        if k > 0:
            threshold = torch.kthvalue(mags, k).values
            for name, w in pruned.items():
                masks[name] = w.detach().abs() > threshold
    else:
        rate = budget / n_pruned
        for name, w in pruned.items():
            k = round(rate * w.numel())
            if k > 0:
                threshold = torch.kthvalue(w.detach().abs().reshape(-1), k).values
                masks[name] = w.detach().abs() > threshold
    return masks


def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero the pruned weights in place (after every optimiser step, so masks hold)."""
    weights = prunable(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask)


def sparsity(model: nn.Module) -> float:
    """Share of zero weights over all Conv2d and Linear weights."""
    weights = list(prunable(model).values())
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / max(1, sum(w.numel() for w in weights))


def schedule(target: float, steps: int) -> list[float]:
    """Cubic sparsity ramp: prune fast while many weights are redundant, slowly near the end."""
    return [target * (1 - (1 - i / steps) ** 3) for i in range(1, steps + 1)]


def initial_weights(spec: Spec, seed: int) -> nn.Module:
    """The base model's weights before training: the builder seeds this way before building it."""
    seed_everything(seed)
    return build_model(spec)


# --- the method ------------------------------------------------------------------------------

def prune_iteratively(ctx: BuildContext, model: nn.Module, config: PrunedWeightsConfig,
                      desc: str) -> Masks:
    """Prune ``model`` in place by the schedule, fine-tuning with the mask held; the final masks."""
    masks: Masks = {}
    ft = ctx.train.scaled(epochs=config.epochs_per_step, lr=config.lr)
    targets = schedule(config.sparsity, config.steps)
    for step, target in enumerate(targets, 1):
        masks = magnitude_masks(model, target, scope=config.scope,
                                min_layer_weights=config.min_layer_weights)
        apply_masks(model, masks)
        epochs = ft.epochs + (config.final_epochs if step == len(targets) else 0)
        if epochs:
            train(model, ctx.splits, ft.scaled(epochs=epochs), seed=ctx.seed + step,
                  after_step=lambda m, masks=masks: apply_masks(m, masks),
                  desc=f"{desc} {step}/{len(targets)}",
                  progress=ctx.progress)
        log.info("%s: round %d/%d, sparsity %.3f, val accuracy %.4f", desc, step, len(targets),
                 sparsity(model), accuracy(model, ctx.splits.x_val, ctx.splits.y_val))
    return masks


def retrain_ticket(ctx: BuildContext, start: nn.Module, masks: Masks, epochs: int,
                   desc: str) -> nn.Module:
    """Train ``start`` with ``masks`` applied and held (a lottery-ticket rewind)."""
    apply_masks(start, masks)
    cfg = ctx.train.scaled(epochs=epochs)
    train(start, ctx.splits, cfg, seed=ctx.seed, after_step=lambda m: apply_masks(m, masks),
          desc=desc, progress=ctx.progress)
    return start


@register("pruned-weights", PrunedWeightsConfig)
def apply(ctx: BuildContext, base: Built, config: PrunedWeightsConfig) -> MethodOutput:
    if base.model is None or base.spec is None:
        raise ConfigError(f"pruned-weights needs a torch base model with a spec; {base.name!r} "
                          "has none (graph-only variant)")
    model = copy.deepcopy(base.model)
    masks = prune_iteratively(ctx, model, config, desc="prune")
    models = {"none": model}
    wanted = REWINDS if config.compare else ("none", config.rewind)
    if "init" in wanted:
        # the base's own init: exact for `full`, which the builder trains from build_model(spec)
        if base.name != "full":
            log.warning("pruned-weights: rewind to init rebuilds the seeded init of %r's "
                        "architecture, which %r was not trained from", base.name, base.name)
        models["init"] = retrain_ticket(ctx, initial_weights(base.spec, ctx.seed), masks,
                                        config.rewind_epochs, "ticket-init")
    if "random" in wanted:
        models["random"] = retrain_ticket(ctx, initial_weights(base.spec, ctx.seed + 1_000_003),
                                          masks, config.rewind_epochs, "ticket-random")
    x, y = ctx.splits.x_test, ctx.splits.y_test
    # which test images each model gets right: the accuracies, and the paired tests against base
    correct = {k: logits(m, x).argmax(1) == y for k, m in models.items()}
    results = {k: {"accuracy": round(float(correct[k].mean()), 6),
                   "sparsity": round(sparsity(m), 6)} for k, m in models.items()}
    served = models[config.rewind]
    base_correct = logits(base.model, x).argmax(1) == y
    labels = {"none": "fine-tuned (iterative prune + fine-tune)",
              "init": f"rewound to init, retrained {config.rewind_epochs} epochs",
              "random": f"random re-init, retrained {config.rewind_epochs} epochs"}
    rows = [[labels[k] + (" (served)" if k == config.rewind else ""),
             f"{100 * r['sparsity']:.1f}%", *paired_cells(base_correct, correct[k])]
            for k, r in results.items()]
    report = (
        f"Iterative magnitude pruning ({config.scope}-wise) in {config.steps} rounds to "
        f"{100 * config.sparsity:.0f}% of the conv + linear weights, fine-tuning "
        f"{config.epochs_per_step} epoch(s) per round (+{config.final_epochs} at the end). "
        "The ONNX graph stays dense (ORT runs it as fast as the base, no speed-up expected); the "
        "artifact stores a bitmap + non-zero values, so only the size shrinks.\n\n"
        "Lottery ticket: the same final mask, three starting points (test split, Δ vs "
        f"`{base.name}` at {format_bits(base_correct)} on the same images, exact McNemar "
        "p-value).\n\n"
        + markdown_table(["model", "sparsity", *paired_columns(base.name)], rows))
    return MethodOutput(
        model=served, spec=base.spec, weights_codec="sparse",
        params_count=profile.count_nonzero_params(served),
        details={"sparsity": results[config.rewind]["sparsity"], "rewind": config.rewind,
                 "lottery_ticket": results},
        report_md=report)
