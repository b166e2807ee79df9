"""ThroughputMonitor: tokens and samples per second of the training steps, per step, per epoch and over the fit."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import Callback

# Lightning's own mapping from a precision plugin to the dtype its matmuls run in (no public equivalent).
from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

from dvpo_lightning.callbacks.cadence import LogCadence, is_accumulating
from dvpo_lightning.callbacks.reports import print_table, run_dir, write_json
from dvpo_lightning.callbacks.work_counts import Tally, count_work


class ThroughputMonitor(Callback):
    """Logs `perf/samples_per_sec`, `perf/tokens_per_sec` and, where known, `perf/mfu` of the training steps.

    Time: a step's time runs from `on_train_batch_start` to `on_train_batch_end` (`time.perf_counter`, after
    `torch.cuda.synchronize` on a CUDA device): forward, backward and optimiser step, or for an on-policy module
    the whole RL iteration. Data loading, validation and checkpointing are left out; the first steps' warm-up is
    in. `summary["fit_wall_seconds"]` gives the wall time of the whole fit beside it.

    Counts: see `work_counts` (the training_step output's `num_samples` / `num_tokens` if present, else the
    batch's first dimension and the sum of its `*_mask` tensors).

    MFU (model FLOPs utilisation) is reported on a CUDA device whose peak Lightning knows
    (`get_available_flops`, for the trainer's precision) when the module has a `flops_per_batch` attribute
    (FLOPs of one training step, e.g. from `lightning.fabric.utilities.throughput.measure_flops`).

    Logging: on the trainer's logging steps (or every `log_every_n_steps`, a multiple of the trainer's), each rate
    covers the steps since the previous logged value (`log_every_n_steps=1`: that step alone). At each epoch end,
    `perf/epoch_samples_per_sec` etc. cover the epoch. With several processes the rates are summed over them
    (global throughput) and MFU is averaged. At the end of fit, `summary` (a dict: this process's totals and
    rates over the fit) is printed on rank zero and written to `<run folder>/throughput.json` (`reports.run_dir`).

    Args:
        log_every_n_steps: log every this many training steps; None follows `Trainer(log_every_n_steps)`.
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self._cadence = LogCadence(type(self).__name__, log_every_n_steps)
        self.summary: dict[str, Any] = {}
        self.available_flops: float | None = None
        self._device = torch.device("cpu")
        self._step_start = 0.0
        self._steps = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cadence.bind(trainer)
        self._summary_path = run_dir(trainer) / "throughput.json"
        self._device = trainer.strategy.root_device
        self.available_flops = None
        if self._device.type == "cuda":
            self.available_flops = get_available_flops(
                self._device, _plugin_to_compute_dtype(trainer.precision_plugin)
            )
        self.summary = {}
        self._steps = 0
        self._window, self._epoch, self._fit = Tally(), Tally(), Tally()
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = Tally()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_start = self._now()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        seconds = self._now() - self._step_start
        samples, tokens = count_work(outputs, batch)
        flops = getattr(pl_module, "flops_per_batch", None)
        for tally in (self._window, self._epoch, self._fit):
            tally.add(seconds, samples, tokens, flops)
        if is_accumulating(trainer):
            return
        self._steps += 1
        if self._cadence.is_due(trainer):
            for name, value in self._window.rates(self.available_flops).items():
                pl_module.log(f"perf/{name}", value, on_step=True, on_epoch=False, **_across_processes(name))
            self._window = Tally()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in self._epoch.rates(self.available_flops).items():
            pl_module.log(
                f"perf/epoch_{name}", value, on_step=False, on_epoch=True, **_across_processes(name)
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.summary = {
            "device": str(self._device),
            "process_rank": trainer.global_rank,
            "training_steps": self._steps,
            "samples": self._fit.samples,
            "tokens": self._fit.tokens,
            "train_step_seconds": self._fit.seconds,
            "fit_wall_seconds": time.perf_counter() - self._fit_start,
            **self._fit.rates(self.available_flops),
        }
        write_json(self._summary_path, self.summary)
        print_table("Throughput over the fit (training steps only)", self.summary)

    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # queued kernels belong to the step that launched them
        return time.perf_counter()


def _across_processes(rate_name: str) -> dict[str, Any]:
    """How a rate combines over processes: throughputs add up, utilisation is averaged."""
    return {"sync_dist": True, "reduce_fx": "mean" if rate_name == "mfu" else "sum", "batch_size": 1}
