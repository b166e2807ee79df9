"""Devices, trainers and clocks shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {DEVICES}; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def accelerator(device: torch.device) -> str:
    """Lightning's name of the accelerator for `device`."""
    return "gpu" if device.type == "cuda" else "cpu"


def bare_trainer(device: torch.device, root: Path, max_steps: int, callbacks: list, **options) -> pl.Trainer:
    """A Lightning Trainer that does the optimisation and nothing else: no logger, checkpoints, progress bar,
    model summary or validation, so that what a benchmark times is the training itself."""
    return pl.Trainer(
        accelerator=accelerator(device),
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
        callbacks=callbacks,
        **options,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating(names: Iterable[str], round_index: int) -> list[str]:
    """`names` in order on even rounds and reversed on odd ones: measurements that take turns this way share
    the slow spells of a busy machine instead of one of them getting all of a spell."""
    return list(names) if round_index % 2 == 0 else list(names)[::-1]


class StepClock(Callback):
    """Clock of every training step: `durations` (batch start to batch end: forward, backward, optimiser) and
    `intervals` (from one batch end to the next: also data loading and Lightning's own work between steps).

    For on-policy modules a step is one RL iteration; `stages` then holds a copy of the module's
    `phase_seconds` (generate, score, update) of each iteration. `first_loss` is the loss of the first step;
    `tokens` the real tokens of each step that reports them (`num_tokens`).
    """

    def __init__(self) -> None:
        self.durations: list[float] = []
        self.intervals: list[float] = []
        self.stages: list[dict[str, float]] = []
        self.first_loss: float | None = None
        self.tokens: list[int] = []
        self._start = 0.0
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        synchronize(pl_module.device)
        now = time.perf_counter()
        self.durations.append(now - self._start)
        if self._last_end is not None:
            self.intervals.append(now - self._last_end)
        self._last_end = now
        self.stages.append(dict(getattr(pl_module, "phase_seconds", {})))
        if not isinstance(outputs, dict):
            return
        if self.first_loss is None and "loss" in outputs:
            self.first_loss = float(outputs["loss"])
        if "num_tokens" in outputs:
            self.tokens.append(int(outputs["num_tokens"]))
