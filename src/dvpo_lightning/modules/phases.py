"""Timing the phases of an RL iteration ("generate", "score", "update") and telling callbacks about them.

Callbacks that define `on_rl_phase_start(trainer, module, phase)` / `on_rl_phase_end(...)` (the peak memory monitor
does) are called around each phase; its wall time is kept in `module.phase_seconds[phase]` and logged as `time/<phase>`.
"""

from __future__ import annotations

import contextlib
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info


@contextlib.contextmanager
def timed_phase(module: pl.LightningModule, name: str):
    callbacks = module.trainer.callbacks if module._trainer is not None else []
    for callback in callbacks:
        if hasattr(callback, "on_rl_phase_start"):
            callback.on_rl_phase_start(module.trainer, module, name)
    start = time.perf_counter()
    try:
        yield
    finally:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        module.phase_seconds[name] = time.perf_counter() - start
        for callback in callbacks:
            if hasattr(callback, "on_rl_phase_end"):
                callback.on_rl_phase_end(module.trainer, module, name)


def split_warmup(phase_seconds: dict[str, float], seconds: float, backend: str) -> None:
    """Move a rollout backend's compile and warm-up time out of this iteration's `generate` time into `compile`
    (there only in the iterations that compiled; `sampling.backend: compiled`)."""
    phase_seconds.pop("compile", None)
    if seconds > 0:
        phase_seconds["generate"] -= seconds
        phase_seconds["compile"] = seconds
        rank_zero_info(f"sampling.backend={backend}: compiled and warmed up in {seconds:.1f} s")
