"""Declarative architectures: a JSON-serialisable spec in, an `nn.Module` out.

A family can be rebuilt from ``spec + safetensors`` without unpickling any code. Two kinds:

``cnn`` — a staged convolutional network. Each stage optionally halves the resolution (max-pool)
and runs ``depth`` conv-BN-ReLU blocks; a global-average-pool head classifies. Stages are the unit
early exit, depthwise conversion and students build on::

    {"kind": "cnn", "input": [1, 28, 28], "num_classes": 10,
     "stages": [{"channels": 32, "depth": 2}, {"channels": 64, "depth": 2, "pool": true}, ...],
     "conv": "standard" | "depthwise", "width": 1.0,
     "normalize": {"mean": [0.13], "std": [0.31]}}

``channels`` may also be a list, one width per block (what structured pruning leaves behind).

``mlp`` — LeNet-300-100 shaped: ``{"kind": "mlp", "input": [1, 28, 28], "hidden": [300, 100], ...}``.

Normalisation is the model's first layer, so every exported graph takes plain pixels in [0, 1].
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from compression.core.errors import ConfigError

Spec = dict[str, Any]

DEFAULT_CNN: Spec = {
    "kind": "cnn",
    "input": [1, 28, 28],
    "num_classes": 10,
    "stages": [
        {"channels": 32, "depth": 2, "pool": False},
        {"channels": 64, "depth": 2, "pool": True},
        {"channels": 128, "depth": 2, "pool": True},
    ],
    "conv": "standard",
    "width": 1.0,
}

DEFAULT_MLP: Spec = {"kind": "mlp", "input": [1, 28, 28], "num_classes": 10, "hidden": [300, 100]}


class Normalize(nn.Module):
    """(x - mean) / std per channel; constants live in the graph so clients send raw pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn_relu(c_in: int, c_out: int, kind: str = "standard", k: int = 3) -> nn.Sequential:
    """One block. ``depthwise`` = k×k depthwise conv (groups=c_in) + 1×1 pointwise (MobileNet)."""
    if kind == "depthwise" and c_in > 1:
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, k, padding=k // 2, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Head(nn.Module):
    """Global average pool → linear classifier: [N, C, H, W] → [N, classes]."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(x), 1))


class StagedCNN(nn.Module):
    """normalize → stages[0] → … → stages[-1] → head. Shapes for the default spec:
    [N,1,28,28] → [N,32,28,28] → [N,64,14,14] → [N,128,7,7] → [N,10]."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        c, _, _ = spec["input"]
        norm = spec.get("normalize") or {"mean": [0.0] * c, "std": [1.0] * c}
        self.normalize = Normalize(norm["mean"], norm["std"])
        width = float(spec.get("width", 1.0))
        kind = spec.get("conv", "standard")
        self.stages = nn.ModuleList()
        c_in = c
        for stage in spec["stages"]:
            widths = _stage_widths(stage, width)
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if stage.get("pool", False) else []
            for c_out in widths:
                layers.append(conv_bn_relu(c_in, c_out, stage.get("conv", kind)))
                c_in = c_out
            self.stages.append(nn.Sequential(*layers))
        self.head = Head(c_in, int(spec["num_classes"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


class MLP(nn.Module):
    """normalize → flatten → (Linear → ReLU)* → Linear: [N,C,H,W] → [N, classes]."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        c, h, w = spec["input"]
        norm = spec.get("normalize") or {"mean": [0.0] * c, "std": [1.0] * c}
        self.normalize = Normalize(norm["mean"], norm["std"])
        layers: list[nn.Module] = [nn.Flatten()]
        d_in = c * h * w
        for d in spec["hidden"]:
            layers += [nn.Linear(d_in, int(d)), nn.ReLU(inplace=True)]
            d_in = int(d)
        layers.append(nn.Linear(d_in, int(spec["num_classes"])))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


def _stage_widths(stage: Spec, width: float) -> list[int]:
    channels = stage["channels"]
    if isinstance(channels, list):
        return [int(ch) for ch in channels]
    return [max(1, round(int(channels) * width))] * int(stage.get("depth", 1))


_KINDS: dict[str, type[nn.Module]] = {"cnn": StagedCNN, "mlp": MLP}


def validate(spec: Spec) -> Spec:
    """Check a spec and return a normalised deep copy; `ConfigError` names the bad field."""
    if not isinstance(spec, dict):
        raise ConfigError(f"architecture spec must be a table, got {spec!r}")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"architecture kind {kind!r} is unknown; valid kinds: {sorted(_KINDS)}")
    out = copy.deepcopy(spec)
    inp = out.get("input")
    if not (isinstance(inp, list) and len(inp) == 3 and all(isinstance(v, int) and v > 0 for v in inp)):
        raise ConfigError(f"architecture input must be [C, H, W] positive integers, got {inp!r}")
    if not isinstance(out.get("num_classes"), int) or out["num_classes"] < 2:
        raise ConfigError(f"architecture num_classes must be an integer ≥ 2, got {out.get('num_classes')!r}")
    if kind == "cnn":
        allowed = {"kind", "input", "num_classes", "stages", "conv", "width", "normalize"}
        stages = out.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"cnn stages must be a non-empty list, got {stages!r}")
        for i, st in enumerate(stages):
            extra = set(st) - {"channels", "depth", "pool", "conv"}
            if extra:
                raise ConfigError(f"cnn stages[{i}] has unknown keys {sorted(extra)}; "
                                  "valid: channels, depth, pool, conv")
            if "channels" not in st:
                raise ConfigError(f"cnn stages[{i}] needs 'channels'")
        if out.get("conv", "standard") not in ("standard", "depthwise"):
            raise ConfigError(f"cnn conv must be 'standard' or 'depthwise', got {out['conv']!r}")
    else:
        allowed = {"kind", "input", "num_classes", "hidden", "normalize"}
        if not isinstance(out.get("hidden"), list):
            raise ConfigError(f"mlp hidden must be a list of sizes, got {out.get('hidden')!r}")
    extra = set(out) - allowed
    if extra:
        raise ConfigError(f"{kind} spec has unknown keys {sorted(extra)}; valid: {sorted(allowed)}")
    json.dumps(out)  # must stay JSON-serialisable: it goes into the manifest
    return out


def build_model(spec: Spec) -> nn.Module:
    """Instantiate a spec. Weights are PyTorch's default init under the caller's seed."""
    spec = validate(spec)
    return _KINDS[spec["kind"]](spec)


def example_input(spec: Spec, batch: int = 1) -> torch.Tensor:
    """A deterministic input batch of the spec's shape, for tracing and checks."""
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *spec["input"]), generator=g)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d that directly follows a Conv2d (in the same
    Sequential) folded into that conv's weight and bias, the BN replaced by ``nn.Identity``.

    The ONNX exporter folds BN anyway; methods that must control the exact exported weight values
    (weight sharing, whose per-layer codebook a per-channel BN rescale would break) fold first.
    Uses the running statistics, i.e. eval-mode behaviour.
    """
    out = copy.deepcopy(model).eval()
    for seq in out.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i in range(1, len(children)):
            (_, conv), (bn_name, bn) = children[i - 1], children[i]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
            setattr(seq, bn_name, nn.Identity())
    return out
