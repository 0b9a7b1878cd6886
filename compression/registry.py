"""The method seam: compression methods register here; the builder dispatches by name.

Each method lives in one module of `compression.methods`, named after the method (``-`` → ``_``),
with a frozen config dataclass and one ``apply``. Abridged from `compression.methods.int8`, the
one place ``int8`` is registered (a config may use a method for many variants, e.g. ``int8`` of
``full`` and of ``pruned-neurons``)::

    @dataclass(frozen=True)
    class Int8Config:
        calibration_images: int = 256

    @register("int8", Int8Config)
    def apply(ctx: BuildContext, base: Built, config: Int8Config) -> MethodOutput: ...

A new method adds its module to `METHOD_MODULES`; the builder never changes. A method that cannot
handle the base it is given (a user's network it cannot trace or prune) raises
`compression.core.errors.Unsupported` with the reason: the builder leaves that variant out and
says why, rather than failing the build.

Accuracy-targeted compression: a config class may declare its strength knob as data, a class
attribute ``strength`` holding a `Knob` (the field, and its settings from most to least compressed),
e.g. ``strength: ClassVar[Knob] = Knob("sparsity", (0.95, 0.9, 0.8, 0.7, 0.5), continuous=True)``.
The builder (`compression.build`, ``_search``) tries the configured setting first and backs off
along the knob to the strongest setting whose validation accuracy stays within ``max_drop`` of
``full``'s; the methods themselves know nothing of the search. A config without a knob is tried
once, and judged all the same.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import numpy as np
import onnx
from torch import nn

from compression.core.errors import ConfigError
from compression.core.family import Exit, LatencyTable
from compression.data import Splits
from compression.models import Spec
from compression.train import TrainConfig

# Modules that register methods, imported on first lookup: each is named after its method.
METHOD_MODULES: tuple[str, ...] = (
    "compression.methods.low_rank",
    "compression.methods.depthwise",
    "compression.methods.early_exit",
    "compression.methods.pruned_weights",
    "compression.methods.pruned_neurons",
    "compression.methods.distilled",
    "compression.methods.int8",
    "compression.methods.clustered",
    "compression.methods.binary",
)


@dataclass(frozen=True)
class Knob:
    """A method's strength knob: one field of its config and that field's settings, ordered from
    most to least compressed (the back-off order of the search).

    ``continuous``: values between two settings are valid too (a float), so the search may bisect
    between the last failing and the first passing setting. A configured value that is not on the
    ladder is tried first all the same; the search then continues with the milder settings.
    """

    field: str
    ladder: tuple[Any, ...]
    continuous: bool = False

    def __post_init__(self) -> None:
        if len(self.ladder) < 2:
            raise ValueError(f"knob {self.field!r}: a ladder needs ≥ 2 settings, got {self.ladder!r}")
        if self.continuous and not all(_is_number(v) for v in self.ladder):
            raise ValueError(f"knob {self.field!r}: a continuous ladder must be numbers")

    def value(self, config: Any) -> Any:
        return getattr(config, self.field)

    def schedule(self, config: Any) -> list[Any]:
        """``config`` first, then one config per ladder setting milder than its value."""
        v = self.value(config)
        if v in self.ladder:
            milder = list(self.ladder[self.ladder.index(v) + 1:])
        elif _is_number(v) and all(_is_number(x) for x in self.ladder):
            rising = self.ladder[-1] > self.ladder[0]  # does a milder setting mean a larger value?
            milder = [x for x in self.ladder if (x > v if rising else x < v)]
        else:
            milder = []  # off a non-numeric ladder: nothing is known to be milder
        return [config, *(dataclasses.replace(config, **{self.field: x}) for x in milder)]

    def between(self, stronger: Any, milder: Any) -> Any | None:
        """The config halfway between two (continuous knobs only), or None where there is none."""
        a, b = self.value(stronger), self.value(milder)
        if not self.continuous or not (_is_number(a) and _is_number(b)):
            return None
        mid = round((a + b) / 2, 4)
        if mid in (a, b):
            return None
        try:
            return dataclasses.replace(stronger, **{self.field: mid})
        except ValueError:  # the config's own checks reject the midpoint
            return None


def knob(config: Any) -> Knob | None:
    """The strength knob a method's config declares (``strength``), or None."""
    k = getattr(config, "strength", None)
    return k if isinstance(k, Knob) else None


def _is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


@dataclass
class Built:
    """A variant built earlier in this run, usable as another variant's ``base``."""

    name: str
    model: nn.Module | None  # torch inference model (None for graph-only variants such as int8)
    spec: Spec | None  # its architecture spec, when expressible
    graph: onnx.ModelProto  # the dense graph it serves
    accuracy: float
    val_accuracy: float | None = None  # what the accuracy target is judged on


@dataclass
class BuildContext:
    """What a method may use: data, seed, the base training settings and earlier variants."""

    splits: Splits
    seed: int
    train: TrainConfig
    built: dict[str, Built]
    progress: bool = True
    # Results a method may reuse across the tries of one build's search (e.g. a teacher's logits
    # per training batch, which every try of a seeded training sees again): key → value.
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.splits.input_shape

    def variant(self, name: str) -> Built:
        if name not in self.built:
            raise ConfigError(f"variant base {name!r} is not built before this variant; "
                              f"built so far: {list(self.built)}")
        return self.built[name]

    def calibration_images(self, n: int) -> np.ndarray:
        """``n`` training images, a seeded sample: calibration for quantization and thresholds."""
        rng = np.random.default_rng(self.seed)
        idx = rng.choice(len(self.splits.x_train), size=min(n, len(self.splits.x_train)),
                         replace=False)
        return self.splits.x_train[np.sort(idx)]


@dataclass
class MethodOutput:
    """What a method returns; the builder writes, verifies and measures it.

    Give ``model`` (exported to ONNX by the builder) or ``graph`` (a graph built directly, e.g.
    int8). ``weights_codec`` stores the graph as a skeleton plus weights encoded by that codec
    (see `compression.core.encoding`). An early-exit network gives ``stages`` and ``exits`` and its
    own ``accuracy``/``latency_ms``; a method that gives ``accuracy`` (test split) also gives
    ``val_accuracy`` (validation split) of the same served thing. Otherwise the builder measures
    both on the served graph.
    """

    model: nn.Module | None = None
    spec: Spec | None = None
    graph: onnx.ModelProto | None = None
    weights_codec: str | None = None
    codec_options: dict[str, Any] = field(default_factory=dict)
    # the initializers the codec stores; None: every conv and linear weight
    # (`export.layer_weights`). Others stay dense in the graph (e.g. the full-precision layers
    # of a partly binary network).
    codec_tensors: list[str] | None = None
    params_count: int | None = None  # override, e.g. non-zero weights of a sparse model
    macs: int | None = None  # override when the torch model is not what runs
    details: dict[str, Any] = field(default_factory=dict)  # JSON: goes into the manifest
    report_md: str = ""  # a markdown section for report.md (comparisons, sweeps)
    stages: list[onnx.ModelProto] | None = None
    exits: list[Exit] | None = None
    accuracy: float | None = None  # test split
    val_accuracy: float | None = None  # validation split
    latency_ms: LatencyTable | None = None


Apply = Callable[[BuildContext, Built, Any], MethodOutput]


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    apply: Apply

    def parse(self, params: Mapping[str, Any]) -> Any:
        """Build the frozen config from a TOML table; unknown keys and bad types → ConfigError."""
        fields = {f.name: f for f in dataclasses.fields(self.config_cls)}
        unknown = set(params) - set(fields)
        if unknown:
            raise ConfigError(f"method {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                              f"valid: {sorted(fields)}")
        try:
            return self.config_cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"method {self.name!r}: {exc}") from exc


_METHODS: dict[str, Method] = {}


def register(name: str, config_cls: type) -> Callable[[Apply], Apply]:
    def deco(fn: Apply) -> Apply:
        _METHODS[name] = Method(name, config_cls, fn)
        return fn
    return deco


def get(name: str) -> Method:
    _import_all()
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {sorted(_METHODS)}")
    return _METHODS[name]


def names() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def _import_all() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)
