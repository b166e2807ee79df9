"""`dvpo fit|validate|test|predict`: the LightningCLI of the project.

Model and data are both in subclass mode (`class_path` + `init_args`). Every run gets, unless the config says
otherwise: progress with true totals (`dvpo_lightning.callbacks.progress`: the rich bar on a terminal, plain
flushed lines when stdout is a file or pipe); CSV (`metrics.csv`) and TensorBoard logs under
`<default_root_dir>/logs/version_N`; checkpoints with `last.ckpt` under `<default_root_dir>/checkpoints` (so
`--ckpt_path last` finds them across runs); peak-memory, throughput and learning-rate monitors. The data
module's tokenizer is handed to the model, so a run names its tokenizer once (`--data.tokenizer`).

Reliability, also by default:

- the configuration is checked before anything is loaded (`dvpo_lightning.preflight`): missing paths name the
  config that writes them, FSDP1 without CUDA points at FSDP2;
- checkpoint files are written atomically (`AtomicCheckpointIO`), so a run killed while saving keeps its previous
  `last.ckpt`. FSDP2 (and sharded FSDP1) checkpoints are directories written in place by torch's distributed
  checkpointing, outside any `CheckpointIO`: there `last.ckpt` is a link to the newest step-named checkpoint,
  moved once that one is complete (`link_last_checkpoint`); a kill mid-save leaves the new directory without its
  `meta.pt`, which refuses to load;
- every checkpoint holds each process's random state (`RandomState`), so a resumed run repeats the interrupted
  one exactly on CPU;
- a non-finite loss, rollout quantity or gradient skips the optimiser step, and `--nonfinite.max_consecutive_skips`
  skips in a row stop the run (`NonFiniteGuard`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from dvpo_lightning.callbacks import (
    NonFiniteGuard,
    PeakMemoryMonitor,
    ProgressLines,
    RandomState,
    SampleLogger,
    ThroughputMonitor,
    TotalsRichProgressBar,
)
from dvpo_lightning.checkpoint_io import link_last_checkpoint, use_atomic_checkpoints
from dvpo_lightning.preflight import check_run_config


class DVPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(PeakMemoryMonitor, "memory_monitor")
        parser.add_lightning_class_args(ThroughputMonitor, "throughput")
        parser.add_lightning_class_args(SampleLogger, "samples")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_run_config(config.as_dict(), [str(path) for path in config.get("config") or []])
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        self._default_loggers = config.trainer.logger in (None, True)
        self._root = root

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if self._default_loggers:
            kwargs["logger"] = default_loggers(self._root)
        callbacks = [*(config.get("callbacks") or []), RandomState()]
        if config.get("enable_progress_bar") is not False:
            callbacks.append(TotalsRichProgressBar() if sys.stdout.isatty() else ProgressLines())
        if config.get("logger") is not False:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        use_atomic_checkpoints(trainer.strategy)
        link_last_checkpoint(trainer)
        return trainer


def default_loggers(root: str) -> list:
    """CSV and TensorBoard loggers writing to the same `<root>/logs/version_N` directory."""
    version = next_version(os.path.join(root, "logs"))
    return [
        CSVLogger(save_dir=root, name="logs", version=version),
        TensorBoardLogger(save_dir=root, name="logs", version=version, default_hp_metric=False),
    ]


def next_version(directory: str) -> int:
    if not os.path.isdir(directory):
        return 0
    versions = [
        int(m.group(1)) for name in os.listdir(directory) if (m := re.fullmatch(r"version_(\d+)", name))
    ]
    return max(versions, default=-1) + 1


# Lightning's messages that say nothing about a dvpo run, printed by every one of them.
KNOWN_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen models, by design
    r"LightningCLI's args parameter is intended",  # `dvpo` hands its (cleaned) command line to LightningCLI
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not re.search("litlogger|litmodels", record.getMessage())  # advertisements at every start


_DROP_TIPS = _DropTips()


def silence_known_noise() -> None:
    for pattern in KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_TIPS)


def build_cli(args: list[str] | None = None, run: bool = True) -> DVPOCLI:
    """See `dvpo_lightning.cli.run_cli`."""
    silence_known_noise()
    return DVPOCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        run=run,
        args=args,
    )
