"""``depthwise``: every standard k×k conv with more than one input channel becomes a depthwise
separable pair (MobileNet), and the converted network is trained by distillation from its base.

A conv [O, I, k, k] (k²·I·O weights) becomes a depthwise k×k conv (groups = I, k²·I weights)
followed by a 1×1 pointwise conv (I·O weights), BN-ReLU after each. Per layer the weights shrink
by (k²·I + I·O) / (k²·I·O) = 1/O + 1/k², and so do the MACs. The first conv has one input
channel, so it has nothing to separate and stays standard. The architecture is the base spec with
``conv = "depthwise"``, so the variant stays expressible as a spec; the new weights start from
PyTorch's init and learn from the base model's soft targets (Hinton et al. 2015), with the
distillation loss of `compression.methods.distilled` (`kd_training_loss`).

Any other network (a user's ``[base] model``): every standard k×k conv with more than one input
channel, wherever it sits (`models.separable_convs`), is swapped for the same pair in place
(`models.separable`); the variant's spec is the base's plus a ``separable`` edit listing them. The
layers it keeps start from the base's weights, the new pairs from their init, and the whole network
trains by the same distillation. A network with no such conv is `Unsupported` (left out, with the
reason).

The strength knob is the training length (``epochs``): the conversion is the compression, and
what it costs in accuracy is mostly how long the new weights learn. The teacher's logits are
memoised per batch across the search's tries (`distilled.teacher_memo`), so a longer retry pays
for the student and the new epochs only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from compression import export, profile, report
from compression.core.errors import ConfigError, Unsupported
from compression.methods.distilled import Teachers, kd_training_loss, teacher_memo
from compression.models import StagedCNN, build_model, separable_convs
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.train import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DepthwiseConfig:
    """Distillation settings for training the converted network."""

    # the search backs off from the configured epochs toward longer training
    strength: ClassVar[Knob] = Knob("epochs", (8, 12, 16, 24, 32))

    epochs: int = 8
    lr: float = 3e-3
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target loss; 1 - alpha on the hard labels

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got {self.epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {self.alpha!r}")


def conv_records(before: StagedCNN, after: StagedCNN) -> list[dict[str, Any]]:
    """Per block: its conv weights (and biases, if any) before and after the conversion.

    Blocks pair up one to one because both models come from the same spec apart from ``conv``.
    BN parameters are listed apart: the 1/O + 1/k² law is about the convolutions.
    """
    return _records([(name, old, new) for (name, old), (_, new)
                     in zip(_blocks(before), _blocks(after), strict=True)])


def _records(pairs: list[tuple[str, nn.Module, nn.Module]]) -> list[dict[str, Any]]:
    """One record per (name, module before, module after): conv and BN parameters of each."""
    records = []
    for i, (name, old, new) in enumerate(pairs):
        old_convs = [m for m in old.modules() if isinstance(m, nn.Conv2d)]
        new_convs = [m for m in new.modules() if isinstance(m, nn.Conv2d)]
        c = old_convs[0]
        rec: dict[str, Any] = {
            "block": name, "index": i, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "kernel": list(c.kernel_size),
            "converted": len(new_convs) == 2,
            "params_before": sum(p.numel() for m in old_convs for p in m.parameters()),
            "params_after": sum(p.numel() for m in new_convs for p in m.parameters()),
            "bn_params_before": _bn_params(old), "bn_params_after": _bn_params(new),
        }
        rec["ratio"] = round(rec["params_after"] / rec["params_before"], 6)
        records.append(rec)
    return records


def _blocks(model: StagedCNN) -> list[tuple[str, nn.Module]]:
    """The conv-BN-ReLU blocks in order (the Sequentials holding a Conv2d, pools skipped)."""
    return [(f"stages.{s}.{j}", block) for s, stage in enumerate(model.stages)
            for j, block in enumerate(stage)
            if any(isinstance(m, nn.Conv2d) for m in block.modules())]


def _bn_params(block: nn.Module) -> int:
    return sum(p.numel() for m in block.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())


@register("depthwise", DepthwiseConfig)
def apply(ctx: BuildContext, base: Built, config: DepthwiseConfig) -> MethodOutput:
    if base.model is None or base.spec is None:
        raise ConfigError(f"depthwise needs a torch base model with a spec; {base.name!r} "
                          "has none")
    if base.spec["kind"] == "cnn":
        spec = {**base.spec, "conv": "depthwise",
                "stages": [{k: v for k, v in st.items() if k != "conv"}
                           for st in base.spec["stages"]]}
        model = build_model(spec)
        records = conv_records(base.model, model)  # type: ignore[arg-type]
    else:
        convs = separable_convs(base.model)
        if not convs:
            raise Unsupported(f"{base.name!r} has no standard k×k conv with more than one "
                              "input channel to separate")
        spec = {**base.spec, "edits": [*base.spec.get("edits", []), {"separable": convs}]}
        model = build_model(spec)
        # the kept layers start from the base's weights (the swapped convs' names now hold pairs)
        model.load_state_dict(base.model.state_dict(), strict=False)
        records = _records([(name, base.model.get_submodule(name), model.get_submodule(name))
                            for name in convs])
    teacher = Teachers([base.model], memo=teacher_memo(ctx, base.name))
    loss_fn = kd_training_loss(teacher, temperature=config.temperature, alpha=config.alpha)
    result = train(model, ctx.splits, ctx.train.scaled(epochs=config.epochs, lr=config.lr),
                   seed=ctx.seed, loss_fn=loss_fn, desc="depthwise distill", progress=ctx.progress)
    log.info("depthwise: trained %d epochs, best val accuracy %.4f", result.epochs_run,
             result.best_val_accuracy)
    details = {"layers": records, "epochs_run": result.epochs_run,
               "best_val_accuracy": round(result.best_val_accuracy, 6),
               "teacher": base.name, "cost": _cost(ctx, base, model.eval())}
    return MethodOutput(model=model, spec=spec, details=details,
                        report_md=_report(records, base.name, details["cost"]))


def _cost(ctx: BuildContext, base: Built, model: nn.Module) -> dict[str, float]:
    """MACs against measured time, both relative to the base: depthwise kernels move more bytes
    per MAC than dense 3×3 convs, so the latency gain is expected to trail the MAC cut."""
    shape = ctx.input_shape
    macs_base, macs = profile.count_macs(base.model, shape), profile.count_macs(model, shape)
    p50_base = profile.onnx_latency(base.graph, shape, batch_sizes=(1,))["1"]["p50"]
    p50 = profile.onnx_latency(export.to_onnx(model, shape), shape, batch_sizes=(1,))["1"]["p50"]
    return {"macs_base": macs_base, "macs": macs, "mac_reduction": round(macs_base / macs, 3),
            "p50_b1_ms_base": p50_base, "p50_b1_ms": p50,
            "latency_speedup_b1": round(p50_base / p50, 3),
            "us_per_mmac_base": round(1e3 * p50_base / (macs_base / 1e6), 3),
            "us_per_mmac": round(1e3 * p50 / (macs / 1e6), 3)}


def _report(records: list[dict[str, Any]], teacher: str, cost: dict[str, float]) -> str:
    rows = [[r["block"], f"{r['in_channels']}→{r['out_channels']}",
             "×".join(map(str, r["kernel"])), "yes" if r["converted"] else "no (1 input channel)",
             r["params_before"], r["params_after"], f"{r['ratio']:.4f}"] for r in records]
    return (f"Depthwise separable blocks trained by distillation from `{teacher}`. MACs "
            f"{cost['mac_reduction']:.2f}x fewer, but batch-1 ORT latency only "
            f"{cost['latency_speedup_b1']:.2f}x lower ({cost['us_per_mmac']:.1f} µs per M MACs "
            f"against {cost['us_per_mmac_base']:.1f} for the dense base: depthwise kernels do "
            "little arithmetic per byte moved). Conv weights "
            "per block (BN listed in the manifest apart; ratio = 1/O + 1/k² for converted "
            "blocks):\n\n"
            + report.markdown_table(["block", "channels", "kernel", "converted", "params before",
                                     "params after", "ratio"], rows))
