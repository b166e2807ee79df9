"""torch's CPU threads per process: a share of this machine's cores, said at start-up and settable.

torch starts one intra-op thread per core in every process. Several ranks on one machine then run processes x
cores threads, which spin-wait on each other: an iteration that takes 0.25 s alone took 13.7 s beside another
job on 2 cores. A `dvpo` command therefore gives each process `cores // processes` threads (at least one), where
`cores` are the cores this process may run on (its CPU affinity) and `processes` the ranks on this machine: the
launcher's `LOCAL_WORLD_SIZE` (torchrun) or `SLURM_NTASKS_PER_NODE` (srun), else the devices Lightning starts
here (`--trainer.devices` processes on a CPU, one per GPU). `--threads N` chooses N; `OMP_NUM_THREADS`, when
set, is taken as the user's choice too. Other jobs on the machine cannot be seen: lower `--threads` beside them.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes(trainer: dict[str, Any]) -> int:
    """How many processes of the run share this machine (see the module docstring)."""
    for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        match = re.match(r"\d+", os.environ.get(variable, ""))  # SLURM writes e.g. "8(x2)"
        if match:
            return max(int(match.group()), 1)
    devices = trainer.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        return max(len(devices), 1)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if isinstance(devices, int) and devices > 0:
        return devices
    accelerator = trainer.get("accelerator") or "auto"
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def choose_threads(requested: int | None, trainer: dict[str, Any]) -> tuple[int, str]:
    """The thread count for this process and why it was chosen."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1; got {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(int(os.environ["OMP_NUM_THREADS"]), 1), "OMP_NUM_THREADS"
    cores, processes = available_cores(), local_processes(trainer)
    return max(cores // processes, 1), f"{cores} cores / {processes} process(es) on this machine"


def set_threads(requested: int | None, trainer: dict[str, Any]) -> int:
    """Set torch's intra-op thread count (see the module docstring) and say so; returns it."""
    threads, reason = choose_threads(requested, trainer)
    torch.set_num_threads(threads)
    rank_zero_info(f"torch CPU threads per process: {threads} ({reason}; --threads N sets it)")
    return threads
