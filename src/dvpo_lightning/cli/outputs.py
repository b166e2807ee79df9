"""A run's output directory holds one run: a fresh `dvpo fit` refuses a directory with another run's results.

Without this, a second run of a config writes `last-v1.ckpt` beside the first run's `last.ckpt` (which
`--ckpt_path last` would then resume), and its export silently replaces the `model/` that later stages read. A
fresh run (no `--ckpt_path`) whose checkpoint directory holds checkpoints, or whose export directory holds an
export, stops before anything loads and names the two ways on: `--ckpt_path last` resumes that run,
`--overwrite true` starts over, deleting its checkpoints, its logs and its export first. A resumed run overwrites
its own checkpoints by name (the CLI turns Lightning's `-v1` version counter off), so `last.ckpt` is always the
newest checkpoint of the run in the directory.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil

from dvpo_lightning.preflight import ConfigurationError

#: files that make a directory an export (`dvpo_lightning.models.export`)
EXPORT_MARKERS = ("config.json", "dvpo_export.json")


def previous_results(checkpoint_dir: str, export_dir: str) -> list[str]:
    """The checkpoints in `checkpoint_dir` and the export in `export_dir` that a run left there."""
    found = sorted(glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.ckpt")))
    if any(os.path.exists(os.path.join(export_dir, name)) for name in EXPORT_MARKERS):
        found.append(export_dir)
    return found


def prepare_output_directory(
    root: str, checkpoint_dir: str, export_dir: str, logs_dir: str | None, overwrite: bool
) -> None:
    """Refuse a fresh run into a directory with another run's results, or with `overwrite` delete them (and the
    logs in `logs_dir`, when the run writes its logs there)."""
    found = previous_results(checkpoint_dir, export_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(os.path.relpath(path, root) for path in found[:4]) + (
            ", ..." if len(found) > 4 else ""
        )
        raise ConfigurationError(
            f"{root} holds the results of an earlier run ({shown}). Resume that run with --ckpt_path last, or "
            "start over with --overwrite true (deletes its checkpoints, logs and export), or choose another "
            "--trainer.default_root_dir"
        )
    # Every process of a run launched by torchrun or srun gets here at once: what another removed is gone already.
    for path in found:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if logs_dir is not None:
        shutil.rmtree(logs_dir, ignore_errors=True)
