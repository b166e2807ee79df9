"""Checkpoint files that are either complete or absent, whenever the process dies.

Lightning's `TorchCheckpointIO` serialises the checkpoint in memory and then writes it through an fsspec
transaction, which for local files writes into the system's temporary directory and moves the file to its path.
When the temporary directory is on another filesystem (a tmpfs `/tmp`, a scratch disk) that move is a copy into
the final path, and a process killed during it leaves a truncated `last.ckpt`; nothing is flushed to disk either,
so a machine crash can leave a file of the right size with missing data.

`AtomicCheckpointIO` streams the checkpoint into a hidden temporary file in the checkpoint's own directory,
flushes it to disk (`fsync`), renames it over the final path (`os.replace`, atomic on one filesystem) and syncs
the directory, so the path always names either the previous complete checkpoint or the new complete one. A kill
during a save leaves only the hidden `.<name>.<random>.partial` file, which Lightning never mistakes for a
checkpoint (`--ckpt_path last` looks for `last*.ckpt`) and the next save of the same name removes.

Distributed checkpoints (FSDP2 through `ModelParallelStrategy`, FSDP1 with sharded state dicts: a directory per
checkpoint) do not go through a `CheckpointIO`: torch's distributed checkpointing writes the shards in place, and
a kill while it rewrites `last.ckpt` could leave shards of two steps that load without error. With such
strategies `link_last_checkpoint` makes `last.ckpt` a symbolic link to the newest step-named checkpoint instead
(Lightning's `save_last="link"`): every save then writes a new directory, which a kill leaves without its
`meta.pt` (it refuses to load), and the link moves only once the new directory is complete.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic and durable (see the module docstring); loading is unchanged."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options; got {storage_options!r}")
        path = os.fspath(path)
        directory, name = os.path.split(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(
            os.path.join(glob.escape(directory), f".{glob.escape(name)}.*{PARTIAL_SUFFIX}")
        ):
            os.remove(stale)  # left by a process killed while saving
        handle, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=PARTIAL_SUFFIX)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)
        except BaseException:
            if os.path.exists(partial):
                os.remove(partial)
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def use_atomic_checkpoints(strategy: Strategy) -> None:
    """Give `strategy` an `AtomicCheckpointIO` in place of Lightning's default `TorchCheckpointIO` (the same files,
    written atomically); a `CheckpointIO` of any other kind configured for the run is kept."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def saves_directories(strategy: Strategy) -> bool:
    """Whether `strategy` writes each checkpoint as a directory of shards, in place."""
    if isinstance(strategy, ModelParallelStrategy):
        return strategy._save_distributed_checkpoint
    return isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded"


def link_last_checkpoint(trainer: Trainer) -> None:
    """Under a strategy that saves directories, make every `save_last=True` checkpoint callback keep `last.ckpt`
    as a link to its newest complete step-named checkpoint (see the module docstring)."""
    if not saves_directories(trainer.strategy):
        return
    for callback in trainer.checkpoint_callbacks:
        if callback.save_last is True and callback.save_top_k != 0:
            callback.save_last = "link"
