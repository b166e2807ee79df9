"""End-of-fit reports shared by the monitors: where they go, the JSON file, the table on the console."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

GIB = 2**30  # the "gb" in metric names is GiB


def run_dir(trainer: pl.Trainer) -> Path:
    """This run's own folder: the first logger's version folder (CSV, TensorBoard: `<save_dir>/<name>/version_N`).

    A tracker logger (W&B, MLflow) has no such folder, and Lightning's `trainer.log_dir` is then its `save_dir`,
    shared by every run: its run gets `<save_dir>/<name>/<version>` (the project or experiment, and the run's id),
    where Lightning puts such a logger's checkpoints. Without a logger: `Trainer(default_root_dir)`. Broadcast from
    rank zero (only it has the tracker's run), so this must be called on every process (e.g. in `on_fit_start`).
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        path = logger.log_dir
    else:
        path = os.path.join(
            logger.save_dir or trainer.default_root_dir, str(logger.name), str(logger.version)
        )
    return Path(trainer.strategy.broadcast(path))


@rank_zero_only
def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented JSON (rank zero only), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


@rank_zero_only
def print_table(title: str, rows: Mapping[str, Any]) -> None:
    """Print a two-column table (rank zero only); floats get 4 significant digits."""
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for name, value in rows.items():
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
