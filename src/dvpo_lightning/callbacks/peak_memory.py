"""PeakMemoryMonitor: the peak memory of every training step and RL phase, and of the whole fit."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from dvpo_lightning.callbacks.cadence import LogCadence, is_accumulating
from dvpo_lightning.callbacks.memory_probes import make_probe
from dvpo_lightning.callbacks.reports import print_table, run_dir, write_json

Peaks = dict[str, float]  # metric name -> GiB


def _raise_to(peaks: Peaks, new: Peaks) -> None:
    """Raise every entry of `peaks` to at least the one of `new` (missing entries count as -inf)."""
    for name, value in new.items():
        peaks[name] = max(peaks.get(name, value), value)


class PeakMemoryMonitor(Callback):
    """Logs the peak memory of each training step and of each RL phase, and summarises the fit.

    What is measured (see `memory_probes` for the exact methods):

    - CUDA device: `perf/max_memory_allocated_gb` and `perf/max_memory_reserved_gb`, from the caching
      allocator (`torch.cuda.max_memory_*`), absolute.
    - any other device: `perf/rss_gb`, the process's resident memory at the end of the step, and
      `perf/peak_rss_above_baseline_gb`, the peak resident memory during the step minus the resident memory at
      fit start (taken in `on_fit_start`, model on its device). On Linux the peak is the kernel's high-water mark
      (`VmHWM`, reset through `/proc/self/clear_refs`), which misses nothing; elsewhere a psutil thread samples
      the RSS every 5 ms and can miss a shorter spike. `summary["method"]` says which was used.

    A step is `on_train_batch_start` to `on_train_batch_end` (for on-policy modules: one RL iteration with all its
    optimiser steps). What happens between steps (data loading, validation, checkpointing) counts towards the fit's
    overall peak only. The peak is read and reset at every step and phase boundary and credited to everything open
    at the time, so phases never hide a step's peak from it.

    Phases of an RL iteration: on-policy modules call `on_rl_phase_start(trainer, pl_module, phase)` and `on_rl_phase_end(...)` around
    "generate", "score" and "update"; the monitor logs `perf/<phase>/<peak metric>` at each phase end (CUDA:
    `perf/<phase>/max_memory_allocated_gb` and `..._reserved_gb`; otherwise `perf/<phase>/peak_rss_above_baseline_gb`).

    Logging: on the trainer's logging steps (or every `log_every_n_steps`, a multiple of the trainer's), each value
    is the peak over the steps since the previous logged value, so with `log_every_n_steps=1` it is that step's own
    peak. Values are logged with `sync_dist=True, reduce_fx="max"`: with several processes, the largest of them.

    At the end of fit, `summary` (a dict) holds the peak over the whole fit, overall and per phase (a phase run
    outside a training step, e.g. generation during validation, counts too), is printed as a table on rank zero
    and written to `<run folder>/peak_memory.json` (`reports.run_dir`). It is this process's (rank zero's).
    Runs other than `fit` (validate, test, predict) are not measured.

    Args:
        log_every_n_steps: log every this many training steps; None follows `Trainer(log_every_n_steps)`.
        reset_each_step: reset the peak at every step and phase boundary (as described). With False the peak is
            reset once at fit start, each logged value is the running peak of the fit, and phases are not measured
            (a phase's peak needs a reset); use it when other code reads the same peak statistics.
    """

    def __init__(self, log_every_n_steps: int | None = None, reset_each_step: bool = True) -> None:
        self._cadence = LogCadence(type(self).__name__, log_every_n_steps)
        self.reset_each_step = reset_each_step
        self.summary: dict[str, Any] = {}
        self._probe = None
        self._warned_no_phases = False
        self._in_step = False
        self._steps = 0
        self._window: Peaks = {}  # the steps since the last logged value
        self._phase_windows: dict[str, Peaks] = {}  # each phase, same steps
        self._open_phases: dict[str, Peaks] = {}  # phases started and not yet ended
        self._fit: dict[str, Peaks] = {}  # "overall" and each phase, whole fit

    # ---- fit ---------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._cadence.bind(trainer)
        self._summary_path = run_dir(trainer) / "peak_memory.json"
        self._probe = make_probe(trainer.strategy.root_device)
        self._probe.start()
        self.summary = {}
        self._in_step = False
        self._steps = 0
        self._window, self._phase_windows, self._open_phases = {}, {}, {}
        self._fit = {"overall": {}}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold()
        self.summary = {
            "device": str(trainer.strategy.root_device),
            **self._probe.describe(),
            "unit": "GiB",
            "process_rank": trainer.global_rank,
            "training_steps": self._steps,
            "overall": self._fit["overall"],
            "phases": {phase: peaks for phase, peaks in self._fit.items() if phase != "overall"},
        }
        write_json(self._summary_path, self.summary)
        rows = {
            f"{scope}/{name}": value for scope, peaks in self._fit.items() for name, value in peaks.items()
        }
        print_table(f"Peak memory over the fit: {self.summary['method']}", rows)
        self._stop_probe()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_probe()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._stop_probe()

    def _stop_probe(self) -> None:
        if self._probe is not None:
            self._probe.stop()

    # ---- steps -------------------------------------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._fold()  # closes the time between steps, which counts for the fit only
        self._in_step = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._fold()
        self._in_step = False
        if is_accumulating(trainer):
            return
        self._steps += 1
        if not self._cadence.is_due(trainer):
            return
        for name, value in {**self._window, **self._probe.current()}.items():
            self._log(pl_module, f"perf/{name}", value)
        self._window, self._phase_windows = {}, {}

    # ---- RL phases ---------------------------------------------------------------------------------------------

    def on_rl_phase_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str) -> None:
        if not self._measures_phases():
            return
        _check_phase_name(phase)
        if phase in self._open_phases:
            raise RuntimeError(f"on_rl_phase_start({phase!r}): phase {phase!r} is already running")
        self._fold()
        self._open_phases[phase] = {}

    def on_rl_phase_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, phase: str) -> None:
        if not self._measures_phases():
            return
        if phase not in self._open_phases:
            raise RuntimeError(f"on_rl_phase_end({phase!r}) without a matching on_rl_phase_start({phase!r})")
        self._fold()
        peaks = self._open_phases.pop(phase)
        _raise_to(self._fit.setdefault(phase, {}), peaks)
        if not (self._in_step and trainer.training):
            return
        phase_window = self._phase_windows.setdefault(phase, {})
        _raise_to(phase_window, peaks)
        if self._cadence.is_due(trainer):
            for name, value in phase_window.items():
                self._log(pl_module, f"perf/{phase}/{name}", value)

    def _measures_phases(self) -> bool:
        if self._probe is None:  # not inside fit
            return False
        if not self.reset_each_step:
            if not self._warned_no_phases:
                rank_zero_warn("PeakMemoryMonitor(reset_each_step=False) does not measure RL phases")
                self._warned_no_phases = True
            return False
        return True

    # ---- the ledger --------------------------------------------------------------------------------------------

    def _fold(self) -> None:
        """Read the peak since the last reset, credit it to the fit, the open step and open phases; reset."""
        peak = self._probe.peak()
        if self.reset_each_step:
            self._probe.reset()
        _raise_to(self._fit["overall"], peak)
        if self._in_step:
            _raise_to(self._window, peak)
        for phase_peaks in self._open_phases.values():
            _raise_to(phase_peaks, peak)

    @staticmethod
    def _log(pl_module: pl.LightningModule, name: str, value: float) -> None:
        pl_module.log(
            name, value, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max", batch_size=1
        )


def _check_phase_name(phase: Any) -> None:
    if not isinstance(phase, str) or not phase or "/" in phase:
        raise ValueError(f"an RL phase name must be a non-empty string without '/', got {phase!r}")
