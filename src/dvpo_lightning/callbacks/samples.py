"""SampleLogger: keep a few of the policy's rollouts (prompt, response, reward) as the run goes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from dvpo_lightning.callbacks.cadence import check_every_n_steps, is_accumulating, training_step_number
from dvpo_lightning.callbacks.reports import run_dir


def _plain(value: Any) -> Any:
    """JSON fallback: tensors and arrays become lists or numbers, anything else its `str`."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _cell(value: Any) -> str:
    """One markdown table cell: floats with 4 significant digits, pipes escaped, line breaks kept as <br>."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def markdown_table(samples: Sequence[Mapping[str, Any]]) -> str:
    """The samples as a markdown table, one column per key (in order of first appearance)."""
    columns = list(dict.fromkeys(key for sample in samples for key in sample))
    lines = ["| " + " | ".join(_cell(key) for key in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(sample.get(key, "")) for key in columns) + " |" for sample in samples]
    return "\n".join(lines)


class SampleLogger(Callback):
    """Every `every_n_steps` training steps, logs up to `max_samples` of the module's `last_samples`.

    On-policy modules set `last_samples` after each rollout: a list of dicts such as
    `{"prompt": str, "response": str, "reward": float, ...}`. Each logged sample is appended as one JSON line,
    `{"global_step": trainer.global_step, **sample}`, to `<trainer.log_dir or default_root_dir>/samples.jsonl`,
    and, for every attached TensorBoard logger, the batch is added as a markdown table (`add_text("samples")`).
    A module without `last_samples` (or with an empty one) is skipped; the same list object is never logged
    twice. Only rank zero's samples are logged. Without a logger, only the file is written. A run resumed into an
    existing file drops its lines of steps after the checkpoint's, which the run logs again.

    Args:
        every_n_steps: log on every this many training steps (training steps: see `cadence`).
        max_samples: log at most this many samples of each rollout (the first ones).
        filename: the JSON-lines file, inside the run folder.
    """

    def __init__(
        self, every_n_steps: int = 10, max_samples: int = 4, filename: str = "samples.jsonl"
    ) -> None:
        check_every_n_steps("SampleLogger(every_n_steps)", every_n_steps)
        check_every_n_steps("SampleLogger(max_samples)", max_samples)
        self.every_n_steps = every_n_steps
        self.max_samples = max_samples
        self.filename = filename
        self._last_logged: object = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = run_dir(trainer) / self.filename
        self._last_logged = None

    @rank_zero_only
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run continuing the file logs again what was logged after its checkpoint's step.
        if self.path.is_file():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["global_step"] <= trainer.global_step]
            if len(kept) < len(lines):
                self.path.write_text("".join(kept))

    @rank_zero_only
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if is_accumulating(trainer) or training_step_number(trainer) % self.every_n_steps:
            return
        samples = getattr(pl_module, "last_samples", None)
        if samples is None or samples is self._last_logged:
            return
        if not isinstance(samples, Sequence) or not all(isinstance(sample, Mapping) for sample in samples):
            raise TypeError(
                f"{type(pl_module).__name__}.last_samples must be a list of dicts, got {samples!r:.200}"
            )
        if not samples:
            return
        self._last_logged = samples
        self._write(trainer, samples[: self.max_samples])

    def _write(self, trainer: pl.Trainer, samples: Sequence[Mapping[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            for sample in samples:
                file.write(json.dumps({"global_step": trainer.global_step, **sample}, default=_plain) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(
                    "samples", markdown_table(samples), global_step=trainer.global_step
                )
