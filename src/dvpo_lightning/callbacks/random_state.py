"""RandomState: the random state of every process in each checkpoint, restored on resume.

On-policy stages sample their rollouts and shuffle their mini-batches with the global random generators, so a
resumed run only repeats the interrupted one if it continues from the same random state. Lightning saves the
step counters, optimisers, schedulers and the data position, but not that state.

What the state is: torch's CPU generator, the CUDA generator of the process's device, numpy's and Python's
`random`, per process (each rank has its own: they draw different amounts).

Where it is taken and given back matters as much. Training's random stream starts at fit start and advances
only inside training batches: the state at the end of a batch is put aside and set again when the next batch
starts. Whatever runs in between (validation sampling answers, a new epoch's data iterator drawing its seed, the
sanity check, other callbacks) runs on a copy, and a checkpoint holds exactly the state the next batch starts
from. A resumed run sets it at its first batch, whatever Lightning did before (building the iterator, running
the validation that followed the checkpoint), so it repeats the interrupted run; and validating more or less
often never changes training's numbers.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

State = dict[str, Any]


def collect_random_state(device: torch.device) -> State:
    """This process's generators: torch CPU, CUDA of `device` (when it is a CUDA device), numpy, Python.

    Only tensors, numbers, strings and tuples, so that checkpoints load with torch's `weights_only=True`.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state: State = {
        "torch": torch.get_rng_state(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: State, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class RandomState(Callback):
    """Keeps training's random stream to training batches and saves it in every checkpoint (module docstring).

    The checkpoint holds `{"ranks": [state of rank 0, state of rank 1, ...]}` (gathered from every process when
    the checkpoint is written). A run resumed on fewer processes takes the first states; one resumed on more
    keeps its seeded state on the extra ranks, with a warning.
    """

    def __init__(self) -> None:
        self._device = torch.device("cpu")  # the process's device, known at setup
        self._training: State | None = None  # the state the next training batch starts from

    # ------------------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, list[State]]:
        # Lightning builds the checkpoint on every process at once, so all of them take part in the gather.
        local = self._training if self._training is not None else collect_random_state(self._device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[State | None] = [None] * dist.get_world_size()
            dist.all_gather_object(states, local)
            return {"ranks": states}
        return {"ranks": [local]}

    def load_state_dict(self, state_dict: dict[str, list[State]]) -> None:
        states = state_dict["ranks"]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank < len(states):
            self._training = states[rank]
        else:
            rank_zero_warn(
                f"The checkpoint holds the random state of {len(states)} processes; the extra processes of this run "
                "continue from their seeded state, so it will not repeat the interrupted run exactly"
            )

    # ----------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training is None:  # not resuming (Lightning restores callbacks before this hook)
            self._training = collect_random_state(self._device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._training is not None:
            restore_random_state(self._training, self._device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Runs before ModelCheckpoint's hook (Lightning calls checkpoint callbacks last), so its save holds this.
        self._training = collect_random_state(self._device)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = None  # a later fit with this callback starts afresh

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._training = None
