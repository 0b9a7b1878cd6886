"""``distilled``: knowledge distillation into a smaller student (Hinton, Vinyals & Dean 2015).

    loss = α · KL(softmax(z_t / T) ‖ softmax(z_s / T)) · T²  +  (1 − α) · CE(z_s, labels)

The T² keeps the soft term's gradients on the scale of the hard term's as T changes. The formula
is `kd_loss` (its soft term `soft_target_loss`), and `kd_training_loss` makes a training loss of
it against a fixed teacher; `depthwise` and `early_exit` distil with them too. The teacher
is the ``base`` variant, or an ensemble whose softened probabilities are averaged: the base plus
``teachers`` (earlier variants of this build, run from their served ONNX graphs, so any variant
can teach, int8 included) plus ``ensemble − 1`` members of the base's architecture trained here
from other seeds. The teacher sees exactly the augmented batch the student sees (function
matching), so it runs inside the loss, memoised per batch (`Teachers`).

Knowledge distillation pays when the teacher is clearly better than the student can get alone: on
mnist5k a student as accurate as `full` gains nothing from it, and a long enough training of a
small one (16 epochs) matches it on labels alone; the report's table says which, per build.

For the report the same student is also trained on labels alone, and at a few other temperatures.

The student (``student``) is a table — a spec of the built-in ``cnn`` (stages) or ``mlp``
(``kind = "mlp"``, hidden sizes) — or a name: ``"cnn"`` and ``"mlp"`` are the built-in students
(`STUDENTS`), and ``"base"`` is the base's own architecture with ``width`` of its channels, a user's
network included (the channels are cut by torch-pruning on a fresh copy, `pruned_neurons.narrower`,
and the student trains from its own init). A built-in student of a user's network, which brings no
normalisation of its own, normalises with the training split's statistics.

The strength knob is ``width``, a multiplier of the student's channels (its spec's ``width``;
for ``"base"``, the share of the base's channels kept, below 1): the search widens the student
until it is within the accuracy target. Every try sees the same
seeded batches, so the teachers' logits are memoised across tries (`BuildContext.memo`) and so
are the extra ensemble members: a retry costs the student's training only.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from compression import profile
from compression.core.errors import ConfigError
from compression.core.ort import session
from compression.core.stats import format_bits
from compression.methods.pruned_neurons import narrower
from compression.models import DEFAULT_MLP, Spec, build_model, validate
from compression.registry import BuildContext, Built, Knob, MethodOutput, register
from compression.report import markdown_table, paired_cells, paired_columns
from compression.train import LossFn, logits, seed_everything, train

log = logging.getLogger(__name__)

# 8-16-32-32 channels, one block per stage, down to 3×3: ~50x fewer MACs than the reference CNN.
# The fourth (pooled) stage costs little and widens the receptive field a GAP head depends on.
DEFAULT_STUDENT: dict[str, Any] = {"stages": [
    {"channels": 8, "depth": 1, "pool": False},
    {"channels": 16, "depth": 1, "pool": True},
    {"channels": 32, "depth": 1, "pool": True},
    {"channels": 32, "depth": 1, "pool": True},
]}


# The built-in students a config may name; any table of a cnn or mlp spec works too.
STUDENTS: dict[str, dict[str, Any]] = {"cnn": DEFAULT_STUDENT,
                                       "mlp": {"kind": "mlp", "hidden": DEFAULT_MLP["hidden"]}}
BASE = "base"  # the student named after its teacher's architecture, at `width` of its channels
# the search backs off from the configured width toward wider students
WIDTH_KNOB = Knob("width", (0.5, 0.75, 1.0, 1.5, 2.0, 3.0), continuous=True)
BASE_WIDTH_KNOB = Knob("width", (0.25, 0.35, 0.5, 0.7, 0.85), continuous=True)  # share kept


@dataclass(frozen=True)
class DistilledConfig:
    student: dict[str, Any] | str = field(default_factory=lambda: copy.deepcopy(DEFAULT_STUDENT))
    # multiplies the student's channels (stages given as one width each) or hidden sizes;
    # with student = "base", the share of the base's channels the student keeps
    width: float = 1.0
    temperature: float = 4.0
    alpha: float = 0.9  # weight of the soft (teacher) term
    epochs: int = 8
    lr: float | None = None  # None: the base training rate
    teachers: list[str] = field(default_factory=list)  # earlier variants that teach too
    ensemble: int = 1  # the base plus ensemble−1 members of its architecture trained here
    member_epochs: int = 6  # training budget of each trained member
    compare_labels: bool = True  # also train the student on labels only, for the report
    sweep: list[float] = field(default_factory=list)  # more temperatures, for the report

    def __post_init__(self) -> None:
        if self.temperature <= 0 or any(t <= 0 for t in self.sweep):
            raise ValueError(f"temperatures must be > 0, got temperature={self.temperature!r}, "
                             f"sweep={self.sweep!r}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.epochs < 1 or self.member_epochs < 1:
            raise ValueError(f"epochs must be ≥ 1, got epochs={self.epochs!r}, "
                             f"member_epochs={self.member_epochs!r}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be ≥ 1, got {self.ensemble!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.width, int | float) or isinstance(self.width, bool) \
                or not 0 < self.width <= 8:
            raise ValueError(f"width must be a number in (0, 8], got {self.width!r}")
        if isinstance(self.student, str) and self.student not in (BASE, *STUDENTS):
            raise ValueError(f"student must be a table, {BASE!r} or one of {sorted(STUDENTS)}, "
                             f"got {self.student!r}")
        if self.student == BASE:
            if self.width >= 1:
                raise ValueError(f"width must be below 1 with student = {BASE!r} (the share of "
                                 f"the base's channels the student keeps), got {self.width!r}")
            return
        try:  # check the student's architecture now, not after the teacher has trained
            student_spec({"input": [1, 28, 28], "num_classes": 10}, self.student, self.width)
        except ConfigError as exc:
            raise ValueError(f"student: {exc}") from exc

    @property
    def strength(self) -> Knob:
        return BASE_WIDTH_KNOB if self.student == BASE else WIDTH_KNOB


def student_spec(base_spec: Spec, student: dict[str, Any] | str, width: float = 1.0,
                 normalize: dict[str, list[float]] | None = None) -> Spec:
    """The student's spec. ``"base"``: the base's architecture with ``width`` of its channels.
    Otherwise its own layers (channels or hidden sizes × ``width``) with the base's input shape,
    classes and normalisation (``normalize`` where the base's spec has none, a user's model)."""
    if student == BASE:
        c, h, w = base_spec["input"]
        return narrower(base_spec, width, (c, h, w))
    table = STUDENTS[student] if isinstance(student, str) else student
    inherited = {k: base_spec[k] for k in ("input", "num_classes", "normalize") if k in base_spec}
    if normalize is not None:
        inherited.setdefault("normalize", normalize)
    spec = validate({"kind": "cnn", **copy.deepcopy(table), **inherited})
    if width != 1.0 and spec["kind"] == "mlp":
        spec["hidden"] = [max(1, round(int(h) * width)) for h in spec["hidden"]]
    elif width != 1.0:
        spec["width"] = float(spec.get("width", 1.0)) * width
    return spec


Teacher = Callable[[torch.Tensor], torch.Tensor]  # images [N, C, H, W] → logits [N, classes]


# --- the distillation loss: the formula, and the training loss built on it ----------------------
# Other methods distil too (`depthwise` from its base, `early_exit`'s early exits from its last
# one), so the formula lives here once.

def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                     temperature: float) -> torch.Tensor:
    """The soft term alone: T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), averaged over the batch.

    Student logits [N, C]; teacher logits [N, C], or [K, N, C] for an ensemble of K whose
    softened probabilities are averaged. The T² keeps the soft term's gradients on the scale of
    a hard-label term's whatever T is (Hinton et al. 2015, §2). The teacher gets no gradient
    from here only if the caller detaches it (or computes it under ``torch.no_grad``).
    """
    t = temperature
    soft = F.softmax(teacher_logits / t, dim=-1)
    if soft.ndim == 3:
        soft = soft.mean(dim=0)
    # KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s), averaged over the batch
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=-1), soft, reduction="batchmean")
    return kl * t * t


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            *, temperature: float, alpha: float) -> torch.Tensor:
    """The distillation loss (the module docstring's formula) of student logits [N, C] against
    teacher logits [N, C] or [K, N, C] (an ensemble): α · `soft_target_loss` + (1 − α) · CE."""
    return (alpha * soft_target_loss(student_logits, teacher_logits, temperature=temperature)
            + (1 - alpha) * F.cross_entropy(student_logits, labels))


def kd_training_loss(teacher: Teacher, *, temperature: float, alpha: float) -> LossFn:
    """`kd_loss` against a fixed teacher, as a training loss for `compression.train.train`.

    The teacher (a torch model, put in eval mode, or any `Teacher` such as `Teachers`) sees the
    very batch the student sees, augmentation included, and runs without gradients.
    """
    if isinstance(teacher, nn.Module):
        teacher = teacher.eval()

    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return kd_loss(model(x), teacher_logits, y, temperature=temperature, alpha=alpha)

    return loss


class GraphTeacher:
    """A variant's served ONNX graph as a teacher (ONNX Runtime, as many threads as torch)."""

    def __init__(self, graph: onnx.ModelProto) -> None:
        self._session = session(graph, threads=torch.get_num_threads())
        self._input = self._session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._session.run(None, {self._input: x.numpy()})[0])


class Teachers:
    """The teacher(s) as one function of a batch: logits [K, N, C], memoised by batch content.

    Every student run trains with the same seed, hence the same shuffled, shifted batches, so
    the T sweep and the served run share one pass of the (much bigger) teachers.
    """

    def __init__(self, models: list[Teacher],
                 memo: dict[bytes, torch.Tensor] | None = None) -> None:
        self.models = [m.eval() if isinstance(m, nn.Module) else m for m in models]
        # a memo shared across a search's tries must belong to exactly these teachers
        self._memo: dict[bytes, torch.Tensor] = {} if memo is None else memo

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest()
        if key not in self._memo:
            self._memo[key] = torch.stack([m(x) for m in self.models])
        return self._memo[key]

    @torch.no_grad()
    def correct(self, x: np.ndarray, y: np.ndarray, batch: int = 500) -> np.ndarray:
        """Per image: is the top-1 of the averaged probabilities (what the soft targets encode
        at T = 1) right?"""
        preds = [F.softmax(torch.stack([m(torch.from_numpy(x[i:i + batch]))
                                        for m in self.models]), -1).mean(0).argmax(1)
                 for i in range(0, len(x), batch)]
        correct: np.ndarray = torch.cat(preds).numpy() == y
        return correct

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
        return float(self.correct(x, y, batch).mean())


def _train_student(ctx: BuildContext, spec: Spec, teachers: Teachers | None,
                   config: DistilledConfig, temperature: float, desc: str) -> nn.Module:
    """A student from the same seeded init every time, so runs differ only in their targets."""
    seed_everything(ctx.seed)
    student = build_model(spec)
    cfg = ctx.train.scaled(epochs=config.epochs, **({"lr": config.lr} if config.lr else {}))
    if teachers is None:
        train(student, ctx.splits, cfg, seed=ctx.seed, desc=desc, progress=ctx.progress)
        return student

    loss_fn = kd_training_loss(teachers, temperature=temperature, alpha=config.alpha)
    train(student, ctx.splits, cfg, seed=ctx.seed, loss_fn=loss_fn, desc=desc,
          progress=ctx.progress)
    return student


def _ensemble(ctx: BuildContext, base: Built, config: DistilledConfig) -> list[Teacher]:
    """The base model, the named earlier variants, and ensemble−1 freshly trained members."""
    assert base.model is not None
    teachers: list[Teacher] = [copy.deepcopy(base.model).eval()]
    teachers += [GraphTeacher(ctx.variant(name).graph) for name in config.teachers]
    for k in range(1, config.ensemble):
        if base.spec is None:
            raise ConfigError(f"distilled: ensemble > 1 needs a base with a spec; {base.name!r} "
                              "has none")
        key = f"distilled:member:{base.name}:{k}:{config.member_epochs}"
        if key not in ctx.memo:  # a later try of the search reuses the member
            seed_everything(ctx.seed + k)
            member = build_model(base.spec)
            train(member, ctx.splits, ctx.train.scaled(epochs=config.member_epochs),
                  seed=ctx.seed + k, desc=f"teacher {k + 1}/{config.ensemble}",
                  progress=ctx.progress)
            ctx.memo[key] = member.eval()
        teachers.append(ctx.memo[key])
    return teachers


def teacher_memo(ctx: BuildContext, *names: str) -> dict[bytes, torch.Tensor]:
    """The logit memo of one teacher set (named in `Teachers` order), kept for the whole build:
    the tries of a search, and any variant taught by the same set on the same batches (the
    depthwise variant and a student of `full` alone share one)."""
    memo: dict[bytes, torch.Tensor] = ctx.memo.setdefault("teachers:" + ":".join(names), {})
    return memo


@register("distilled", DistilledConfig)
def apply(ctx: BuildContext, base: Built, config: DistilledConfig) -> MethodOutput:
    if base.model is None or base.spec is None:
        raise ConfigError(f"distilled needs a torch teacher with a spec; {base.name!r} has none")
    spec = student_spec(base.spec, config.student, config.width, ctx.splits.normalization())
    for name in config.teachers:  # fail before any training on a misspelt name
        ctx.variant(name)
    members = [f"{base.name}#{k}@{config.member_epochs}" for k in range(1, config.ensemble)]
    teachers = Teachers(_ensemble(ctx, base, config),
                        memo=teacher_memo(ctx, base.name, *config.teachers, *members))
    x, y = ctx.splits.x_test, ctx.splits.y_test
    student = _train_student(ctx, spec, teachers, config, config.temperature,
                             f"distill T={config.temperature:g}")
    # the base as served: which test images it gets right, for the paired tests (its accuracy)
    base_correct = profile.correctness(base.graph, None, None, x, y)[0]
    rows: list[list[str]] = [[f"teacher: `{base.name}`", format_bits(base_correct), "—", "—"]]
    results: dict[str, float] = {"teacher": round(base.accuracy, 6)}

    def record(label: str, correct: np.ndarray, key: str) -> None:
        results[key] = round(float(correct.mean()), 6)
        rows.append([label, *paired_cells(base_correct, correct)])

    if len(teachers.models) > 1:
        members = [f"`{n}`" for n in [base.name, *config.teachers]]
        members += [f"{config.ensemble - 1} trained here"] if config.ensemble > 1 else []
        record(f"teacher: ensemble of {', '.join(members)} (used)", teachers.correct(x, y),
               "teacher_ensemble")
    record(f"student, distilled at T={config.temperature:g}, α={config.alpha:g} (served)",
           _correct(student, x, y), f"T={config.temperature:g}")
    for t in config.sweep:
        if t != config.temperature:
            other = _train_student(ctx, spec, teachers, config, t, f"distill T={t:g}")
            record(f"student, distilled at T={t:g}", _correct(other, x, y), f"T={t:g}")
    if config.compare_labels:
        alone = _train_student(ctx, spec, None, config, config.temperature, "student labels")
        record("student, labels only", _correct(alone, x, y), "labels_only")
    shape = ctx.input_shape
    teacher_macs = profile.count_macs(base.model, shape)
    student_macs = profile.count_macs(student, shape)
    report = (
        f"Student {_describe(spec, config)} "
        f"({profile.count_params(student) / 1e3:.1f} k params, {student_macs / 1e6:.2f} M MACs, "
        f"{teacher_macs / max(student_macs, 1):.1f}x fewer than `{base.name}`), {config.epochs} "
        f"epochs from the same init in every run. Test split; Δ vs `{base.name}` on the same "
        "images, with its exact McNemar p-value.\n\n"
        + markdown_table(["model", *paired_columns(base.name)], rows))
    return MethodOutput(model=student, spec=spec, report_md=report,
                        details={"student": spec, "accuracy": results})


def _correct(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: is the model's top-1 right? (its mean is `compression.train.accuracy`)"""
    correct: np.ndarray = logits(model, x).argmax(1) == y
    return correct


def _describe(spec: Spec, config: DistilledConfig) -> str:
    """The student's layers in a few words, for the report."""
    if config.student == BASE:
        return f"`{BASE}` ({config.width:g} of the base's channels)"
    if spec["kind"] == "mlp":
        return f"MLP `{spec['hidden']}`"
    return f"`{[s['channels'] for s in spec['stages']]}` × width {spec.get('width', 1.0):g}"
