"""The early-exit rules, once: stage I/O names, confidence, thresholds, and the walk down the chain.

The early-exit network is served as one ONNX graph per stage. Stage 0 takes ``input`` (FP32
pixels [N, C, H, W]); stage i > 0 takes ``features_in``, which is stage i-1's ``features`` output
(ONNX forbids a graph input and output of the same name). Every stage but the last outputs
``features`` and ``logits`` ([N, classes], its exit); the last outputs ``logits`` only. Outputs
are found by name, never by position.

A sample leaves at exit i when the exit's confidence passes its threshold (max softmax
probability ≥ threshold, or softmax entropy ≤ threshold); the last exit always answers. The build
calibrates the thresholds (`calibrate`) and measures the policy with `walk`; the server answers
with the same `walk`, adding its deadline test between stages. `walk` runs any `Stages`: the ORT
`StageChain` here, or `server.torch_runner.TorchStageChain`, whose features are torch tensors on
its device. numpy and ONNX Runtime only; torch is imported only to mask such tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from compression.core.ort import CPU, INPUT_NAME, OUTPUT_NAME, run, session

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

CRITERIA = ("max_prob", "entropy")
FEATURES = "features"  # output of every stage but the last
FEATURES_IN = "features_in"  # input of stages i > 0


def stage_io(index: int, num_stages: int) -> tuple[str, tuple[str, ...]]:
    """(input name, output names) of stage ``index`` of ``num_stages``."""
    inp = INPUT_NAME if index == 0 else FEATURES_IN
    outs = (OUTPUT_NAME,) if index == num_stages - 1 else (FEATURES, OUTPUT_NAME)
    return inp, outs


# --- confidence ---------------------------------------------------------------------------------

def confidence(logits: np.ndarray, criterion: str) -> np.ndarray:
    """[N, classes] logits → [N]: max softmax probability, or softmax entropy (nats).

    float64, so that the build's calibration and the server put every sample on the same side of
    a threshold.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"exit criterion {criterion!r}: expected one of {CRITERIA}")
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    if criterion == "max_prob":
        return p.max(axis=1)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)


def leaves(conf: np.ndarray, threshold: float, criterion: str) -> np.ndarray:
    """Per sample: does its confidence pass ``threshold``? (prob ≥ t, or entropy ≤ t)"""
    return conf >= threshold if criterion == "max_prob" else conf <= threshold


def never_threshold(criterion: str) -> float:
    """A threshold no sample passes: an exit the calibration shut."""
    return 1.5 if criterion == "max_prob" else -1.0


def last_threshold(criterion: str, num_classes: int) -> float:
    """The last exit's threshold: every sample passes (max_prob 0; entropy above ln(classes))."""
    return 0.0 if criterion == "max_prob" else math.log(num_classes) + 1e-6


# --- the policy on precomputed logits (calibration, reports) ------------------------------------

def assign_exits(exit_logits: Sequence[np.ndarray], thresholds: Sequence[float],
                 criterion: str) -> np.ndarray:
    """Per sample, the first exit whose confidence passes its threshold (the last always)."""
    n = len(exit_logits[0])
    where = np.full(n, len(exit_logits) - 1)
    running = np.ones(n, dtype=bool)
    for e, (lg, t) in enumerate(zip(exit_logits[:-1], thresholds[:-1], strict=True)):
        go = running & leaves(confidence(lg, criterion), t, criterion)
        where[go] = e
        running &= ~go
    return where


def policy_predictions(exit_logits: Sequence[np.ndarray], where: np.ndarray) -> np.ndarray:
    """The class each sample gets from the exit it leaves at."""
    stacked = np.stack([lg.argmax(1) for lg in exit_logits])  # [exits, N]
    return stacked[where, np.arange(len(where))]


def exit_shares(where: np.ndarray, n_exits: int) -> list[float]:
    return [float(np.mean(where == e)) for e in range(n_exits)]


def calibrate(exit_logits: Sequence[np.ndarray], y: np.ndarray, criterion: str, *,
              target_accuracy: float = 0.0, target_drop: float = 0.0) -> list[float]:
    """Per-exit thresholds on a calibration split.

    Exit by exit on the samples still running: sort them by confidence, and take the longest
    most-confident prefix (cut only between distinct confidences) whose accuracy meets the target
    (``target_accuracy``, or else the last exit's accuracy on the same samples − ``target_drop``).
    The threshold sits halfway between the last sample taken and the first one left, so a
    recomputation that differs in the last bits does not move a sample across it.
    """
    n_exits = len(exit_logits)
    num_classes = exit_logits[0].shape[1]
    final_correct = exit_logits[-1].argmax(1) == y
    running = np.ones(len(y), dtype=bool)
    thresholds: list[float] = []
    for lg in exit_logits[:-1]:
        idx = np.flatnonzero(running)
        score = confidence(lg[idx], criterion)
        if criterion == "entropy":
            score = -score  # higher = more confident, for both criteria below
        order = np.argsort(-score, kind="stable")
        s = score[order]
        correct = (lg[idx].argmax(1) == y[idx])[order]
        count = np.arange(1, len(s) + 1)
        if target_accuracy > 0:
            ok = np.cumsum(correct) >= target_accuracy * count
        else:
            ok = np.cumsum(correct) >= np.cumsum(final_correct[idx][order]) - target_drop * count
        boundary = np.append(s[:-1] > s[1:], True)  # a cut after j separates distinct scores
        good = np.flatnonzero(ok & boundary)
        if len(good) == 0:
            thresholds.append(never_threshold(criterion))
            continue
        j = int(good[-1])
        cut = (s[j] + s[j + 1]) / 2 if j + 1 < len(s) else s[j] - 1e-9
        threshold = float(cut if criterion == "max_prob" else -cut)
        thresholds.append(threshold)
        running[idx[leaves(confidence(lg[idx], criterion), threshold, criterion)]] = False
    thresholds.append(last_threshold(criterion, num_classes))
    assert len(thresholds) == n_exits
    return thresholds


# --- running the chain ----------------------------------------------------------------------------

@runtime_checkable
class Stages(Protocol):
    """An early-exit network, stage by stage: `StageChain` (ONNX Runtime) or
    `server.torch_runner.TorchStageChain`. ``stage(i, x)`` returns stage i's exit logits (float32
    numpy [N, classes]) and the features stage i+1 takes (None after the last stage; a torch
    tensor on the device where the chain keeps them on a GPU), which `walk` masks by row."""

    def __len__(self) -> int: ...
    def stage(self, i: int, x: Any) -> tuple[np.ndarray, Any]: ...


class StageChain:
    """One ORT session per stage graph, run in order; outputs found by name (`stage_io`)."""

    def __init__(self, sessions: Sequence[ort.InferenceSession]) -> None:
        if not sessions:
            raise ValueError("an early-exit chain needs at least one stage")
        self.sessions = list(sessions)
        n = len(self.sessions)
        self._io: list[tuple[str, list[str]]] = []
        for i, sess in enumerate(self.sessions):
            want_in, want_out = stage_io(i, n)
            inputs = [t.name for t in sess.get_inputs()]
            outputs = [t.name for t in sess.get_outputs()]
            if inputs != [want_in] or sorted(outputs) != sorted(want_out):
                raise ValueError(f"stage {i} of {n}: graph takes {inputs} and returns {outputs}; "
                                 f"the stage contract is {want_in!r} → {list(want_out)}")
            self._io.append((want_in, outputs))

    @classmethod
    def from_graphs(cls, graphs: Sequence[onnx.ModelProto | bytes], *, threads: int = 1,
                    providers: Sequence[str] = (CPU,)) -> StageChain:
        return cls([session(g, threads=threads, providers=providers) for g in graphs])

    def __len__(self) -> int:
        return len(self.sessions)

    def stage(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Run stage ``i``: (its exit's logits, features for stage i+1 or None for the last)."""
        name, outputs = self._io[i]
        out = dict(zip(outputs, run(self.sessions[i], {name: x}, rows=len(x)), strict=True))
        return out[OUTPUT_NAME], out.get(FEATURES)

    def run(self, x: np.ndarray, upto: int | None = None) -> list[np.ndarray]:
        """Logits of exits 0..upto (default: all) for one batch, every sample through each."""
        last = len(self) - 1 if upto is None else upto
        out: list[np.ndarray] = []
        feed: np.ndarray | None = x
        for i in range(last + 1):
            assert feed is not None, f"stage {i} got no features"
            logits, feed = self.stage(i, feed)
            out.append(logits)
        return out

    def all_logits(self, x: np.ndarray, batch_size: int = 256) -> list[np.ndarray]:
        """Every exit's logits over a whole array, batched."""
        parts = [self.run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return [np.concatenate([p[e] for p in parts]) for e in range(len(self))]


# May the samples at these batch indices run ``stage``? → a bool mask over them.
KeepGoing = Callable[[int, np.ndarray], np.ndarray]


@dataclass
class Walk:
    """What a walk down the chain returns."""

    logits: np.ndarray  # [N, classes]: each sample's logits from the exit it left at
    exits: np.ndarray  # [N] int64: the exit each sample left at
    timings: list[tuple[int, int, float]] = field(default_factory=list)  # (stage, samples, ms)


def _take_rows(features: Any, keep: np.ndarray) -> Any:
    """``features[keep]`` for a bool mask over its rows: numpy features directly, a torch tensor
    with the mask moved to the tensor's device (torch imported only then)."""
    if isinstance(features, np.ndarray):
        return features[keep]
    import torch

    return features[torch.from_numpy(keep).to(features.device)]


def walk(chain: Stages, x: np.ndarray, thresholds: Sequence[float], criterion: str, *,
         max_exit: np.ndarray | None = None, keep_going: KeepGoing | None = None) -> Walk:
    """Answer a batch with the exit policy, stage by stage on the samples still running.

    A sample leaves at exit i when its confidence passes ``thresholds[i]``, at its own
    ``max_exit`` (the depth its request was routed to), when ``keep_going(i + 1, samples)``
    says there is no time for stage i+1, or at the last exit.
    """
    n = x.shape[0]
    last = len(chain) - 1
    limit = np.full(n, last) if max_exit is None else np.minimum(max_exit, last)
    out: np.ndarray | None = None
    used = np.full(n, -1, np.int64)
    active = np.arange(n)
    feed: Any = x
    timings: list[tuple[int, int, float]] = []
    for s in range(len(chain)):
        assert feed is not None, f"stage {s} got no features"
        t = time.perf_counter()
        logits, features = chain.stage(s, feed)
        timings.append((s, len(active), (time.perf_counter() - t) * 1e3))
        if out is None:
            out = np.empty((n, logits.shape[1]), np.float32)
        if s == last:
            done = np.ones(len(active), dtype=bool)
        else:
            done = leaves(confidence(logits, criterion), thresholds[s], criterion)
            done |= limit[active] <= s
            if keep_going is not None and not done.all():
                go_on = np.flatnonzero(~done)
                done[go_on[~keep_going(s + 1, active[go_on])]] = True
        out[active[done]] = logits[done]
        used[active[done]] = s
        active = active[~done]
        if not len(active):
            break
        assert features is not None
        feed = _take_rows(features, ~done)
    assert out is not None
    return Walk(out, used, timings)
