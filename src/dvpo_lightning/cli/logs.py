"""The default loggers of a `dvpo` run, and how a resumed run continues the logs of the run it resumes.

A fresh run logs to a new `<root>/logs/version_N`. A resumed run (`--ckpt_path`) continues the newest version
instead: what was logged after its checkpoint was written (the interrupted run went on for a while) is dropped,
since the resumed run logs those steps again, so each step appears once. Lightning logs a value at its count of
batches that stepped (`_batches_that_stepped`), which a checkpoint stores; the resumed run logs from one past
the stored count (`resumed_log_step`).

The CSV file is written at every logging step (Lightning's default buffers 100), so that it follows the run and
a run killed after a checkpoint has every row up to that checkpoint on disk.
"""

from __future__ import annotations

import csv
import os
import re

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def versions(directory: str) -> list[int]:
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(r"version_(\d+)", name))
    )


def resumed_log_step(checkpoint_path: str) -> int:
    """The first logging step of a run resumed from `checkpoint_path` (a file, or a distributed checkpoint's
    directory, whose loop state is in its metadata file)."""
    if os.path.isdir(checkpoint_path):
        checkpoint_path = os.path.join(checkpoint_path, _METADATA_FILENAME)
    checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] + 1


def default_loggers(root: str, resume_from_step: int | None = None) -> list:
    """CSV and TensorBoard loggers writing to the same `<root>/logs/version_N` directory: a new version, or with
    `resume_from_step` the newest one, continued from that step."""
    existing = versions(os.path.join(root, "logs"))
    if resume_from_step is None or not existing:
        version = (existing[-1] + 1) if existing else 0
        return [
            CSVLogger(save_dir=root, name="logs", version=version, flush_logs_every_n_steps=1),
            TensorBoardLogger(save_dir=root, name="logs", version=version, default_hp_metric=False),
        ]
    version = existing[-1]
    return [
        ContinuedCSVLogger(
            save_dir=root,
            name="logs",
            version=version,
            flush_logs_every_n_steps=1,
            from_step=resume_from_step,
        ),
        TensorBoardLogger(
            save_dir=root, name="logs", version=version, default_hp_metric=False, purge_step=resume_from_step
        ),
    ]


class ContinuedCSVLogger(CSVLogger):
    """A `CSVLogger` that continues the `metrics.csv` of its version: rows logged at `from_step` or later are
    dropped, the others kept (Lightning's own deletes the whole file)."""

    def __init__(self, *args, from_step: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.from_step = from_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self.from_step)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, from_step: int) -> None:
        self.from_step = from_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning's writer deletes the metrics file of the folder it is given here.
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            kept = [row for row in reader if int(row["step"]) < self.from_step]
            self.metrics_keys = list(reader.fieldnames or [])
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
