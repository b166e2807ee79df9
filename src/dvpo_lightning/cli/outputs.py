"""A run's output directory holds one run: a fresh `dvpo fit` refuses a directory with another run's results.

Without this, a second run of a config writes `last-v1.ckpt` beside the first run's `last.ckpt` (which
`--ckpt_path last` would then resume), and its export silently replaces the `model/` that later stages read. A
fresh run (no `--ckpt_path`) whose checkpoint directory holds checkpoints, or whose export directory holds an
export, stops before anything loads and names the two ways on: `--ckpt_path last` resumes that run,
`--overwrite true` starts over. A resumed run overwrites its own checkpoints by name (the CLI turns Lightning's
`-v1` version counter off), so `last.ckpt` is always the newest checkpoint of the run in the directory.

`--overwrite true` deletes nothing at first: the earlier run's checkpoints, export and logs are moved aside (into
`.overwritten/` beside each, `SetAside`), since some mistakes show only once the run has begun (a bad row found
while the data is read, a model of the wrong stage). They are deleted once the new run has written its first
checkpoint, or has finished; if it fails before that, they are put back where they were, and the directory is as
it was. A run killed before its first checkpoint leaves them aside: the next run in the directory puts them back
first. Only the process of global rank 0 moves, restores or deletes them (every process of a run launched by
torchrun or srun gets here at once).
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from dvpo_lightning.preflight import ConfigurationError

#: files that make a directory an export (`dvpo_lightning.models.export`)
EXPORT_MARKERS = ("config.json", "dvpo_export.json")
#: the folder, beside each moved path, that holds an overwritten run's results until the new run has a checkpoint
ASIDE = ".overwritten"


def checkpoints_in(checkpoint_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.ckpt")))


def previous_results(checkpoint_dir: str, export_dir: str) -> list[str]:
    """The checkpoints in `checkpoint_dir` and the export in `export_dir` that a run left there."""
    found = checkpoints_in(checkpoint_dir)
    if any(os.path.exists(os.path.join(export_dir, name)) for name in EXPORT_MARKERS):
        found.append(export_dir)
    return found


def aside_path(path: str) -> str:
    return os.path.join(
        os.path.dirname(os.path.normpath(path)), ASIDE, os.path.basename(os.path.normpath(path))
    )


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@dataclass
class SetAside:
    """An earlier run's results (`originals`) moved aside by `--overwrite true`, until the new run, writing its
    checkpoints to `checkpoint_dir`, has one."""

    originals: list[str]
    checkpoint_dir: str

    def move(self) -> SetAside:
        for path in self.originals:
            os.makedirs(os.path.dirname(aside_path(path)), exist_ok=True)
            os.replace(path, aside_path(path))
        return self

    def new_run_has_a_checkpoint(self) -> bool:
        return bool(checkpoints_in(self.checkpoint_dir))

    def restore(self) -> None:
        """Put the earlier run's results back, replacing what the new run left in their place (its first logs)."""
        for path in self.originals:
            _remove(path)
            os.replace(aside_path(path), path)
        self._remove_empty_aside_folders()

    def discard(self) -> None:
        for path in self.originals:
            _remove(aside_path(path))
        self._remove_empty_aside_folders()
        self.originals = []

    def settle(self, failed: bool) -> None:
        """After the new run: put the earlier results back if it failed before its first checkpoint, else delete."""
        if failed and not self.new_run_has_a_checkpoint():
            self.restore()
        else:
            self.discard()

    def _remove_empty_aside_folders(self) -> None:
        for folder in {os.path.dirname(aside_path(path)) for path in self.originals}:
            if os.path.isdir(folder) and not os.listdir(folder):
                os.rmdir(folder)


class DiscardSetAside(Callback):
    """Deletes the overwritten run's results as soon as the new run has written a checkpoint (so a kill after it
    leaves one run in the directory)."""

    def __init__(self, set_aside: SetAside) -> None:
        self.set_aside = set_aside

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and self.set_aside.originals and self.set_aside.new_run_has_a_checkpoint():
            self.set_aside.discard()


def _interrupted_overwrite(checkpoint_dir: str, export_dir: str, logs_dir: str | None) -> SetAside | None:
    """What an earlier `--overwrite true` run, killed before its first checkpoint, left aside."""
    checkpoints_aside = os.path.join(checkpoint_dir, ASIDE)
    left = [
        os.path.join(checkpoint_dir, name)
        for name in (sorted(os.listdir(checkpoints_aside)) if os.path.isdir(checkpoints_aside) else [])
    ]
    left += [
        path for path in (export_dir, logs_dir) if path is not None and os.path.lexists(aside_path(path))
    ]
    return SetAside(list(dict.fromkeys(left)), checkpoint_dir) if left else None


def prepare_output_directory(
    root: str, checkpoint_dir: str, export_dir: str, logs_dir: str | None, overwrite: bool
) -> SetAside | None:
    """Refuse a fresh run into a directory with another run's results, or with `overwrite` move them (and the
    logs in `logs_dir`, when the run writes its logs there) aside: the returned `SetAside`, to settle when the run
    ends (None when nothing was moved, or on a process other than global rank 0)."""
    is_rank_zero = getattr(rank_zero_only, "rank", 0) == 0
    interrupted = _interrupted_overwrite(checkpoint_dir, export_dir, logs_dir) if is_rank_zero else None
    if interrupted is not None:
        kept = (
            "put back"
            if not interrupted.new_run_has_a_checkpoint()
            else "deleted (that run has a checkpoint)"
        )
        rank_zero_warn(
            f"{root}: the results an interrupted --overwrite run had set aside in {ASIDE}/ are {kept}"
        )
        interrupted.settle(failed=True)
    found = previous_results(checkpoint_dir, export_dir)
    if not found:
        return None
    if not overwrite:
        shown = ", ".join(os.path.relpath(path, root) for path in found[:4]) + (
            ", ..." if len(found) > 4 else ""
        )
        raise ConfigurationError(
            f"{root} holds the results of an earlier run ({shown}). Resume that run with --ckpt_path last, or "
            "start over with --overwrite true (deletes its checkpoints, logs and export once the new run has its "
            "first checkpoint), or choose another --trainer.default_root_dir"
        )
    if not is_rank_zero:
        return None
    logs = [logs_dir] if logs_dir is not None and os.path.isdir(logs_dir) else []
    return SetAside(found + logs, checkpoint_dir).move()
