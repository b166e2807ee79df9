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
- a fresh run refuses a directory that holds an earlier run's checkpoints or export (`--ckpt_path last` resumes
  that run, `--overwrite true` starts over: `dvpo_lightning.cli.outputs`), so `last.ckpt` is always this run's;
  `--overwrite true` moves the earlier run aside and puts it back if the new run fails before its first
  checkpoint;
  a resumed run continues the newest `logs/version_N` from its checkpoint's step (`dvpo_lightning.cli.logs`);
- torch gets a share of the machine's cores per process, said at start-up (`--threads`, `dvpo_lightning.cli.threads`);
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

import contextlib
import logging
import os
import re
import sys
import warnings

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

# Imported so that their classes are known by their short names too (`--model.help DVPOModule`).
import dvpo_lightning.data  # noqa: F401
import dvpo_lightning.modules  # noqa: F401
from dvpo_lightning.callbacks import (
    NonFiniteGuard,
    PeakMemoryMonitor,
    ProgressLines,
    RandomState,
    SampleLogger,
    ThroughputMonitor,
    TotalsRichProgressBar,
)
from dvpo_lightning.callbacks.reports import run_dir
from dvpo_lightning.checkpoint_io import link_last_checkpoint, use_atomic_checkpoints
from dvpo_lightning.cli.logs import default_loggers, resumed_log_step
from dvpo_lightning.cli.outputs import DiscardSetAside, SetAside, prepare_output_directory
from dvpo_lightning.cli.threads import set_threads
from dvpo_lightning.preflight import check_run_config


class RunTrainer(Trainer):
    """Lightning's Trainer, whose `log_dir` (where the CLI saves `config.yaml`) is the run's own folder, as for the
    reports of the monitors (`run_dir`): with a tracker logger, Lightning's is the tracker's folder, shared by every
    run, so each run would replace the previous one's `config.yaml`."""

    @property
    def log_dir(self) -> str:
        return str(run_dir(self))


class DVPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.add_lightning_class_args(PeakMemoryMonitor, "memory_monitor")
        parser.add_lightning_class_args(ThroughputMonitor, "throughput")
        parser.add_lightning_class_args(SampleLogger, "samples")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="start over in a directory that holds an earlier run's checkpoints or export: they, and its logs, "
            "are moved aside, deleted once the new run has its first checkpoint and put back if it fails before "
            "(see dvpo_lightning.cli.outputs)",
        )
        parser.add_argument(
            "--threads",
            type=int | None,
            default=None,
            help="torch CPU threads per process; default: this machine's cores shared among the run's processes "
            "on it, or OMP_NUM_THREADS (see dvpo_lightning.cli.threads)",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        settings = config.as_dict()
        check_run_config(settings, [str(path) for path in config.get("config") or []])
        set_threads(config.threads, settings["trainer"])
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        self._default_loggers = config.trainer.logger in (None, True)
        self._root = root
        self._resume_from_step = None
        self._set_aside: SetAside | None = None
        if self.subcommand != "fit":
            return
        checkpoint = resolved_checkpoint(config.ckpt_path, config.checkpoint.dirpath)
        if checkpoint is not None:
            self._resume_from_step = resumed_log_step(checkpoint)
        elif config.ckpt_path is None:
            export_dir = (config.model.get("init_args") or {}).get("export_dir") or os.path.join(
                root, "model"
            )
            logs = os.path.join(root, "logs") if self._default_loggers else None
            self._set_aside = prepare_output_directory(
                root, config.checkpoint.dirpath, export_dir, logs, config.overwrite
            )

    def instantiate_classes(self) -> None:
        with self._settling_overwritten_run(finished=False):
            super().instantiate_classes()

    def _run_subcommand(self, subcommand: str) -> None:
        with self._settling_overwritten_run(finished=True):
            super()._run_subcommand(subcommand)

    @contextlib.contextmanager
    def _settling_overwritten_run(self, finished: bool):
        """Put an overwritten run back if this run fails before its first checkpoint; delete it once this one has
        finished (`cli.outputs.SetAside`)."""
        try:
            yield
        except BaseException:
            if self._set_aside is not None:
                self._set_aside.settle(failed=True)
            raise
        if finished and self._set_aside is not None:
            self._set_aside.settle(failed=False)

    def before_fit(self) -> None:
        if hasattr(self.model, "run_config"):  # recorded in the export's lineage
            self.model.run_config = self.config[self.subcommand].as_dict()
        # Before the data is loaded and tokenised (Lightning sets the data up before the model).
        check_sequences_fit = getattr(self.model, "check_sequences_fit", None)
        if check_sequences_fit is not None and self.datamodule is not None:
            check_sequences_fit(self.datamodule)

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if self._default_loggers:
            kwargs["logger"] = default_loggers(self._root, self._resume_from_step)
        callbacks = [*(config.get("callbacks") or []), RandomState()]
        if self._set_aside is not None:
            callbacks.append(DiscardSetAside(self._set_aside))
        if config.get("enable_progress_bar") is not False:
            callbacks.append(TotalsRichProgressBar() if sys.stdout.isatty() else ProgressLines())
        if config.get("logger") is not False:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        use_atomic_checkpoints(trainer.strategy)
        link_last_checkpoint(trainer)
        return trainer


def resolved_checkpoint(ckpt_path: str | None, checkpoint_dir: str) -> str | None:
    """The checkpoint file or directory a fit resumes from: `last` is `<checkpoint_dir>/last.ckpt`, refused when
    there is none (Lightning would start from step 0, as TRL's `resume_from_checkpoint=True` does not); None for a
    fresh run or a checkpoint Lightning finds by other means (`best`, `hpc`, a registry)."""
    if ckpt_path == "last":
        path = os.path.join(checkpoint_dir, "last.ckpt")
        if not os.path.exists(path):
            raise ValueError(
                f"--ckpt_path last: there is no checkpoint to resume ({path} does not exist); leave --ckpt_path "
                "out to start a fresh run"
            )
        return path
    return ckpt_path if ckpt_path is not None and os.path.exists(ckpt_path) else None


# Lightning's messages that say nothing about a dvpo run, printed by every one of them.
KNOWN_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen models, by design
    r"LightningCLI's args parameter is intended",  # `dvpo` hands its (cleaned) command line to LightningCLI
    r"Checkpoint directory .* exists and is not empty",  # only a resumed run gets there (`cli.outputs`)
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
    # MLflow 3 refuses a local file store (`tracking_uri: file:...`, configs/loggers/mlflow.yaml) unless allowed.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return DVPOCLI(
        LightningModule,
        LightningDataModule,
        trainer_class=RunTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        # A bad argument raises (one line from `dvpo`) instead of printing the whole usage.
        parser_kwargs={
            "exit_on_error": False,
            **{name: {"exit_on_error": False} for name in DVPOCLI.subcommands()},
        },
        run=run,
        args=args,
    )
