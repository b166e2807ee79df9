"""NonFiniteGuard: an optimiser step never applies a NaN or inf, and a run that keeps producing them stops."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss, input or gradient."""


class NonFiniteGuard(Callback):
    """Skips every optimiser step that would apply a NaN or inf, and stops the run after too many in a row.

    Just before each optimiser step (Lightning's `on_before_optimizer_step`, called for automatic optimisation and
    for the on-policy modules' manual steps alike) the guard looks at

    - every loss backpropagated since the previous step (`on_before_backward`): "loss";
    - what the module found non-finite in the current batch, the names in `pl_module.nonfinite_quantities`
      (the on-policy modules report "rewards", "values", "advantages" and "returns" of their rollout);
    - the gradients of every trained submodule: "gradients of policy", "gradients of critic_model", ...

    If any of them is non-finite on any process, every gradient of the step's optimiser is dropped (set to None),
    so the optimiser leaves those parameters and its own state (moments, step counts) untouched. The step still
    counts, as a step that AMP's gradient scaler skips does: the global step and the learning-rate schedule
    advance, so `max_steps` and the schedule keep their meaning. Each skip is a warning naming what went bad and
    the global step; `train/skipped_steps` logs how many steps were skipped so far. The `max_consecutive_skips`-th
    skipped step in a row raises `NonFiniteError` with the same facts.

    Under 16-bit mixed precision Lightning's gradient scaler already skips steps with inf gradients (that is how it
    finds its scale), so gradients are then left to it; losses and module quantities are still checked.

    Args:
        max_consecutive_skips: the run stops when this many optimiser steps in a row were skipped.
    """

    def __init__(self, max_consecutive_skips: int = 10) -> None:
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int):
            raise ValueError(f"max_consecutive_skips must be an integer; got {max_consecutive_skips!r}")
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1; got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self.consecutive = 0
        self._bad_loss = False

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._bad_loss = self._bad_loss or not bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        bad = list(getattr(pl_module, "nonfinite_quantities", ()))  # in the order they arise
        bad += ["loss"] if self._bad_loss else []
        self._bad_loss = False
        parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            bad += nonfinite_gradients(pl_module, parameters)
        if not trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            self.consecutive = 0
        else:
            for parameter in parameters:
                parameter.grad = None
            self.skipped += 1
            self.consecutive += 1
            what = ", ".join(bad) or "values on another process"
            step = trainer.global_step
            if self.consecutive >= self.max_consecutive_skips:
                raise NonFiniteError(
                    f"{self.consecutive} optimiser steps in a row had non-finite values (max_consecutive_skips="
                    f"{self.max_consecutive_skips}); the last, at global step {step}: non-finite {what}. Look for "
                    "NaN/inf in the data and the models, lower the learning rate, or raise "
                    "--nonfinite.max_consecutive_skips."
                )
            rank_zero_warn(
                f"Global step {step}: non-finite {what}; the optimiser step is skipped ({self.consecutive} in a "
                f"row; the run stops at {self.max_consecutive_skips})"
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Logged here, not at the step: a log from another hook inside a manual training_step makes Lightning drop
        # what training_step logged before it on the first batch of an epoch.
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.consecutive = state_dict["skipped"], state_dict["consecutive"]


def nonfinite_gradients(module: torch.nn.Module, parameters: list[torch.nn.Parameter]) -> list[str]:
    """The "gradients of <child>" of each child of `module` with a non-finite gradient among `parameters`."""
    if not parameters or all_finite([p.grad for p in parameters]):
        return []  # one check (one device sync) in the usual case; names only when something is wrong
    owner = {id(p): name for name, child in module.named_children() for p in child.parameters()}
    grads: dict[str, list[torch.Tensor]] = {}
    for parameter in parameters:
        grads.setdefault(owner.get(id(parameter), type(module).__name__), []).append(parameter.grad)
    return [f"gradients of {name}" for name, group in grads.items() if not all_finite(group)]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (a sharded DTensor is checked on this process's shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all())
