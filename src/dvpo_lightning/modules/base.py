"""What every stage's LightningModule shares: building models, frozen models, checkpoints, export, stages.

A stage declares its models in `build_models()` (called once from Lightning's `configure_model`, so sharded
strategies can wrap them there), names its frozen models in `frozen_models`, and the model it hands to the
next stage in `exported_model`. Frozen models stay in eval mode, never receive gradients, and are left out
of checkpoints: they are rebuilt from their paths, so a checkpoint holds only what training changed.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.models import export_model, freeze
from dvpo_lightning.modules.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    trainable_parameter_groups,
)


class RLHFModule(pl.LightningModule):
    """Base of every stage. Subclasses set the class attributes and implement `build_models`."""

    #: the batch layout this stage trains on: "sft", "pairs" or "prompts" (read by `RLHFDataModule`).
    data_mode: ClassVar[str] = "pairs"
    #: attribute names of the frozen submodules (reference, GVM, reward model, ...).
    frozen_models: ClassVar[tuple[str, ...]] = ()
    #: attribute name of the model exported at the end of fit.
    exported_model: ClassVar[str] = "policy"

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None = None, export_dir: str | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.export_dir = export_dir
        self.stage_seconds: dict[str, float] = {}
        self._models_built = False

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
        self.build_models()
        for name in self.frozen_models:
            model = getattr(self, name, None)
            if model is not None:
                freeze(model)
        self._models_built = True

    def train(self, mode: bool = True) -> RLHFModule:
        super().train(mode)
        for name in self.frozen_models:
            model = getattr(self, name, None)
            if model is not None:
                model.eval()
        return self

    # ------------------------------------------------------------------------------------ checkpoints
    def _is_frozen_key(self, key: str) -> bool:
        return key.split(".", 1)[0] in self.frozen_models

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state is not None:
            for key in [key for key in state if self._is_frozen_key(key)]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen models were rebuilt from their paths; fill their entries back in so that loading stays strict
        # about every trained parameter.
        state = checkpoint.get("state_dict")
        if state is not None:
            for key, value in self.state_dict().items():
                if self._is_frozen_key(key):
                    state.setdefault(key, value)

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

    def export(self, directory: str | None = None) -> str:
        """Write the stage's result as an HF directory (rank zero writes; every rank returns the path)."""
        directory = directory or self.default_export_dir()
        if self._trainer is None or self.trainer.is_global_zero:
            info = {"stage": type(self).__name__, "global_step": self.global_step}
            export_model(getattr(self, self.exported_model), self.tokenizer, directory, info=info)
            rank_zero_info(f"Exported {self.exported_model} to {directory}")
        if self._trainer is not None:
            self.trainer.strategy.barrier("export")
        return directory

    def on_fit_end(self) -> None:
        self.export()

    # ------------------------------------------------------------------------------------------- stages
    @contextlib.contextmanager
    def stage(self, name: str):
        """Time one part of an iteration ("generate", "score", "update") and tell callbacks about it.

        Callbacks that define `on_rl_stage_start(trainer, module, stage)` / `on_rl_stage_end(...)` (the peak
        memory monitor does) are called around the block; the wall time is kept in `stage_seconds[name]`.
        """
        callbacks = self.trainer.callbacks if self._trainer is not None else []
        for callback in callbacks:
            if hasattr(callback, "on_rl_stage_start"):
                callback.on_rl_stage_start(self.trainer, self, name)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stage_seconds[name] = time.perf_counter() - start
        for callback in callbacks:
            if hasattr(callback, "on_rl_stage_end"):
                callback.on_rl_stage_end(self.trainer, self, name)
