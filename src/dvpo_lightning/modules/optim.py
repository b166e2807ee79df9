"""Optimiser and learning-rate schedule, set from the config (one `OptimConfig` per trained model)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn

from dvpo_lightning.rl import clip_grad_norms

OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor")
SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine_with_min_lr"}


@dataclass
class OptimConfig:
    """Optimiser and schedule of one trained model.

    Args:
        lr: peak learning rate.
        optimizer: adamw, adam, sgd or adafactor (transformers' Adafactor with a fixed learning rate, as in
            the DVPO reference).
        weight_decay: applied to matrices only (not to biases and norms).
        betas: Adam betas.
        eps: Adam epsilon.
        scheduler: constant, linear (decay to 0) or cosine (decay to `min_lr_ratio * lr`), each after a linear
            warm-up.
        warmup_ratio: fraction of the optimiser steps spent warming up.
        min_lr_ratio: floor of the cosine schedule, as a fraction of `lr`.
    """

    lr: float = 1e-5
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULES)}; got {self.scheduler!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        # torch checks these only when the optimiser is built, after every model has loaded.
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}")
        if not all(0.0 <= beta < 1.0 for beta in self.betas) or not self.eps > 0.0:
            raise ValueError(f"betas must be in [0, 1) and eps > 0; got betas={self.betas}, eps={self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1]; got {self.min_lr_ratio}")


def trainable_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, split so that biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(groups: Iterable[dict], config: OptimConfig) -> torch.optim.Optimizer:
    groups = list(groups)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr)
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=config.lr, scale_parameter=False, relative_step=False, warmup_init=False)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers.optimization import get_scheduler

    extra = {"min_lr_rate": config.min_lr_ratio} if config.scheduler == "cosine" else None
    return get_scheduler(
        SCHEDULES[config.scheduler],
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
        scheduler_specific_kwargs=extra,
    )


def check_inner_epochs(inner_epochs: int, max_grad_norm: float | None) -> None:
    """Refuse fewer than one optimiser step per batch, or a manual clip where Lightning steps (and clips) itself."""
    if inner_epochs < 1:
        raise ValueError(f"inner_epochs must be >= 1; got {inner_epochs}")
    if max_grad_norm is not None and inner_epochs == 1:
        raise ValueError(
            f"max_grad_norm={max_grad_norm} clips the steps of inner_epochs > 1; with one step per batch Lightning "
            "clips: set trainer.gradient_clip_val instead"
        )


def step_manually(
    module: pl.LightningModule, max_grad_norm: float | None, norms_of: dict[str, nn.Module] | None = None
) -> dict[str, float]:
    """One optimiser step of a module that optimises manually: clip, step, zero the gradients, step the schedule.

    With `norms_of` (metric name -> model) each model's gradient norm is clipped on its own and the norms before
    clipping are returned. Without it Lightning's `clip_gradients` clips all trained parameters together, which
    FSDP1 (`FSDPStrategy`) needs: there a parameter's gradient is a local shard, and only the FSDP root knows the norm.
    """
    optimizer, scheduler = module.optimizers(), module.lr_schedulers()
    norms = {}
    if norms_of is not None:
        norms = clip_grad_norms(norms_of, max_grad_norm)
    elif max_grad_norm is not None:
        module.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norms


def steps_on_one_batch(
    module: pl.LightningModule,
    steps: int,
    max_grad_norm: float | None,
    step_loss: Callable[[], tuple[torch.Tensor, dict]],
) -> tuple[torch.Tensor, dict]:
    """Up to `steps` optimiser steps on one batch (`step_loss()` gives each step's loss and stats), fewer where the
    run's `trainer.max_steps` ends inside them; returns the first step's loss (detached) and stats: the loss before
    this batch's updates, as automatic optimisation logs it."""
    first = None
    for _ in range(steps):
        loss, stats = step_loss()
        module.manual_backward(loss)
        step_manually(module, max_grad_norm)
        first = first or (loss.detach(), stats)
        if 0 < module.trainer.max_steps <= module.global_step:
            break
    return first


def schedule_length(trainer: pl.Trainer, steps_per_batch: Callable[[], int]) -> int:
    """The optimiser steps a learning-rate schedule spans: `--trainer.max_steps` when set (it counts optimiser steps
    in every stage), else the fit's batches times `steps_per_batch()` (called only then)."""
    if trainer.max_steps > 0:
        return trainer.max_steps
    return int(trainer.estimated_stepping_batches * steps_per_batch())
