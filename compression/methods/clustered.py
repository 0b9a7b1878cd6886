"""``clustered``: weight sharing by per-layer k-means, then Huffman coding (Deep Compression).

Han, Mao & Dally 2016: prune → share → Huffman. On top of ``pruned-weights`` this module does the
last two stages:

1. Fold BatchNorm into the convs first. The exporter would fold it anyway, and BN rescales every
   output channel differently, which would turn one shared per-layer value into many. Folding in
   torch means the weights we cluster are exactly the weights ONNX serves. Which BN follows which
   conv comes from the torch.fx graph (`models.fold_batchnorm`), so a user's residual blocks fold
   too; a network with BatchNorm that fx cannot trace is left out of the family, with the reason.
2. Per layer, k-means over the non-zero weights (2^bits centroids, linear init over [min, max] as
   the paper recommends); zeros stay zero, so the pruning mask survives.
3. Fine-tune the centroids: each weight is ``codebook[index]``, so autograd sums the gradients of
   all weights of a cluster into its centroid (the paper's shared-weight update). Biases train too.
4. Store with the ``kmeans-huffman`` codec: codebooks + Huffman-coded indices + Huffman-coded
   position gaps; loading decodes it back to dense float32.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from compression import export, profile
from compression.core import encoding
from compression.core.errors import ConfigError
from compression.core.stats import format_rate
from compression.models import fold_batchnorm
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.report import markdown_table
from compression.train import accuracy, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusteredConfig:
    # the search backs off from the configured bits toward larger codebooks
    strength: ClassVar[Knob] = Knob("bits", (2, 3, 4, 5, 6, 8))

    bits: int = 4  # 2^bits shared values per layer
    epochs: int = 2  # centroid fine-tune
    lr: float = 3e-4
    kmeans_iterations: int = 30
    max_gap: int = 32  # position-gap alphabet of the codec (longer gaps use filler symbols)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be ≥ 0, got {self.epochs!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.kmeans_iterations < 1:
            raise ValueError(f"kmeans_iterations must be ≥ 1, got {self.kmeans_iterations!r}")
        if not 1 <= self.max_gap <= 255:
            raise ValueError(f"max_gap must be in [1, 255], got {self.max_gap!r}")


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Lloyd's k-means on scalars with linear initialisation; (centroids [k'], index per value).

    In 1-D the nearest centroid is found by binary search over the midpoints of the sorted
    centroids. Empty clusters keep their centroid; duplicates are dropped (k' ≤ k).
    """
    values = values.detach().reshape(-1).double()
    k = min(k, int(torch.unique(values).numel()))
    centroids = torch.linspace(float(values.min()), float(values.max()), k, dtype=torch.float64)
    idx = torch.zeros(len(values), dtype=torch.long)
    for _ in range(iterations):
        mids = (centroids[1:] + centroids[:-1]) / 2
        idx = torch.bucketize(values, mids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, values)
        counts = torch.bincount(idx, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new, _ = torch.sort(new)
        if torch.equal(new, centroids):
            break
        centroids = new
    centroids = torch.unique(centroids)  # sorted; merges any centroids that met
    mids = (centroids[1:] + centroids[:-1]) / 2
    return centroids.float(), torch.bucketize(values, mids)


class SharedWeights(nn.Module):
    """Parametrization ``weight = where(mask, codebook[index], 0)``; the trainable tensor is the
    codebook [k], so a centroid's gradient is the sum of its cluster's weight gradients."""

    def __init__(self, index: torch.Tensor, mask: torch.Tensor, codebook: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)
        self.register_buffer("mask", mask)
        self._initial = codebook

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, codebook[self.index], torch.zeros((), dtype=codebook.dtype))

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return self._initial  # the stored parameter is the codebook, not the weight


def share_weights(model: nn.Module, bits: int, iterations: int = 30) -> list[nn.Parameter]:
    """Cluster every Conv2d / Linear weight of ``model`` in place; returns the codebooks."""
    codebooks = []
    for m in model.modules():
        if not isinstance(m, nn.Conv2d | nn.Linear):
            continue
        w = m.weight.detach()
        mask = w != 0
        if not mask.any():
            continue
        centroids, idx_nz = kmeans_1d(w[mask], 2 ** bits, iterations)
        index = torch.zeros(w.shape, dtype=torch.long)
        index[mask] = idx_nz
        parametrize.register_parametrization(m, "weight", SharedWeights(index, mask, centroids))
        codebooks.append(m.parametrizations.weight.original)
    return codebooks


def bake(model: nn.Module) -> None:
    """Replace each parametrization by the plain weight it computes (exact shared values)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


def distinct_values(model: nn.Module) -> list[int]:
    """Distinct non-zero values per Conv2d / Linear weight."""
    return [int(torch.unique(m.weight[m.weight != 0]).numel()) for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear)]


def weight_tensors(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The tensors the builder hands to the codec: the graph's conv and linear weights."""
    return export.layer_weights(export.to_onnx(model, input_shape))


@register("clustered", ClusteredConfig)
def apply(ctx: BuildContext, base: Built, config: ClusteredConfig) -> MethodOutput:
    if base.model is None:
        raise ConfigError(f"clustered needs a torch base model; {base.name!r} is graph-only")
    shape = ctx.input_shape
    model = fold_batchnorm(copy.deepcopy(base.model))
    zeros_before = sum(int((m.weight == 0).sum()) for m in model.modules()
                       if isinstance(m, nn.Conv2d | nn.Linear))
    codebooks = share_weights(model, config.bits, config.kmeans_iterations)
    acc_shared = accuracy(model, ctx.splits.x_test, ctx.splits.y_test)
    if config.epochs:
        biases = [m.bias for m in model.modules()
                  if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None]
        train(model, ctx.splits, ctx.train.scaled(epochs=config.epochs, lr=config.lr),
              seed=ctx.seed, params=[*codebooks, *biases], desc="centroids",
              progress=ctx.progress)
    bake(model)
    model.eval()
    counts = distinct_values(model)
    zeros_after = sum(int((m.weight == 0).sum()) for m in model.modules()
                      if isinstance(m, nn.Conv2d | nn.Linear))
    if max(counts) > 2 ** config.bits or zeros_after < zeros_before:
        raise RuntimeError(f"weight sharing broke: {counts} distinct values per layer, zeros "
                           f"{zeros_before} → {zeros_after}")

    # Deep Compression's stage table, on the very tensors the builder will encode
    tensors = weight_tensors(model, shape)
    base_tensors = export.layer_weights(base.graph)
    n_weights = sum(v.size for v in tensors.values())
    opts = {"max_gap": config.max_gap}
    stages = [
        ("dense fp32", 4 * n_weights),
        (f"pruned (`{base.name}`, bitmap + fp32 values)", len(encoding.encode("sparse",
                                                                               base_tensors))),
        (f"+ shared to {config.bits}-bit codebooks (fixed-width indices and gaps)",
         len(encoding.encode("kmeans-huffman", tensors, huffman=False, **opts))),
        ("+ Huffman-coded indices and gaps (served `weights.aiw`)",
         len(encoding.encode("kmeans-huffman", tensors, huffman=True, **opts))),
    ]
    nnz = sum(int((v != 0).sum()) for v in tensors.values())
    rows = [[label, f"{size / 1e3:.1f} kB", f"{8 * size / max(nnz, 1):.2f}",
             f"{stages[0][1] / size:.1f}x"] for label, size in stages]
    n_test = len(ctx.splits.y_test)
    acc_after = accuracy(model, ctx.splits.x_test, ctx.splits.y_test)
    report = (
        f"BN folded into the convs, then per-layer k-means ({2 ** config.bits} centroids over the "
        f"non-zero weights of `{base.name}`), centroids + biases fine-tuned {config.epochs} "
        f"epoch(s). Test accuracy [95% Wilson] right after sharing "
        f"{format_rate(acc_shared, n_test)}, after fine-tuning "
        f"{format_rate(acc_after, n_test)}.\n\n"
        f"Weight storage by stage ({n_weights:,} conv + linear weights, {nnz:,} non-zero; "
        "the graph skeleton with biases comes on top, see the size column above):\n\n"
        + markdown_table(["stage", "weights", "bits / non-zero", "vs dense fp32"], rows))
    return MethodOutput(
        model=model, spec=None, weights_codec="kmeans-huffman", codec_options=opts,
        params_count=profile.count_nonzero_params(model),
        details={"bits": config.bits, "distinct_values": counts,
                 "weight_bytes_by_stage": {label: size for label, size in stages}},
        report_md=report)
