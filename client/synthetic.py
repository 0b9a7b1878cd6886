"""A synthetic model family, built in seconds from tiny untrained torch modules.

For load whose cost must be known rather than accurate: the serving tests and
``bench/soak.py``'s default family. The weights are
untrained (the server cares about graphs, shapes and the manifest); the variants differ in cost
by orders of magnitude so routing assertions and saturation figures survive a busy machine:

- ``fast``  (accuracy 0.90): one 2-channel conv, ~0.03 ms
- ``mid``   (0.95): three 48-channel convs, ~1 ms
- ``slow``  (0.99): three 96-channel convs, ~4 ms
- ``early-exit`` (exits 0.80 / 0.96 / 0.985): stage 0 is nearly free and its exit is confident
  exactly when the image is bright (mean pixel 1 → logit 100 for class 0; black → uniform);
  stages 1 and 2 cost ~1 ms each and are never confident, so their depth follows the budget.

Needs torch: import it only where a family is built (the client library itself does not load torch).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compression.core.exits import stage_io
from compression.core.family import SCHEMA_VERSION, Exit, Variant, write_artifact, write_manifest
from compression.export import to_onnx

SHAPE = (1, 28, 28)
CLASSES = 10


def table(ms: float) -> dict[str, dict[str, float]]:
    """A placeholder build-host latency table; the server re-measures on start."""
    return {str(b): {"p50": ms * b, "p95": ms * b * 1.2} for b in (1, 8, 32)}


def cnn(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    c = SHAPE[0]
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, CLASSES))


class _BrightStage(nn.Module):
    """Stage 0: cheap features; its exit is sure of class 0 for bright images only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(SHAPE[0], 8, 3, padding=1)
        self.head = nn.Linear(1, CLASSES)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[0, 0] = 100.0
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.conv(x))  # [N, 8, 28, 28]
        logits = self.head(x.mean(dim=(1, 2, 3)).unsqueeze(1))  # [N, 10]
        return features, logits


class _HeavyStage(nn.Module):
    """Stages 1, 2: two 48-channel convs; a near-zero head (never confident)."""

    def __init__(self, c_in: int, last: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, 48, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(48, 48, 3, padding=1), nn.ReLU())
        linear = nn.Linear(48, CLASSES)  # created after the body: the same seeded weights as ever
        with torch.no_grad():
            linear.weight.mul_(1e-3)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear)
        self.last = last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        f = self.body(x)
        return self.head(f) if self.last else (f, self.head(f))


def plain(root: Path, name: str, accuracy: float, model: nn.Module, ms: float) -> Variant:
    graph = to_onnx(model, SHAPE)
    art = write_artifact(root, f"{name}/model.onnx", graph.SerializeToString())
    return Variant(name=name, method="test", params={}, artifacts=[art], accuracy=accuracy,
                   params_count=sum(p.numel() for p in model.parameters()), macs=0,
                   size_bytes=art.bytes, latency_ms=table(ms))


def _early_exit(root: Path) -> Variant:
    stages = [(_BrightStage(), SHAPE), (_HeavyStage(8, last=False), (8, 28, 28)),
              (_HeavyStage(48, last=True), (48, 28, 28))]
    arts = []
    for i, (m, shape) in enumerate(stages):
        inp, outs = stage_io(i, len(stages))
        graph = to_onnx(m, shape, output_names=outs, input_name=inp)
        arts.append(write_artifact(root, f"early-exit/stage_{i}.onnx", graph.SerializeToString(),
                                   role="stage", stage=i))
    exits = [Exit(0, 0.80, table(0.05), 0.9, 0.3), Exit(1, 0.96, table(1.0), 0.9, 0.3),
             Exit(2, 0.985, table(2.0), 0.0, 0.4)]
    return Variant(name="early-exit", method="early_exit", params={}, artifacts=arts,
                   accuracy=0.985, params_count=0, macs=0, size_bytes=sum(a.bytes for a in arts),
                   latency_ms=table(2.0), exits=exits)


def write_family(root: Path, variants: list[Variant], name: str = "servetest") -> Path:
    manifest = {
        "schema_version": SCHEMA_VERSION, "family": name,
        "dataset": {"spec": "synthetic"},
        "input": {"name": "input", "datatype": "FP32", "shape": list(SHAPE), "range": [0.0, 1.0]},
        "output": {"name": "logits", "datatype": "FP32",
                   "classes": [str(i) for i in range(CLASSES)]},
        "variants": variants,
    }
    write_manifest(root, manifest)
    return root


def serving_family_at(root: Path) -> Path:
    """The four-variant family of the module docstring, written to ``root``."""
    torch.manual_seed(0)
    variants = [plain(root, "fast", 0.90, cnn(2, 1), 0.03),
                plain(root, "mid", 0.95, cnn(48, 3), 1.0),
                plain(root, "slow", 0.99, cnn(96, 3), 5.0),
                _early_exit(root)]
    return write_family(root, variants)
