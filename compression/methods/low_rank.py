"""``low-rank``: truncated-SVD factorisation of convolutions and linear layers, then a fine-tune.

A Linear weight W [M, N] becomes two Linears through a K-unit linear bottleneck (no activation
between), W ≈ B·A with A = S½·Vᵀ [K, N] and B = U·S½ [M, K]. A k×k convolution [O, I, k, k] is
the same factorisation of its [O, I·k·k] matrix: a k×k conv to K channels (A, same stride and
padding) followed by a 1×1 conv back to O channels (B, with the original bias) — Denton et al.
2014's channel split. K per layer comes from a target parameter ratio or a retained-energy
threshold (share of Σσ²), and a layer is factorised only where K·(M+N) < M·N.

Batch-norm stays after the pair, so ONNX export folds it into the 1×1 conv as it did before.
Layers are found and replaced by module name, so any network whose convs and linear layers are
modules works (a user's ResNet included); grouped convs stay as they are.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression import export, profile, report
from compression.core.errors import ConfigError
from compression.core.ort import session
from compression.core.stats import format_rate
from compression.models import set_module
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.train import train

log = logging.getLogger(__name__)

CRITERIA = ("ratio", "energy")
# The strength knob follows the criterion: a larger parameter ratio or energy share is milder.
RATIO_KNOB = Knob("param_ratio", (0.1, 0.15, 0.25, 0.35, 0.5, 0.7), continuous=True)
ENERGY_KNOB = Knob("energy", (0.8, 0.9, 0.95, 0.98, 0.99), continuous=True)


@dataclass(frozen=True)
class LowRankConfig:
    """How to choose each layer's rank K, and how long to fine-tune afterwards."""

    criterion: str = "ratio"  # "ratio": K from param_ratio; "energy": K from energy
    param_ratio: float = 0.25  # factor params / dense params per layer: K = ⌊r·M·N/(M+N)⌋
    energy: float = 0.9  # smallest K whose singular values keep this share of Σσ²
    min_weights: int = 4096  # smaller layers stay dense: an extra op would cost more than it saves
    rank_multiple: int = 4  # round K up to a multiple (ORT's conv kernels prefer aligned widths)
    fine_tune_epochs: int = 3
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if not 0.0 < self.param_ratio < 1.0:
            raise ValueError(f"param_ratio must lie in (0, 1), got {self.param_ratio!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {self.energy!r}")
        if self.min_weights < 0:
            raise ValueError(f"min_weights must be ≥ 0, got {self.min_weights!r}")
        if self.rank_multiple < 1:
            raise ValueError(f"rank_multiple must be ≥ 1, got {self.rank_multiple!r}")
        if self.fine_tune_epochs < 0:
            raise ValueError(f"fine_tune_epochs must be ≥ 0, got {self.fine_tune_epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    @property
    def strength(self) -> Knob:
        return RATIO_KNOB if self.criterion == "ratio" else ENERGY_KNOB


# --- the factorisation ------------------------------------------------------------------------

def weight_matrix(layer: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """The layer's weight as a matrix [M, N]: a conv [O, I, kh, kw] → [O, I·kh·kw]."""
    w = layer.weight.detach()
    return w.reshape(w.shape[0], -1)


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``w`` [M, N]: B [M, K], A [K, N] with B·A the truncated SVD.

    The singular values are split evenly (√σ to each side) so both factors start on the same
    scale, which keeps the fine-tune's Adam steps balanced between them.
    """
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = (u[:, :rank] * root).to(w.dtype)  # [M, K]
    a = (root[:, None] * vh[:rank]).to(w.dtype)  # [K, N]
    return b, a


def choose_rank(w: torch.Tensor, config: LowRankConfig) -> int:
    """K for a weight matrix [M, N] under ``config``'s criterion (before the K(M+N) < MN test)."""
    m, n = w.shape
    if config.criterion == "ratio":
        k = math.floor(config.param_ratio * m * n / (m + n))
    else:
        s2 = torch.linalg.svdvals(w.double()) ** 2
        kept = torch.cumsum(s2, 0) / s2.sum()
        k = int(torch.searchsorted(kept, torch.tensor(config.energy, dtype=kept.dtype)).item()) + 1
    k = max(1, k)
    return min(math.ceil(k / config.rank_multiple) * config.rank_multiple, min(m, n))


def factorize(layer: nn.Conv2d | nn.Linear, rank: int) -> nn.Sequential:
    """Two layers whose composition is ``layer``'s weight truncated to ``rank``.

    Conv: k×k conv I→K (layer's stride/padding/dilation, no bias) then 1×1 conv K→O (bias).
    Linear: Linear N→K (no bias) then Linear K→M (bias). No activation between: it stays linear.
    """
    b, a = svd_factors(weight_matrix(layer), rank)
    bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"cannot factorise a grouped conv (groups={layer.groups})")
        first: nn.Module = nn.Conv2d(layer.in_channels, rank, layer.kernel_size,
                                     stride=layer.stride, padding=layer.padding,
                                     dilation=layer.dilation, bias=False,
                                     padding_mode=layer.padding_mode)
        second: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, bias=bias)
        first.weight.data.copy_(a.reshape(rank, *layer.weight.shape[1:]))
        second.weight.data.copy_(b.reshape(layer.out_channels, rank, 1, 1))
    else:
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=bias)
        first.weight.data.copy_(a)
        second.weight.data.copy_(b)
    if bias:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(first, second)


def layer_params(m: int, n: int, rank: int | None, bias: bool) -> int:
    """Weights of a dense [M, N] layer (rank None) or of its rank-K pair: K·(M+N), plus M bias."""
    return (m * n if rank is None else rank * (m + n)) + (m if bias else 0)


def factorize_model(model: nn.Module,
                    config: LowRankConfig) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` with every eligible Conv2d/Linear factorised; one record per layer."""
    out = copy.deepcopy(model)
    records: list[dict[str, Any]] = []
    targets = [(name, mod) for name, mod in out.named_modules()
               if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)]
    for name, layer in targets:
        w = weight_matrix(layer)
        m, n = w.shape
        bias = layer.bias is not None
        rank = choose_rank(w, config)
        before = layer_params(m, n, None, bias)
        rec: dict[str, Any] = {"layer": name, "kind": type(layer).__name__, "shape": [m, n],
                               "full_rank": min(m, n), "params_before": before}
        if w.numel() < config.min_weights:
            rec.update(rank=None, params_after=before, kept="below min_weights")
        elif rank * (m + n) >= m * n:
            rec.update(rank=None, params_after=before, kept="K(M+N) ≥ MN: no saving")
        else:
            s2 = torch.linalg.svdvals(w.double()) ** 2
            rec.update(rank=rank, params_after=layer_params(m, n, rank, bias),
                       energy_kept=round(float(s2[:rank].sum() / s2.sum()), 4))
            set_module(out, name, factorize(layer, rank))
        records.append(rec)
    return out, records


# --- the method -------------------------------------------------------------------------------

@register("low-rank", LowRankConfig)
def apply(ctx: BuildContext, base: Built, config: LowRankConfig) -> MethodOutput:
    if base.model is None:
        raise ConfigError(f"low-rank needs a torch base model; {base.name!r} is graph-only")
    model, records = factorize_model(base.model, config)
    factored = [r for r in records if r["rank"] is not None]
    if not factored:
        log.warning("low-rank: no layer of %r was worth factorising under %s", base.name, config)
    acc_before = _onnx_accuracy(ctx, model)
    log.info("low-rank: %d/%d layers factorised, test accuracy before fine-tune %.4f",
             len(factored), len(records), acc_before)
    if config.fine_tune_epochs > 0:
        train(model, ctx.splits, ctx.train.scaled(epochs=config.fine_tune_epochs, lr=config.lr),
              seed=ctx.seed, desc="low-rank fine-tune", progress=ctx.progress)
    details = {
        "layers": records,
        "test_accuracy_before_fine_tune": round(acc_before, 6),
        "params_before": profile.count_params(base.model),
        "params_after": profile.count_params(model),
        "macs_before": profile.count_macs(base.model, ctx.input_shape),
        "macs_after": profile.count_macs(model, ctx.input_shape),
    }
    return MethodOutput(model=model.eval(), details=details,
                        report_md=_report(records, details, len(ctx.splits.y_test)))


def _onnx_accuracy(ctx: BuildContext, model: nn.Module) -> float:
    logits = export.run(session(export.to_onnx(model, ctx.input_shape)), ctx.splits.x_test)
    return float((logits.argmax(1) == ctx.splits.y_test).mean())


def _report(records: list[dict[str, Any]], details: dict[str, Any], n_test: int) -> str:
    rows = [[r["layer"], r["kind"], f"{r['shape'][0]}×{r['shape'][1]}", r["full_rank"],
             r["rank"] if r["rank"] is not None else f"dense ({r['kept']})",
             r["params_before"], r["params_after"],
             f"{r['energy_kept']:.3f}" if "energy_kept" in r else "–"] for r in records]
    return (
        f"Truncated SVD per layer, then fine-tuned. Test accuracy [95% Wilson] right after "
        f"factorising: {format_rate(details['test_accuracy_before_fine_tune'], n_test)}. MACs "
        f"{details['macs_before'] / 1e6:.2f} M → {details['macs_after'] / 1e6:.2f} M, params "
        f"{details['params_before']} → {details['params_after']} (BN included).\n\n"
        + report.markdown_table(["layer", "kind", "M×N", "full rank", "K", "params before",
                                 "params after", "energy kept"], rows))
