"""``early-exit``: the base network with a small classifier after each stage, served stage by stage.

The network (BranchyNet, Teerapittayanon et al. 2016)::

    input ─ normalize ─ stage 0 ─ stage 1 ─ … ─ stage S-1 ─ head  (exit S-1, the normal head)
                           │         │
                        exit 0    exit 1     (pool → flatten → linear)

Where the stages end: a `StagedCNN`'s own stages; for any other network (a user's ``[base]
model``), or where ``exit_after`` names them, at module boundaries cut by torch.fx
(`compression.tracing`): ``exit_after = ["layer1", "layer2"]`` puts an early exit after each named
module, which every path through the network must pass (the end of a residual stage, not the
inside of a block). Without names, ``auto_exits`` exits go at the module boundaries whose
cumulative MACs come nearest to 1/(n+1), 2/(n+1), … of the network's. The last stage ends with
the network's own classifier. A network fx cannot trace, or with too few boundaries, is
`Unsupported` (left out of the family, with the reason).

Two trainings, both reported: heads alone on the frozen base backbone, and joint training (a
weighted sum of every exit's cross-entropy, early exits also distilling from the last) that starts
from the base weights and the frozen run's heads. ``serve`` picks which one ships.

Served form: one ONNX graph per stage (`StageSegment`), named by `compression.core.exits.stage_io`:
stage 0 takes ``input`` (FP32 pixels in [0, 1], [N, C, H, W]), stage i > 0 takes ``features_in``
(stage i-1's ``features``); every stage outputs its exit's ``logits``, all but the last also
``features``. The server runs stages in order and stops at exit i when the exit's confidence
passes its threshold. Those rules — stage I/O, confidence, calibration, the walk down the chain
— are torch-free code in `compression.core.exits`, which this module and the server both call:
the policy measured here is the policy served.

Thresholds are calibrated (`calibrate`) on the validation split, exit by exit in order, on the
samples still running: exit i lets go its most confident samples as long as, on exactly those
samples, it is at least as accurate as the target (by default: the last exit's accuracy on the
same samples, minus ``target_drop``) — so the policy loses at most ``target_drop`` against
running the full depth.

Recorded per exit k (`Exit`): the stand-alone accuracy of exit k, and the accuracy of the
calibrated policy capped at depth k (`capped_policy_accuracies`: exit k acts as the last), each
on the test split (reports) and the validation split (routing); the variant's ``val_accuracy``
is the uncapped policy on validation.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from compression import export, profile, report, tracing
from compression.core import ort as core_ort
from compression.core import stats
from compression.core.errors import ConfigError, Unsupported
from compression.core.exits import (
    CRITERIA,
    StageChain,
    assign_exits,
    calibrate,
    exit_shares,
    last_threshold,
    policy_predictions,
    stage_io,
    walk,
)
from compression.core.family import BATCH_SIZES, Exit, LatencyTable
from compression.methods.distilled import soft_target_loss
from compression.models import StagedCNN
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.train import LossFn, train

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

# Common thresholds for the accuracy/latency curve (applied to every early exit alike).
CURVE = {"max_prob": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999),
         "entropy": (1.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.001)}


@dataclass(frozen=True)
class EarlyExitConfig:
    """Exit heads, the two trainings, and the calibration of the exit policy."""

    # the threshold target: a smaller allowed drop lets fewer samples leave early (milder)
    strength: ClassVar[Knob] = Knob("target_drop", (0.05, 0.02, 0.01, 0.005, 0.0))

    # module names (fx boundaries) after which an early exit goes; empty: a staged CNN's stages,
    # or `auto_exits` boundaries of any other network chosen by MACs
    exit_after: tuple[str, ...] = ()
    auto_exits: int = 2
    head_pool: int = 7  # exit head: max-pool the stage output to about pool×pool, then linear
    head_hidden: int = 0  # > 0: one hidden ReLU layer of this width in each early head
    frozen_epochs: int = 1  # heads alone on the frozen base backbone
    frozen_lr: float = 3e-3
    joint_epochs: int = 2  # everything, from the base weights and the frozen run's heads
    joint_lr: float = 1e-3
    exit_weights: tuple[float, ...] = ()  # loss weight per exit; empty = 1 for every exit
    distill: float = 0.5  # weight of each early exit's KD loss from the last exit (0 = off)
    temperature: float = 3.0
    serve: str = "joint"  # which training ships: "joint" or "frozen"
    criterion: str = "max_prob"  # confidence: max softmax probability, or entropy (BranchyNet)
    target_accuracy: float = 0.0  # > 0: each exit's accuracy on the samples it lets go
    target_drop: float = 0.0  # else: last exit's accuracy on those samples minus this

    def __post_init__(self) -> None:
        object.__setattr__(self, "exit_weights", tuple(float(w) for w in self.exit_weights))
        object.__setattr__(self, "exit_after", tuple(self.exit_after))
        names = self.exit_after
        if len(names) == 1 or len(set(names)) != len(names) or not all(
                isinstance(e, str) and e for e in names):
            raise ValueError(f"exit_after must name ≥ 2 different modules (or none), got "
                             f"{list(names)!r}")
        if self.auto_exits < 2:
            raise ValueError(f"auto_exits must be ≥ 2, got {self.auto_exits!r}")
        if self.head_pool < 1:
            raise ValueError(f"head_pool must be ≥ 1, got {self.head_pool!r}")
        if self.head_hidden < 0:
            raise ValueError(f"head_hidden must be ≥ 0, got {self.head_hidden!r}")
        if self.frozen_epochs < 1 or self.joint_epochs < 0:
            raise ValueError(f"frozen_epochs must be ≥ 1 and joint_epochs ≥ 0, got "
                             f"{self.frozen_epochs!r}, {self.joint_epochs!r}")
        if self.frozen_lr <= 0 or self.joint_lr <= 0:
            raise ValueError(f"frozen_lr and joint_lr must be > 0, got {self.frozen_lr!r}, "
                             f"{self.joint_lr!r}")
        if any(w < 0 for w in self.exit_weights) or (self.exit_weights
                                                       and sum(self.exit_weights) == 0):
            raise ValueError(f"exit_weights must be ≥ 0 and not all 0, got {self.exit_weights!r}")
        if self.distill < 0 or self.temperature <= 0:
            raise ValueError(f"distill must be ≥ 0 and temperature > 0, got {self.distill!r}, "
                             f"{self.temperature!r}")
        if self.serve not in ("joint", "frozen"):
            raise ValueError(f"serve must be 'joint' or 'frozen', got {self.serve!r}")
        if self.serve == "joint" and self.joint_epochs == 0:
            raise ValueError("serve = 'joint' needs joint_epochs ≥ 1")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must lie in [0, 1], got {self.target_accuracy!r}")
        if not 0.0 <= self.target_drop < 1.0:
            raise ValueError(f"target_drop must lie in [0, 1), got {self.target_drop!r}")


# --- the network ------------------------------------------------------------------------------

class ExitHead(nn.Module):
    """A small classifier on a stage's output: max-pool → flatten → [linear → ReLU] → linear.

    [N, C, H, W] → [N, C, ⌊H/k⌋, ⌊W/k⌋] (k = H // pool) → [N, classes]. Max-pooling to a small
    grid keeps where strokes are, which global average pooling of early features would lose.
    """

    def __init__(self, channels: int, hw: tuple[int, int], num_classes: int, pool: int,
                 hidden: int = 0) -> None:
        super().__init__()
        kh, kw = max(1, hw[0] // pool), max(1, hw[1] // pool)
        d = channels * (hw[0] // kh) * (hw[1] // kw)
        layers: list[nn.Module] = [nn.MaxPool2d((kh, kw)), nn.Flatten()]
        if hidden:
            layers += [nn.Linear(d, hidden), nn.ReLU(inplace=True)]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Backbone(NamedTuple):
    """The base network in stages: ``pre`` (a `StagedCNN`'s normalisation, else identity), the
    stages, the last stage's ``head`` (a `StagedCNN`'s own, else identity: the last stage already
    ends in logits), and where each early exit sits (a module name)."""

    pre: nn.Module
    stages: nn.ModuleList
    head: nn.Module
    places: list[str]


class EarlyExitNet(nn.Module):
    """A `Backbone` (copied), plus ``heads[i]`` after stage i (the last head is the base model's
    own). ``forward`` returns the logits of ``monitor`` (one exit, for the training loop's
    validation); `exit_logits` returns every exit's."""

    def __init__(self, backbone: Backbone, feature_shapes: Sequence[Sequence[int]],
                 num_classes: int, pool: int, hidden: int) -> None:
        super().__init__()
        self.normalize = copy.deepcopy(backbone.pre)
        self.stages = copy.deepcopy(backbone.stages)
        heads: list[nn.Module] = [ExitHead(c, (h, w), num_classes, pool, hidden)
                                  for c, h, w in feature_shapes[:-1]]
        self.heads = nn.ModuleList([*heads, copy.deepcopy(backbone.head)])
        self.monitor = len(self.heads) - 1
        self.frozen_backbone = False

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.normalize(x)
        out = []
        for stage, head in zip(self.stages, self.heads, strict=True):
            x = stage(x)
            out.append(head(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit_logits(x)[self.monitor]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [*self.stages.parameters(), *self.heads[-1].parameters()]

    def train(self, mode: bool = True) -> EarlyExitNet:
        # A frozen backbone must also keep its BN running statistics: hold it in eval mode.
        super().train(mode)
        if self.frozen_backbone:
            self.stages.eval()
            self.heads[-1].eval()
        return self


class StageSegment(nn.Module):
    """What one stage graph computes: ([normalize →] stage i → features, head i → logits)."""

    def __init__(self, net: EarlyExitNet, index: int) -> None:
        super().__init__()
        self.pre = net.normalize if index == 0 else nn.Identity()
        self.stage = net.stages[index]
        self.head = net.heads[index]
        self.last = index == len(net.stages) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.stage(self.pre(x))
        logits = self.head(features)
        return logits if self.last else (features, logits)


def feature_shapes(pre: nn.Module, stages: Iterable[nn.Module],
                   input_shape: Sequence[int]) -> list[list[int]]:
    """[C, H, W] after each stage, from a dry run (eval mode: BatchNorm statistics stay)."""
    shapes = []
    stages = list(stages)
    modes = {m: m.training for s in (pre, *stages) for m in s.modules()}
    with torch.no_grad():
        x = pre.eval()(torch.zeros((1, *input_shape)))
        for stage in stages:
            x = stage.eval()(x)
            shapes.append(list(x.shape[1:]))
    for m, mode in modes.items():
        m.training = mode
    return shapes


def backbone(model: nn.Module, input_shape: tuple[int, int, int],
             config: EarlyExitConfig) -> Backbone:
    """``model`` in stages: a `StagedCNN`'s own (unless ``exit_after`` names others), else cut by
    torch.fx at the named module boundaries, or at ``auto_exits`` chosen by MACs."""
    if isinstance(model, StagedCNN) and not config.exit_after:
        return Backbone(model.normalize, model.stages, model.head,
                        [f"stages.{i}" for i in range(len(model.stages) - 1)])
    try:
        gm = tracing.trace(copy.deepcopy(model))
    except Unsupported as exc:
        raise Unsupported(f"exits go at module boundaries found by torch.fx: {exc}") from exc
    cuts = [c for c in tracing.cuts(gm, input_shape) if len(c.shape) == 3]  # [C, H, W] features
    if config.exit_after:
        chosen = _named_cuts(cuts, config.exit_after)
    else:
        chosen = _cuts_by_macs(cuts, config.auto_exits, profile.count_macs(model, input_shape))
    stages = tracing.split(gm, [c.node for c in chosen])
    return Backbone(nn.Identity(), nn.ModuleList(stages), nn.Identity(),
                    [c.modules[0] for c in chosen])


def _named_cuts(cuts: Sequence[tracing.Cut], names: Sequence[str]) -> list[tracing.Cut]:
    """The cut at each named module's boundary, in forward order; a name that is no such
    boundary is a config error listing those that are."""
    chosen = []
    for name in names:
        found = [c for c in cuts if name in c.modules]
        if len(found) != 1:
            why = ("it is called more than once" if found else "no such module, a skip "
                   "connection crosses its end, or its output is not [N, C, H, W]")
            raise ConfigError(f"early-exit exit_after: {name!r} is not a module boundary every path "
                              f"through the network passes once ({why}); boundaries: "
                              f"{[c.modules[0] for c in cuts]}")
        chosen.append(found[0])
    return sorted(chosen, key=lambda c: cuts.index(c))


def _cuts_by_macs(cuts: Sequence[tracing.Cut], n: int, total: int) -> list[tracing.Cut]:
    """``n`` cuts whose cumulative MACs come nearest to k/(n+1) of ``total``, k = 1…n, in
    order (of equally near cuts the latest: the end of a block rather than its first layer)."""
    chosen: list[tracing.Cut] = []
    for k in range(1, n + 1):
        after = [c for c in cuts if c.macs > (chosen[-1].macs if chosen else 0)]
        if not after:
            raise Unsupported(f"{len(chosen)} module boundaries with [N, C, H, W] features "
                              f"and growing MACs for {n} early exits (boundaries: "
                              f"{[c.modules[0] for c in cuts]}); lower auto_exits, or name "
                              "them with exit_after")
        target = total * k / (n + 1)
        best = min(abs(c.macs - target) for c in after)
        chosen.append([c for c in after if abs(c.macs - target) == best][-1])
    return chosen


def export_stages(net: EarlyExitNet, input_shape: Sequence[int]) -> list[onnx.ModelProto]:
    """One ONNX graph per stage, named per `stage_io`, dynamic batch axis."""
    net = net.eval()
    shapes = feature_shapes(net.normalize, net.stages, input_shape)
    graphs = []
    for i in range(len(net.stages)):
        inp, outs = stage_io(i, len(net.stages))
        shape = input_shape if i == 0 else shapes[i - 1]
        graphs.append(export.to_onnx(StageSegment(net, i), shape, output_names=outs,
                                     input_name=inp))
    return graphs


# --- the served chain against torch ---------------------------------------------------------

def check_against_torch(net: EarlyExitNet, graphs: Sequence[onnx.ModelProto],
                        input_shape: Sequence[int], *, batch: int = 8) -> None:
    """Every exit's chained-ORT logits equal the torch network's (`assert_close`)."""
    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net.eval().exit_logits(x)
    got = StageChain.from_graphs(graphs).run(x.numpy())
    for e, (g, t) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(torch.from_numpy(g), t, atol=1e-4, rtol=1e-3,
                                   msg=lambda m, e=e: f"exit {e}: {m}")


# --- training ---------------------------------------------------------------------------------

def joint_loss(weights: Sequence[float], distill: float, temperature: float) -> LossFn:
    """Σ wᵢ·CE(exit i) + distill·Σ_{i<last} T²·KL(last_T ‖ exit i_T), the last exit detached.

    The KD term is `distilled.soft_target_loss` (the soft half of `distilled.kd_loss`), not
    `kd_loss` itself: here the hard-label weight of exit i is its own wᵢ, not 1 − distill, so
    the two halves are weighted separately.
    """

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outs = model.exit_logits(x)  # type: ignore[operator]
        total = sum(w * F.cross_entropy(o, y) for w, o in zip(weights, outs, strict=True))
        if distill > 0:
            teacher = outs[-1].detach()  # the last exit teaches; it learns from its labels only
            for o in outs[:-1]:
                total = total + distill * soft_target_loss(o, teacher, temperature=temperature)
        return total  # type: ignore[return-value]

    return loss


def heads_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the early exits only (the frozen run: the last head is the base's)."""
    outs = model.exit_logits(x)  # type: ignore[operator]
    return sum(F.cross_entropy(o, y) for o in outs[:-1])  # type: ignore[return-value]


def torch_exit_logits(net: EarlyExitNet, x: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    net.eval()
    with torch.no_grad():
        parts = [net.exit_logits(torch.from_numpy(x[i:i + batch_size]))
                 for i in range(0, len(x), batch_size)]
    return [torch.cat([p[e] for p in parts]).numpy() for e in range(len(net.heads))]


def train_frozen(ctx: BuildContext, net: EarlyExitNet, config: EarlyExitConfig) -> None:
    """Early heads only; the backbone (and its BN statistics) stay exactly the base model's."""
    for p in net.backbone_parameters():
        p.requires_grad_(False)
    net.frozen_backbone, net.monitor = True, 0  # keep the epoch whose first exit is best
    heads = [p for h in net.heads[:-1] for p in h.parameters()]
    train(net, ctx.splits, ctx.train.scaled(epochs=config.frozen_epochs, lr=config.frozen_lr),
          seed=ctx.seed, loss_fn=heads_loss, params=heads, desc="early-exit heads (frozen)",
          progress=ctx.progress)
    for p in net.backbone_parameters():
        p.requires_grad_(True)
    net.frozen_backbone, net.monitor = False, len(net.heads) - 1


def train_joint(ctx: BuildContext, net: EarlyExitNet, config: EarlyExitConfig) -> None:
    """Everything at once; the validation epoch pick watches the last exit, so joint training is
    kept only where it costs the full-depth answer least."""
    weights = config.exit_weights or (1.0,) * len(net.heads)
    train(net, ctx.splits, ctx.train.scaled(epochs=config.joint_epochs, lr=config.joint_lr),
          seed=ctx.seed, loss_fn=joint_loss(weights, config.distill, config.temperature),
          desc="early-exit joint", progress=ctx.progress)


# --- latency ----------------------------------------------------------------------------------

def cumulative_latency(chain: StageChain, input_shape: Sequence[int],
                       batch_sizes: Sequence[int] = BATCH_SIZES) -> list[LatencyTable]:
    """Per exit: p50/p95 of running stages 0..exit chained (ORT, 1 thread), per batch size."""
    rng = np.random.default_rng(0)
    tables: list[LatencyTable] = [{} for _ in range(len(chain))]
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        for e in range(len(chain)):
            tables[e][str(b)] = core_ort.time_ms(lambda x=x, e=e: chain.run(x, upto=e))
    return tables


def measured_policy_latency(chain: StageChain, full: ort.InferenceSession, x: np.ndarray,
                            thresholds: Sequence[float], criterion: str,
                            passes: int = 3) -> dict[str, float]:
    """Mean per-request latency (batch 1) of the exit policy and of ``full`` over ``x``.

    The policy runs as the server runs it, `compression.core.exits.walk` on one request at a
    time. The two are timed back to back sample by sample, and each sample's time is its fastest
    of ``passes`` runs, so that bursts of load from other processes on a shared host inflate
    neither side (the mean over samples still weighs every exit by how often it is taken).
    """
    full_name = full.get_inputs()[0].name
    t_policy = np.full(len(x), np.inf)
    t_full = np.full(len(x), np.inf)
    for _ in range(passes):
        for i in range(len(x)):
            xi = x[i:i + 1]
            t0 = time.perf_counter()
            full.run(None, {full_name: xi})
            t_full[i] = min(t_full[i], time.perf_counter() - t0)
            t0 = time.perf_counter()
            walk(chain, xi, thresholds, criterion)
            t_policy[i] = min(t_policy[i], time.perf_counter() - t0)
    mean_policy, mean_full = 1e3 * float(t_policy.mean()), 1e3 * float(t_full.mean())
    return {"policy_mean_ms": round(mean_policy, 4), "full_mean_ms": round(mean_full, 4),
            "speedup": round(mean_full / mean_policy, 3), "samples": len(x), "passes": passes}


# --- the method -------------------------------------------------------------------------------

@register("early-exit", EarlyExitConfig)
def apply(ctx: BuildContext, base: Built, config: EarlyExitConfig) -> MethodOutput:
    if base.model is None:
        raise ConfigError(f"early-exit needs a torch base model; {base.name!r} is graph-only")
    shape, splits = ctx.input_shape, ctx.splits
    parts = backbone(base.model, shape, config)
    n_exits = len(parts.stages)
    if n_exits < 3:
        raise ConfigError(f"early-exit needs ≥ 3 stages for ≥ 3 exits; {base.name!r} has {n_exits}")
    if config.exit_weights and len(config.exit_weights) != n_exits:
        raise ConfigError(f"early-exit exit_weights has {len(config.exit_weights)} entries; "
                          f"the network has {n_exits} exits")
    shapes = feature_shapes(parts.pre, parts.stages, shape)
    frozen = EarlyExitNet(parts, shapes, splits.num_classes, config.head_pool, config.head_hidden)
    train_frozen(ctx, frozen, config)
    joint = None
    if config.joint_epochs > 0:
        joint = copy.deepcopy(frozen)
        train_joint(ctx, joint, config)
    net = joint if config.serve == "joint" and joint is not None else frozen

    graphs = export_stages(net, shape)
    check_against_torch(net, graphs, shape)
    chain = StageChain.from_graphs(graphs)
    val, test = chain.all_logits(splits.x_val), chain.all_logits(splits.x_test)
    thresholds = calibrate(val, splits.y_val, config.criterion,
                           target_accuracy=config.target_accuracy, target_drop=config.target_drop)
    val_where = assign_exits(val, thresholds, config.criterion)
    test_where = assign_exits(test, thresholds, config.criterion)
    val_shares, test_shares = exit_shares(val_where, n_exits), exit_shares(test_where, n_exits)
    test_correct = policy_predictions(test, test_where) == splits.y_test
    test_acc = float(test_correct.mean())
    val_acc = float((policy_predictions(val, val_where) == splits.y_val).mean())
    exit_acc = [float((lg.argmax(1) == splits.y_test).mean()) for lg in test]
    exit_val_acc = [float((lg.argmax(1) == splits.y_val).mean()) for lg in val]
    capped_test = capped_policy_accuracies(test, splits.y_test, thresholds, config.criterion)
    capped_val = capped_policy_accuracies(val, splits.y_val, thresholds, config.criterion)

    latencies = cumulative_latency(chain, shape)
    full = ctx.built.get("full", base)
    measured = measured_policy_latency(chain, core_ort.session(full.graph), splits.x_test,
                                       thresholds, config.criterion)
    expected = sum(s * lat["1"]["p50"] for s, lat in zip(test_shares, latencies, strict=True))
    full_p50 = profile.onnx_latency(full.graph, shape, batch_sizes=(1,))["1"]["p50"]
    exits = [Exit(index=e, accuracy=round(exit_acc[e], 6), latency_ms=latencies[e],
                  threshold=thresholds[e], exit_share=round(val_shares[e], 6),
                  criterion=config.criterion, val_accuracy=round(exit_val_acc[e], 6),
                  policy_accuracy=round(capped_test[e], 6),
                  policy_val_accuracy=round(capped_val[e], 6)) for e in range(n_exits)]

    trainings = {"frozen": _exit_accuracies(frozen, splits.x_test, splits.y_test)}
    if joint is not None:
        trainings["joint"] = _exit_accuracies(joint, splits.x_test, splits.y_test)
    other = {name: _policy_summary(m, ctx, config) for name, m in
             (("frozen", frozen), ("joint", joint)) if m is not None}
    curve, curve_correct = _curve(test, splits.y_test, latencies, config.criterion, full.accuracy,
                                  full_p50)
    macs = [profile.count_macs(StageSegment(net, i), shape if i == 0 else shapes[i - 1])
            for i in range(n_exits)]
    details = {
        "stages": [{"index": i, "input": stage_io(i, n_exits)[0],
                    "exit_after": parts.places[i] if i < n_exits - 1 else None,
                    "input_shape": list(shape) if i == 0 else shapes[i - 1],
                    "outputs": list(stage_io(i, n_exits)[1]),
                    "features_shape": shapes[i] if i < n_exits - 1 else None,
                    "macs": macs[i], "macs_cumulative": sum(macs[:i + 1]),
                    "params": profile.count_params(StageSegment(net, i))}
                   for i in range(n_exits)],
        # The contract is code, not prose: the module both the build and the server run.
        "io_contract": "compression.core.exits",
        "served_training": "joint" if net is joint else "frozen",
        "policy": {
            "criterion": config.criterion, "thresholds": thresholds,
            "target": (f"accuracy ≥ {config.target_accuracy}" if config.target_accuracy > 0 else
                       f"last exit's accuracy on the same samples − {config.target_drop}"),
            "test_accuracy": round(test_acc, 6), "val_accuracy": round(val_acc, 6),
            "val_exit_shares": _r(val_shares),
            "test_exit_shares": _r(test_shares),
            "expected_mean_latency_ms_b1": round(expected, 4),
            "full_p50_ms_b1": full_p50, "expected_speedup_vs_full": round(full_p50 / expected, 3),
            "measured": measured,
        },
        "latency_ms_note": ("latency_ms is the full-depth chain (worst case: every stage and "
                            "every early head); the policy's mean is under policy."),
        "trainings": trainings,
        "calibrated_policy_by_training": other,
        "threshold_curve": curve,
    }
    log.info("early-exit: policy test accuracy %.4f (full %.4f), shares %s, measured mean "
             "%.3f ms vs full %.3f ms (%.2fx)", test_acc, full.accuracy, _r(test_shares),
             measured["policy_mean_ms"], measured["full_mean_ms"], measured["speedup"])
    # which test images `full` (as served) gets right: the paired tests of the report
    full_correct = profile.correctness(full.graph, None, None, splits.x_test, splits.y_test)[0]
    evidence = _Evidence(full=full_correct, policy=test_correct, curve=curve_correct,
                         n_val=len(splits.y_val))
    return MethodOutput(model=net.eval(), stages=graphs, exits=exits, accuracy=test_acc,
                        val_accuracy=val_acc, latency_ms=latencies[-1], macs=sum(macs), details=details,
                        report_md=_report(details, exits, evidence))


def capped_policy_accuracies(exit_logits: Sequence[np.ndarray], y: np.ndarray,
                             thresholds: Sequence[float], criterion: str) -> list[float]:
    """Per exit k: accuracy of the calibrated policy when no sample goes deeper than k.

    Exits 0..k-1 keep their thresholds and exit k acts as the last (every sample still running
    answers from it) — what `compression.core.exits.walk` returns with ``max_exit = k``. The
    last entry is the uncapped policy.
    """
    last = last_threshold(criterion, exit_logits[0].shape[1])
    out = []
    for k in range(len(exit_logits)):
        logits = exit_logits[:k + 1]
        where = assign_exits(logits, [*thresholds[:k], last], criterion)
        out.append(float((policy_predictions(logits, where) == y).mean()))
    return out


def _r(xs: Sequence[float], nd: int = 4) -> list[float]:
    return [round(float(v), nd) for v in xs]


def _exit_accuracies(net: EarlyExitNet, x: np.ndarray, y: np.ndarray) -> list[float]:
    return [round(float((lg.argmax(1) == y).mean()), 6) for lg in torch_exit_logits(net, x)]


def _policy_summary(net: EarlyExitNet, ctx: BuildContext,
                    config: EarlyExitConfig) -> dict[str, Any]:
    """The same calibration on one training's torch logits, to compare the two trainings."""
    val = torch_exit_logits(net, ctx.splits.x_val)
    test = torch_exit_logits(net, ctx.splits.x_test)
    th = calibrate(val, ctx.splits.y_val, config.criterion,
                   target_accuracy=config.target_accuracy, target_drop=config.target_drop)
    where = assign_exits(test, th, config.criterion)
    acc = float((policy_predictions(test, where) == ctx.splits.y_test).mean())
    return {"thresholds": _r(th, 6), "test_accuracy": round(acc, 6),
            "test_exit_shares": _r(exit_shares(where, len(test)))}


def _curve(test: Sequence[np.ndarray], y: np.ndarray, latencies: Sequence[LatencyTable],
           criterion: str, full_acc: float, full_p50: float,
           ) -> tuple[list[dict[str, Any]], list[np.ndarray]]:
    """Accuracy and expected batch-1 latency with one common threshold on every early exit;
    and per threshold, which test images the policy gets right."""
    rows, correct = [], []
    for t in CURVE[criterion]:
        th = [t] * (len(test) - 1) + [last_threshold(criterion, test[0].shape[1])]
        where = assign_exits(test, th, criterion)
        shares = exit_shares(where, len(test))
        mean = sum(s * lat["1"]["p50"] for s, lat in zip(shares, latencies, strict=True))
        correct.append(policy_predictions(test, where) == y)
        acc = float(correct[-1].mean())
        rows.append({"threshold": t, "test_accuracy": round(acc, 6),
                     "drop_pt": round(100 * (full_acc - acc), 3), "test_exit_shares": _r(shares),
                     "expected_mean_ms_b1": round(mean, 4),
                     "speedup_vs_full": round(full_p50 / mean, 3)})
    return rows, correct


class _Evidence(NamedTuple):
    """Per-image correctness on the test split, for the report's intervals and paired tests."""

    full: np.ndarray  # `full` as served
    policy: np.ndarray  # the served calibrated policy
    curve: list[np.ndarray]  # the policy at each common threshold of the curve
    n_val: int  # validation images (the routing accuracies' denominator)


def _report(details: dict[str, Any], exits: Sequence[Exit], evidence: _Evidence) -> str:
    pol, tr = details["policy"], details["trainings"]
    names = list(tr)
    n_test, n_val = evidence.full.size, evidence.n_val
    acc_rows = [[f"exit {e}" + (" (last)" if e == len(exits) - 1 else ""),
                 *[report.rate_cell(tr[n][e], n_test) for n in names]] for e in range(len(exits))]
    by_training = details["calibrated_policy_by_training"]
    acc_rows.append(["calibrated policy",
                     *[f"{report.rate_cell(by_training[n]['test_accuracy'], n_test)} (shares "
                       f"{by_training[n]['test_exit_shares']})" for n in names]])
    exit_rows = [[e.index, report.rate_cell(e.accuracy, n_test),
                  report.rate_cell(e.policy_accuracy, n_test),
                  report.rate_cell(e.policy_val_accuracy, n_val), f"{e.threshold:.6g}",
                  f"{e.exit_share:.3f}",
                  *[f"{e.latency_ms[str(b)]['p50']:.3f} / {e.latency_ms[str(b)]['p95']:.3f}"
                    for b in BATCH_SIZES]] for e in exits]
    curve_rows = [[r["threshold"], *report.paired_cells(evidence.full, correct),
                   " / ".join(f"{s:.3f}" for s in r["test_exit_shares"]),
                   f"{r['expected_mean_ms_b1']:.3f}", f"{r['speedup_vs_full']:.2f}x"]
                  for r, correct in zip(details["threshold_curve"], evidence.curve, strict=True)]
    delta, p_value = stats.format_delta(evidence.full, evidence.policy)
    m = pol["measured"]
    return "\n".join([
        f"Served: the **{details['served_training']}** training. Calibrated policy "
        f"({pol['criterion']}, target: {pol['target']}): test accuracy "
        f"{stats.format_bits(evidence.policy)} vs full {stats.format_bits(evidence.full)} on "
        f"the same {n_test} test images (95% Wilson intervals; {delta}, exact McNemar "
        f"{p_value}); test exit shares {pol['test_exit_shares']}. Mean batch-1 latency measured "
        f"request by request on the test split: {m['policy_mean_ms']:.3f} ms vs full "
        f"{m['full_mean_ms']:.3f} ms "
        f"(**{m['speedup']:.2f}x**); expected from shares × cumulative p50: "
        f"{pol['expected_mean_latency_ms_b1']:.3f} ms ({pol['expected_speedup_vs_full']:.2f}x).\n",
        "### Joint vs frozen-backbone training (test accuracy per exit [95% Wilson])\n",
        report.markdown_table(["exit", *names], acc_rows),
        "\n### Exits as served (threshold calibrated on validation; latency cumulative, ms)\n",
        "accuracy: every sample leaves at this exit; policy to here: the calibrated policy with "
        "this exit as the deepest, what `early-exit@k` serves. Accuracies [95% Wilson] on the "
        f"test split ({n_test} images) unless marked val (validation split, {n_val} images).\n",
        report.markdown_table(["exit", "test accuracy", "policy to here (test)",
                               "policy to here (val)", "threshold", "val share",
                               *[f"p50/p95 b{b}" for b in BATCH_SIZES]], exit_rows),
        f"\n### Accuracy/latency over a common {pol['criterion']} threshold (test split)\n",
        report.markdown_table(["threshold", *report.paired_columns("full"), "exit shares",
                               "expected mean ms b1", "speed-up"], curve_rows),
    ])
