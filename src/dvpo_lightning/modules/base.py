"""What every stage's LightningModule shares: building models, frozen models, checkpoints, export, stages.

A stage declares its models in `build_models()` (called once from Lightning's `configure_model`, where
`ModelParallelStrategy` gets them sharded with FSDP2), names its frozen models in `frozen_models`, and the model
it hands to the next stage in `exported_model`. Frozen models stay in eval mode, never receive gradients, and
take no part in the module's `state_dict()`: they are rebuilt from their paths, so a checkpoint (a single file,
or a distributed checkpoint under FSDP2) holds only what training changed, and loading still checks every
trained key.

Before any model is built, every model the stage will load by path is checked (`modules.checks`): a local path
that does not exist, or a model saved with another tokenizer than the run's, fails naming the option. The export
(`modules.export`) records the run's lineage and carries a model card (`modules.lineage`, `models.lineage`,
`models.card`); inputs from different SFT exports, or rewritten since the run began, are warned about.
"""

from __future__ import annotations

import os
from typing import ClassVar

import lightning.pytorch as pl
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dvpo_lightning.models import ModelSpec, freeze
from dvpo_lightning.modules.checks import check_model_sources, check_run_seeds_agree, check_sequences_fit
from dvpo_lightning.modules.export import export_stage
from dvpo_lightning.modules.frozen import leave_frozen_models_out_of_checkpoints
from dvpo_lightning.modules.host_memory import fix_mmap_threshold
from dvpo_lightning.modules.lineage import current_inputs, warn_if_inputs_disagree, warn_if_inputs_rewritten
from dvpo_lightning.modules.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    trainable_parameter_groups,
)
from dvpo_lightning.modules.samples import scored_pair_rows
from dvpo_lightning.modules.sharding import FSDPConfig, shard_model
from dvpo_lightning.rl import Sequences


class RLHFModule(pl.LightningModule):
    """Base of every stage. Subclasses set the class attributes and implement `build_models`.

    Args:
        tokenizer: the run's tokenizer; the `dvpo` CLI passes the data module's (set `--data.tokenizer` once).
        export_dir: where the stage's result is exported; default `<default_root_dir>/model`.
        fsdp: sharding settings under `ModelParallelStrategy` (FSDP2); ignored under other strategies.
    """

    #: the batch layout this stage trains on: "sft", "pairs", "unpaired" or "prompts" (read by `RLHFDataModule`).
    data_mode: ClassVar[str] = "pairs"
    #: attribute names of the frozen submodules (reference, GVM, reward model, ...).
    frozen_models: ClassVar[tuple[str, ...]] = ()
    #: attribute name of the model exported at the end of fit.
    exported_model: ClassVar[str] = "policy"

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None = None,
        export_dir: str | None = None,
        fsdp: FSDPConfig | None = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.export_dir = export_dir
        self.fsdp = fsdp or FSDPConfig()
        #: names of the current batch's quantities found non-finite (e.g. "advantages"); while it is not empty the
        #: `NonFiniteGuard` callback skips the batch's optimiser steps.
        self.nonfinite_quantities: list[str] = []
        #: the `dvpo` command's whole configuration, recorded in the export's lineage (set by the CLI)
        self.run_config: dict | None = None
        #: a few rows (prompt, responses, rewards) of the current validation, for the `SampleLogger` callback
        self.validation_samples: list[dict] = []
        #: identity and lineage record of each model loaded by path, as the run began (`modules.lineage`)
        self.inputs_at_start: dict[str, dict] | None = None
        self._models_built = False
        leave_frozen_models_out_of_checkpoints(self)

    # ----------------------------------------------------------------------------------------- models
    def build_models(self) -> None:
        raise NotImplementedError

    def configure_model(self) -> None:
        if self._models_built:
            return
        if self.tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs the run's tokenizer: pass `tokenizer=` (the `dvpo` CLI passes the "
                "data module's tokenizer automatically)"
            )
        check_run_seeds_agree(type(self).__name__, self._trainer)
        self.check_model_sources()
        self.check_sequences_fit()
        if self.inputs_at_start is None:  # else restored from the checkpoint of the run being resumed
            self.inputs_at_start = current_inputs(self)
            warn_if_inputs_disagree(self, self.inputs_at_start)
        if self._trainer is None or self.trainer.strategy.root_device.type == "cpu":
            fix_mmap_threshold()  # the models' activations live in this process's heap
        self.build_models()
        # HF's `from_pretrained` returns a model in eval mode and Lightning keeps every module's mode: a model loaded
        # by path would train in eval mode, where HF skips gradient checkpointing (and dropout, where kept).
        self.train()
        for name in self.frozen_models:
            model = getattr(self, name, None)
            if model is not None:
                freeze(model)
        self._models_built = True
        if self.device_mesh is not None:  # Lightning's ModelParallelStrategy: FSDP2
            mesh = self.device_mesh["data_parallel"]
            for name, model in self.hf_models().items():
                shard_model(model, mesh, self.fsdp, frozen=name in self.frozen_models)

    def check_sequences_fit(self, datamodule=None) -> None:
        """Refuse data whose prompt + response limits exceed a model's context (`modules.checks`).

        The `dvpo` CLI runs this before the data is loaded (`datamodule` is then the run's, not yet attached to a
        trainer); `configure_model` runs it again for runs the CLI did not start. On-policy stages check each
        rollout instead (`modules.rooms`), since their responses are generated.
        """
        if datamodule is None:
            datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is not None and self.data_mode != "prompts":
            check_sequences_fit(type(self).__name__, self.model_specs(), datamodule)

    def model_specs(self) -> dict[str, ModelSpec]:
        """The spec of every model the stage builds, by option name (`policy`, `value_model`, ...).

        The one model of the GVM and reward-model stages is their option `model`.
        """
        return {
            name.removesuffix("_spec"): value
            for name, value in vars(self).items()
            if name.endswith("_spec") and isinstance(value, ModelSpec)
        }

    def check_model_sources(self) -> None:
        """Refuse, before anything is loaded, a model path that does not exist or a model of another tokenizer."""
        check_model_sources(type(self).__name__, self.model_specs(), self.tokenizer, self.exported_model)

    def hf_models(self) -> dict[str, torch.nn.Module]:
        """The stage's Hugging Face models (trained and frozen) by attribute name."""
        return {
            name: child
            for name, child in self.named_children()
            if isinstance(child, PreTrainedModel) or hasattr(child, "get_base_model")
        }

    def train(self, mode: bool = True) -> RLHFModule:
        super().train(mode)
        for name in self.frozen_models:
            model = getattr(self, name, None)
            if model is not None:
                model.eval()
        return self

    # ---------------------------------------------------------------------------------------- optimiser
    def optimizer_for(self, model: torch.nn.Module, config: OptimConfig, total_steps: int) -> dict:
        """Lightning's optimiser dict for one trained model: its optimiser and a per-step schedule."""
        optimizer = build_optimizer(trainable_parameter_groups(model, config.weight_decay), config)
        scheduler = build_scheduler(optimizer, config, total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------------- export
    def default_export_dir(self) -> str:
        if self.export_dir is not None:
            return self.export_dir
        root = self.trainer.default_root_dir if self._trainer is not None else os.getcwd()
        return os.path.join(root, "model")

    def exported_model_spec(self) -> ModelSpec:
        """The spec the exported model was built from (to rebuild an unsharded twin of a sharded LoRA model)."""
        raise NotImplementedError

    def export_info(self) -> dict:
        """What a stage adds to its export's lineage record (`dvpo_export.json`) for later stages to check."""
        return {}

    def export(self, directory: str | None = None) -> str:
        """Write the stage's result as an HF directory (`modules.export`); every rank returns the path."""
        directory = directory or self.default_export_dir()
        export_stage(self, directory)
        return directory

    def on_fit_end(self) -> None:
        self.export()

    def on_validation_epoch_start(self) -> None:
        self.validation_samples = []

    def remember_validation_samples(self, rows: list[dict], count: int = 4) -> None:
        """Keep `rows` as this validation's samples, unless an earlier batch's already are."""
        if not self.validation_samples:
            self.validation_samples = rows[:count]

    def remember_scored_pairs(
        self, sequences: Sequences, chosen: torch.Tensor, rejected: torch.Tensor
    ) -> None:
        """Keep a few validation pairs (`sequences`: chosen rows, then rejected) with their scores `[B]`."""
        if not self.validation_samples:
            self.remember_validation_samples(scored_pair_rows(self.tokenizer, sequences, chosen, rejected))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["inputs_at_start"] = self.inputs_at_start

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("inputs_at_start") is not None:
            self.inputs_at_start = checkpoint["inputs_at_start"]
            warn_if_inputs_rewritten(self, self.inputs_at_start)  # the resumed run loads what is there now
