"""Declarative architectures: a JSON-serialisable spec in, an `nn.Module` out.

A family can be rebuilt from ``spec + safetensors`` without unpickling any code. Two built-in
kinds, and the user's own:

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

``user`` — the user's own classifier (``[base] model`` in a build config), rebuilt by importing and
calling its factory, never by unpickling::

    {"kind": "user", "factory": "package.module:function", "args": {...},
     "input": [3, 32, 32], "num_classes": 10}

It takes pixels in [0, 1] too and does its own preprocessing, if any. Any spec may carry
``edits``, applied in order after the network is built, which is how compressed variants of an
arbitrary network stay expressible as a spec: ``{"resize": {"tensors": {name: shape}, "attrs":
{module: {attr: value}}}}`` (what channel pruning leaves: tensors cut to a leading slice, layer
attributes such as ``out_channels`` set, the resized layers re-initialised) and ``{"separable":
[conv, …]}`` (those k×k convs replaced by depthwise separable pairs, `separable`).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from compression.core.errors import ConfigError, Unsupported
from compression.tracing import conv_bn_pairs

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


# --- the user's own model ---------------------------------------------------------------------

def load_factory(ref: Any, where: str = "[base] model") -> Callable[..., Any]:
    """The callable ``package.module:attr`` names. The module is imported with the current
    directory on the import path (as ``python -m`` does), so a file beside the config works."""
    module_name, sep, attr = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    if not (sep and module_name and attr):
        raise ConfigError(f"{where} must be 'package.module:factory', got {ref!r}")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail to import in any way
        raise ConfigError(f"{where} {ref!r}: cannot import {module_name!r} "
                          f"({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where} {ref!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where} {ref!r}: {attr!r} is not callable")
    return obj


def _user_model(spec: Spec) -> nn.Module:
    ref, args = spec["factory"], spec.get("args", {})
    factory = load_factory(ref)
    try:
        model = factory(**args)
    except Exception as exc:  # a wrong argument, or the user's own code failing
        raise ConfigError(f"[base] model {ref!r} with model_args {args!r} failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"[base] model {ref!r} returned {type(model).__name__}, "
                          "expected a torch.nn.Module")
    return model


# --- edits: compressed variants of any network, as data ---------------------------------------

# Layer attributes channel pruning changes (torch-pruning sets them beside the tensors).
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "num_features", "in_features",
               "out_features", "num_channels", "num_groups", "normalized_shape")


def resized_spec(spec: Spec, model: nn.Module) -> Spec:
    """``spec`` plus the ``resize`` edit that turns ``build_model(spec)`` into ``model``'s shapes
    (``model`` is that network after channel pruning; its weights are not part of the spec)."""
    with torch.random.fork_rng(devices=[]):  # the reference's init must not move the seed
        reference = build_model(spec)
    ref_state, state = reference.state_dict(), model.state_dict()
    if ref_state.keys() != state.keys():
        raise ValueError(f"the model's tensors {sorted(set(state) ^ set(ref_state))[:5]} differ "
                         "from the spec's: not a resized copy of it")
    tensors = {k: list(v.shape) for k, v in state.items() if v.shape != ref_state[k].shape}
    ref_modules = dict(reference.named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        changed = {a: list(v) if isinstance(v, tuple) else v for a in SHAPE_ATTRS
                   if hasattr(m, a) and (v := getattr(m, a)) != getattr(ref_modules[name], a)}
        if changed:
            attrs[name] = changed
    return {**spec, "edits": [*spec.get("edits", []),
                              {"resize": {"tensors": tensors, "attrs": attrs}}]}


def separable(conv: nn.Conv2d) -> nn.Sequential:
    """A k×k conv as a depthwise separable pair (MobileNet): depthwise k×k (groups = in, the
    conv's stride, padding and dilation) → BN → ReLU → pointwise 1×1 (the conv's bias, if any)."""
    c_in = conv.in_channels
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=c_in, bias=False, padding_mode=conv.padding_mode),
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, conv.out_channels, 1, bias=conv.bias is not None),
    )


def separable_convs(model: nn.Module) -> list[str]:
    """The convs `separable` applies to: standard (groups = 1) k×k, k > 1, more than one input
    channel (a one-channel conv has nothing to separate)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels > 1
            and tuple(m.kernel_size) != (1, 1)]


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at ``dotted`` (e.g. ``layer1.0.conv1``) by ``new``."""
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _apply_edits(model: nn.Module, edits: Sequence[Spec]) -> None:
    for edit in edits:
        if "resize" in edit:
            _resize(model, edit["resize"])
        for name in edit.get("separable", []):
            set_module(model, name, separable(model.get_submodule(name)))


def _resize(model: nn.Module, recipe: Spec) -> None:
    """Cut each listed tensor to its leading slice of the recorded shape, set the attributes,
    and re-initialise the layers that changed (a resized layer's init depends on its shape)."""
    touched = set()
    for key, shape in recipe["tensors"].items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, attr)
        if len(shape) != old.ndim or any(s > o for s, o in zip(shape, old.shape, strict=True)):
            raise ConfigError(f"spec edit resize: {key} {list(old.shape)} cannot shrink to {shape}")
        new = old.detach()[tuple(slice(0, s) for s in shape)].clone()
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(attr, new)
        touched.add(owner_name)
    for name, changed in recipe["attrs"].items():
        m = model.get_submodule(name)
        for attr, value in changed.items():
            setattr(m, attr, tuple(value) if isinstance(getattr(m, attr), tuple) else value)
    for name in sorted(touched):
        reset = getattr(model.get_submodule(name), "reset_parameters", None)
        if callable(reset):
            reset()


_KINDS: dict[str, Callable[[Spec], nn.Module]] = {"cnn": StagedCNN, "mlp": MLP,
                                                   "user": _user_model}


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
        allowed = {"kind", "input", "num_classes", "stages", "conv", "width", "normalize", "edits"}
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
    elif kind == "mlp":
        allowed = {"kind", "input", "num_classes", "hidden", "normalize", "edits"}
        if not isinstance(out.get("hidden"), list):
            raise ConfigError(f"mlp hidden must be a list of sizes, got {out.get('hidden')!r}")
    else:
        allowed = {"kind", "input", "num_classes", "factory", "args", "edits"}
        load_factory(out.get("factory"))
        if not isinstance(out.get("args", {}), dict):
            raise ConfigError(f"[base] model_args must be a table, got {out['args']!r}")
    edits = out.get("edits", [])
    if not (isinstance(edits, list) and all(isinstance(e, dict) and set(e) <= {"resize", "separable"}
                                            for e in edits)):
        raise ConfigError(f"spec edits must be a list of 'resize' / 'separable' tables, "
                          f"got {edits!r}")
    extra = set(out) - allowed
    if extra:
        raise ConfigError(f"{kind} spec has unknown keys {sorted(extra)}; valid: {sorted(allowed)}")
    json.dumps(out)  # must stay JSON-serialisable: it goes into the manifest
    return out


def build_model(spec: Spec) -> nn.Module:
    """Instantiate a spec. Weights are PyTorch's default init under the caller's seed (a user
    model's: whatever its factory does, under that seed)."""
    spec = validate(spec)
    model = _KINDS[spec["kind"]](spec)
    _apply_edits(model, spec.get("edits", []))
    return model


@torch.no_grad()
def layers_in_call_order(model: nn.Module, input_shape: Sequence[int]) -> list[nn.Module]:
    """The Conv2d and Linear layers in the order a forward pass first calls them (a dry run):
    the first is the input layer and the last the classifier, whatever order ``__init__``
    declared them in."""
    order: dict[nn.Module, None] = {}
    handles = [m.register_forward_pre_hook(lambda mod, _args: order.setdefault(mod))
               for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        model(torch.zeros((2, *input_shape)))
    finally:
        for m, mode in modes.items():
            m.training = mode
        for h in handles:
            h.remove()
    return list(order)


def example_input(spec: Spec, batch: int = 1) -> torch.Tensor:
    """A deterministic input batch of the spec's shape, for tracing and checks."""
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch, *spec["input"]), generator=g)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d that is the only consumer of a Conv2d's output
    folded into that conv's weight and bias, the BN replaced by ``nn.Identity``.

    The ONNX exporter folds BN anyway; methods that must control the exact exported weight values
    (weight sharing, whose per-layer codebook a per-channel BN rescale would break) fold first.
    Which BN follows which conv is read from the torch.fx graph (`compression.tracing`), so a
    user's block that calls ``self.bn1(self.conv1(x))`` folds as a Sequential does; a model with
    BatchNorm that fx cannot trace is `Unsupported`. Uses the running statistics (eval mode).
    """
    out = copy.deepcopy(model).eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in out.modules()):
        return out
    try:
        pairs = conv_bn_pairs(out)
    except Unsupported as exc:
        raise Unsupported(f"its BatchNorm cannot be folded into the convs: {exc}") from exc
    for conv_name, bn_name in pairs:
        conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # [C_out]
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
        set_module(out, bn_name, nn.Identity())
    return out
