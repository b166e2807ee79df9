"""When a callback acts: training steps counted the way Lightning counts its logging steps.

Lightning writes a value logged with `LightningModule.log(on_step=True)` to the loggers only on its own
logging steps (every `Trainer(log_every_n_steps)` training steps). A monitor that wants its numbers to reach
the logs must therefore log on those steps, and what it logs there should cover every step since its previous
logged value, not just the last one. `LogCadence` answers "is this step a logging step?" for that.

A *training step* is one batch that ends in an optimiser step: with gradient accumulation, the last
micro-batch of an accumulation window; for the on-policy modules (manual optimisation), one RL iteration.
`trainer.global_step` counts optimiser steps instead (several per RL iteration), so it cannot be used here.
"""

from __future__ import annotations

import lightning.pytorch as pl


def training_step_number(trainer: pl.Trainer) -> int:
    """1-based number of the current training step (valid from `on_train_batch_start` to `on_train_batch_end`)."""
    # Lightning's own logging decision (LoggerConnector.should_update_logs) reads this counter; no public one exists.
    return trainer.fit_loop.epoch_loop._batches_that_stepped + 1


def is_accumulating(trainer: pl.Trainer) -> bool:
    """True on a micro-batch that does not end in an optimiser step (gradient accumulation)."""
    return trainer.fit_loop._should_accumulate()


def check_every_n_steps(owner: str, every_n_steps: int | None) -> None:
    """Refuse a step interval that is not a positive whole number (None is allowed: 'follow the trainer')."""
    if every_n_steps is None:
        return
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"{owner}: the step interval must be a positive integer, got {every_n_steps!r}")


class LogCadence:
    """Decides the training steps on which a monitor logs, in step with the trainer's writes to the loggers.

    `every_n_steps=None` follows `Trainer(log_every_n_steps)`. A given value must be a multiple of the
    trainer's, otherwise some of the monitor's values would be logged on steps the trainer never writes.
    """

    def __init__(self, owner: str, every_n_steps: int | None) -> None:
        check_every_n_steps(owner, every_n_steps)
        self.owner = owner
        self.every_n_steps = every_n_steps
        self._interval = 0  # 0: never log (the trainer writes no step logs)

    def bind(self, trainer: pl.Trainer) -> None:
        """Resolve the interval against the trainer (call at fit start)."""
        trainer_interval = trainer.log_every_n_steps
        if self.every_n_steps is not None and trainer_interval and self.every_n_steps % trainer_interval:
            raise ValueError(
                f"{self.owner}(log_every_n_steps={self.every_n_steps}) must be a multiple of "
                f"Trainer(log_every_n_steps={trainer_interval}): Lightning writes logged values only on its own "
                "logging steps"
            )
        self._interval = (self.every_n_steps or trainer_interval) if trainer_interval else 0

    def is_due(self, trainer: pl.Trainer) -> bool:
        """True if the current training step is one on which the monitor logs."""
        if not self._interval or is_accumulating(trainer):
            return False
        return (
            training_step_number(trainer) % self._interval == 0
            or trainer.should_stop
            or bool(trainer.fast_dev_run)
        )
