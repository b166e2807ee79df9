"""SampleLogger: keep a few of the policy's samples (prompt, response, rewards) as the run goes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
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
    """Logs a few of the policy's samples: every `every_n_steps` training steps those of the last rollout, and
    after each validation those of the validation.

    On-policy modules set `last_samples` after each rollout: a list of dicts such as
    `{"prompt": str, "response": str, "reward": float, ...}`; every stage sets `validation_samples` during
    validation (`RLHFModule`: the policy's answers to validation prompts with their rewards, or a reward or value
    model's scores of validation pairs). Each logged sample is appended as one JSON line,
    `{"global_step": trainer.global_step, "split": "train" | "validation", **sample}`, to
    `<run folder>/samples.jsonl` (`reports.run_dir`), and the batch goes, as a table under the tag `samples`
    or `val_samples`, to every attached TensorBoard (markdown text), Weights & Biases (a `wandb.Table`) and MLflow
    logger (a markdown artifact `<tag>/step_<N>.md`). A module without samples (or with an empty list) is
    skipped; the same list object is never logged twice. Only rank zero's samples are logged. A run resumed into
    an existing file drops its lines of steps after the checkpoint's, which the run logs again.

    Args:
        every_n_steps: log the rollout's samples on every this many training steps (training steps: see `cadence`).
        max_samples: log at most this many samples of each rollout or validation (the first ones).
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
        self._log_new(trainer, pl_module, "last_samples", "train")

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and hasattr(self, "path"):  # `path` is set when fitting
            self._log_new(trainer, pl_module, "validation_samples", "validation")

    def _log_new(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, attribute: str, split: str
    ) -> None:
        samples = getattr(pl_module, attribute, None)
        if samples is None or samples is self._last_logged:
            return
        if not isinstance(samples, Sequence) or not all(isinstance(sample, Mapping) for sample in samples):
            raise TypeError(
                f"{type(pl_module).__name__}.{attribute} must be a list of dicts, got {samples!r:.200}"
            )
        if not samples:
            return
        self._last_logged = samples
        self._write(trainer, samples[: self.max_samples], split)

    def _write(self, trainer: pl.Trainer, samples: Sequence[Mapping[str, Any]], split: str) -> None:
        step = trainer.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            for sample in samples:
                file.write(json.dumps({"global_step": step, "split": split, **sample}, default=_plain) + "\n")
        tag = "samples" if split == "train" else "val_samples"
        columns = list(dict.fromkeys(key for sample in samples for key in sample))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(tag, markdown_table(samples), global_step=step)
            elif isinstance(logger, WandbLogger):
                rows = [[_plain_cell(sample.get(column)) for column in columns] for sample in samples]
                logger.log_text(key=tag, columns=columns, data=rows, step=step)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_text(
                    logger.run_id, markdown_table(samples), f"{tag}/step_{step:08d}.md"
                )


def _plain_cell(value: Any) -> Any:
    """A table cell a tracker stores as is: numbers, strings and booleans; anything else as JSON."""
    return (
        value
        if value is None or isinstance(value, (bool, int, float, str))
        else json.dumps(value, default=_plain)
    )
