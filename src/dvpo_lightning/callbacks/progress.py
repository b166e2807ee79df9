"""Progress of a fit with true totals: plain lines for log files, the rich bar for terminals.

Two counters describe a fit. A *step* is an optimiser step (`trainer.global_step`, what `--trainer.max_steps`
budgets). An *iteration* is a training step in the sense of `cadence`: a batch that ends in an optimiser step,
or for an on-policy module one RL iteration, which makes several optimiser steps (its
`optimizer_steps_per_iteration()`). Lightning's own bar counts batches against `max_steps`, which for an
on-policy stage ends at `1/4` or `200/220`, and shows `Epoch 0/-2` when the run is bounded by steps; `RunLength`
works out how many iterations, steps and epochs the fit really makes, and both bars below count against it.

`ProgressLines` is the bar of a run whose output is not a terminal (`nohup`, a cluster job's log): it prints one
flushed line every `every_n_iterations` iterations, one after each validation with its metrics, and one per saved
checkpoint, so a log file follows the run while it goes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from dvpo_lightning.callbacks.cadence import check_every_n_steps, is_accumulating


@dataclass(frozen=True)
class RunLength:
    """How long a fit is, from the trainer's limits and the module; None where nothing bounds it."""

    iterations: int | None
    steps: int | None
    epochs: int | None
    iterations_per_epoch: int | None
    steps_per_iteration: int | None

    @classmethod
    def of(cls, trainer: pl.Trainer, module: pl.LightningModule) -> RunLength:
        per_iteration = 1 if module.automatic_optimization else manual_steps_per_iteration(module)
        batches = trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None
        bounds = []
        if trainer.max_steps is not None and trainer.max_steps > 0 and per_iteration is not None:
            bounds.append(math.ceil(trainer.max_steps / per_iteration))
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and per_epoch is not None:
            bounds.append(per_epoch * trainer.max_epochs)
        iterations = min(bounds) if bounds else None
        steps = epochs = None
        if iterations is not None:
            epochs = math.ceil(iterations / per_epoch) if per_epoch else None
            if per_iteration is not None:
                steps = iterations * per_iteration
                if trainer.max_steps is not None and trainer.max_steps > 0:
                    steps = min(steps, trainer.max_steps)
        return cls(iterations, steps, epochs, per_epoch, per_iteration)


def manual_steps_per_iteration(module: pl.LightningModule) -> int | None:
    """Optimiser steps per training step of a module that optimises by hand: its `optimizer_steps_per_iteration()`
    (the on-policy modules'), None when it has none or cannot tell (no data module to size a rollout from)."""
    steps_per_iteration = getattr(module, "optimizer_steps_per_iteration", None)
    if steps_per_iteration is None:
        return None
    try:
        return steps_per_iteration()
    except ValueError:
        return None


def iterations_done(trainer: pl.Trainer, batch_running: bool = False) -> int:
    """Iterations completed so far, resumed ones included.

    Lightning counts a batch that stepped (`_batches_that_stepped`, also the step of logged values) only after its
    `on_train_batch_end` hooks and the validation that follows it: `batch_running` counts that batch already.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped + int(batch_running)


def _of(done: int, total: int | None) -> str:
    return f"{done}/{total}" if total is not None else str(done)


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


def _number(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class ProgressLines(ProgressBar):
    """Plain, flushed progress lines on stdout for runs whose output goes to a file (see the module docstring).

    A training line: the time, `step` (optimiser steps, of the total), `iteration`, `epoch`, the module's progress
    bar metrics (what it logs with `prog_bar=True`: the stage's key metrics), the rate in iterations per second
    (seconds per iteration when slower) and the ETA, both over this process's iterations so far (validation
    included). A validation line lists every metric whose name starts with `val`; a checkpoint line the files
    written.

    Args:
        every_n_iterations: print a training line every this many iterations (and after the first and the last);
            None follows `Trainer(log_every_n_steps)`.
    """

    def __init__(self, every_n_iterations: int | None = None) -> None:
        super().__init__()
        check_every_n_steps("ProgressLines(every_n_iterations)", every_n_iterations)
        self.every_n_iterations = every_n_iterations
        self._enabled = True
        self._checkpoint_step: int | None = None

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.length = RunLength.of(trainer, pl_module)
        self._interval = self.every_n_iterations or trainer.log_every_n_steps or 1
        self._start_time = time.monotonic()
        self._start_iterations = iterations_done(trainer)
        length = self.length
        self._print(
            f"training {type(pl_module).__name__}: {length.iterations or '?'} iterations of "
            f"{length.steps_per_iteration or '?'} optimiser step(s), {length.steps or '?'} steps, "
            f"{length.epochs or '?'} epoch(s)"
            + (f"; resumed after iteration {self._start_iterations}" if self._start_iterations else "")
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._report_checkpoint(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_accumulating(trainer):
            return
        done = iterations_done(trainer, batch_running=True)
        if done - self._start_iterations == 1 or done % self._interval == 0 or done == self.length.iterations:
            self._print(self._training_line(trainer, pl_module, done))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {name: value for name, value in trainer.callback_metrics.items() if name.startswith("val")}
        where = ""
        if trainer.state.fn == TrainerFn.FITTING:
            where = (
                f" at step {trainer.global_step}, iteration {iterations_done(trainer, batch_running=True)}"
            )
        listed = " | ".join(f"{name} {_number(value)}" for name, value in sorted(metrics.items()))
        self._print(f"validation{where}: {listed or 'no metrics'}")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        # Called while the checkpoint is being assembled: the files exist at the next hook.
        self._checkpoint_step = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_checkpoint(trainer)
        self._print(
            f"training done: step {_of(trainer.global_step, self.length.steps)}, iteration "
            f"{_of(iterations_done(trainer), self.length.iterations)} in "
            f"{_duration(time.monotonic() - self._start_time)}"
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._report_checkpoint(trainer)  # checkpoints saved when training ended

    def _report_checkpoint(self, trainer: pl.Trainer) -> None:
        if self._checkpoint_step is None:
            return
        paths = dict.fromkeys(
            path
            for callback in trainer.checkpoint_callbacks
            for path in (callback.best_model_path, callback.last_model_path)
            if path
        )
        self._print(f"checkpoint at step {self._checkpoint_step}: {', '.join(paths) or 'saved'}")
        self._checkpoint_step = None

    def _training_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, done: int) -> str:
        length = self.length
        step = trainer.global_step
        parts = [
            f"step {_of(step, length.steps)}" + (f" ({step / length.steps:.0%})" if length.steps else "")
        ]
        parts.append(f"iteration {_of(done, length.iterations)}")
        parts.append(f"epoch {_of(trainer.current_epoch + 1, length.epochs)}")
        metrics = self.get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        parts += [f"{name} {_number(value)}" for name, value in metrics.items()]
        elapsed = time.monotonic() - self._start_time
        rate = (done - self._start_iterations) / elapsed if elapsed > 0 else math.inf
        parts.append(f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it")
        if length.iterations is not None:
            parts.append(f"elapsed {_duration(elapsed)}")
            parts.append(f"ETA {_duration(max(length.iterations - done, 0) / rate)}")
        return " | ".join(parts)

    def _print(self, line: str) -> None:
        if self._enabled:  # Lightning disables the bar on every process but rank zero
            stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            print(f"[{stamp}] {line}", flush=True)


class TotalsRichProgressBar(RichProgressBar):
    """Lightning's rich bar, counting training batches against what the fit really runs (see `RunLength`).

    The training bar's total is the batches this epoch will really run, and its title `Epoch e/E` counts epochs
    from 1 against the fit's number of epochs.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.length: RunLength | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.length = RunLength.of(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if self.length is None or self.length.iterations is None:
            return trainer.num_training_batches
        done = iterations_done(trainer)
        done_in_epoch = done % self.length.iterations_per_epoch if self.length.iterations_per_epoch else 0
        batches = (done_in_epoch + self.length.iterations - done) * trainer.accumulate_grad_batches
        return min(trainer.num_training_batches, batches)

    def _get_train_description(self, current_epoch: int) -> str:
        description = f"Epoch {_of(current_epoch + 1, self.length.epochs if self.length else None)}"
        return f"{description:{len(self.validation_description)}}"
