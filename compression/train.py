"""Seeded, deterministic training and evaluation shared by the base model and every method.

Methods customise training through three seams rather than copies of this loop:
``loss_fn(model, x, y)`` (distillation, early-exit joint loss), ``after_step(model)`` (holding
pruning masks, clamping binary weights) and ``params`` (fine-tune only some parameters).

Epochs have a floor in optimizer steps (``min_steps_per_epoch``): on a small dataset an epoch
draws further shuffled passes until it has made that many updates, so every configured epoch
count (the base's and each method's fine-tunes) means at least as much training as on the dataset
the config was written for. Where a dataset has enough batches the floor changes nothing.
"""

from __future__ import annotations

import copy
import logging
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compression.data import Splits

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
StepHook = Callable[[nn.Module], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the ``[base.train]`` table of a build config, or a method's fine-tune."""

    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    augment_shift: int = 2  # random translation in pixels, 0 = off
    patience: int = 4  # early stop after this many epochs without a better val accuracy
    min_steps_per_epoch: int = 0  # an epoch makes at least this many optimizer steps (0: one pass)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "min_steps_per_epoch", "patience", "augment_shift"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")

    def steps_per_epoch(self, n_train: int) -> int:
        """Optimizer steps per epoch on ``n_train`` images: one pass, or the floor if more."""
        return max(1, -(-n_train // self.batch_size), self.min_steps_per_epoch)

    def floor_binds(self, n_train: int) -> bool:
        """Whether the step floor lengthens an epoch on ``n_train`` images."""
        return self.min_steps_per_epoch > max(1, -(-n_train // self.batch_size))

    def scaled(self, **changes: object) -> TrainConfig:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TrainResult:
    best_val_accuracy: float
    epochs_run: int


def seed_everything(seed: int) -> None:
    """Seed every generator training touches; CPU kernels are then deterministic run to run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def shift_batch(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero padding): light MNIST augmentation."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def train(model: nn.Module, splits: Splits, cfg: TrainConfig, *, seed: int,
          loss_fn: LossFn = cross_entropy, after_step: StepHook | None = None,
          params: Iterable[nn.Parameter] | None = None, desc: str = "train",
          progress: bool = True) -> TrainResult:
    """Adam + cosine schedule; keeps the weights of the best validation epoch (early stop)."""
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    x_train = torch.from_numpy(splits.x_train)
    y_train = torch.from_numpy(splits.y_train)
    trainable = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = cfg.steps_per_epoch(len(x_train))
    # shuffled passes per epoch: one, or as many as the step floor needs
    passes = (-(-steps_per_epoch * cfg.batch_size // len(x_train))
              if cfg.floor_binds(len(x_train)) else 1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=max(cfg.epochs, 1),
                                                steps_per_epoch=steps_per_epoch, pct_start=0.15)
    best_acc, best_state, stale, epoch = -1.0, copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        # one permutation per pass, so every image is seen once per pass (one pass: as always)
        order = torch.cat([torch.randperm(len(x_train), generator=g) for _ in range(passes)])
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} {epoch}/{cfg.epochs}", leave=False,
                   disable=not progress or not sys.stderr.isatty(), unit="step")
        running = 0.0
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = shift_batch(x_train[idx], cfg.augment_shift, g)
            loss = loss_fn(model, xb, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                with torch.no_grad():
                    after_step(model)
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.set_postfix(loss=f"{running:.3f}")
        bar.close()
        acc = accuracy(model, splits.x_val, splits.y_val)
        log.info("%s epoch %d/%d: loss %.4f, val accuracy %.4f", desc, epoch, cfg.epochs, running, acc)
        if acc > best_acc:
            best_acc, best_state, stale = acc, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(best_val_accuracy=best_acc, epochs_run=epoch)


@torch.no_grad()
def logits(model: nn.Module, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Eval-mode logits [N, classes] for an image array [N, C, H, W]."""
    was_training = model.training
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).float() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((logits(model, x).argmax(1) == y).mean())
