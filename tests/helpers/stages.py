"""Preference-stage modules, data and Trainers for tests: tiny models, a few built-in pairs, quick fits.

`STAGES` names each configuration under test (module class and options) and builds it from the run's
tokenizer and `Exports`, the directories of models exported beforehand (a frozen reward model, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import LoraSpec, ModelSpec, build_value_model, export_model, value_head
from dvpo_lightning.modules import (
    DPOModule,
    GVMModule,
    KTOModule,
    OptimConfig,
    PolicyModule,
    RewardModelModule,
    RLHFModule,
    SFTModule,
)
from tests.helpers.tiny import TINY_ARCH

# Learned absolute positions: unlike rotary ones (TINY_ARCH), a shift of every position changes the outputs,
# so a model that ignores the explicit position ids shows up when left padding is added.
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}

# Large enough that one AdamW step moves every parameter with a gradient by a visible amount.
LARGE_LR = 1e-2


@dataclass
class Exports:
    """Directories of models a stage loads by path."""

    reward_model: str


def tiny(**options) -> ModelSpec:
    return ModelSpec(arch=dict(TINY_ARCH), **options)


def topics_data(
    cache_dir: Path, mode: str | None = None, size: int = 120, batch_size: int = 4
) -> RLHFDataModule:
    """The built-in task, small; `mode` None lets the Trainer's module choose it."""
    return RLHFDataModule(
        "builtin:topics", mode=mode, builtin_size=size, batch_size=batch_size, cache_dir=str(cache_dir)
    )


def first_batch(data: RLHFDataModule) -> dict:
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def quick_trainer(root: Path, max_steps: int, **options) -> pl.Trainer:
    """A Trainer with nothing but the optimisation: no logger, checkpoints, progress bar or validation."""
    defaults = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(root),
    )
    return pl.Trainer(**{**defaults, **options})


def export_random_value_model(directory: Path, tokenizer, init_seed: int = 7) -> str:
    """A tiny value model with a random (non-zero) head, exported with `tokenizer`: scores are not all 0."""
    model = build_value_model(tiny(init_seed=init_seed), tokenizer)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        value_head(model).weight.normal_()
    return export_model(model, tokenizer, str(directory))


def step_loss(module: RLHFModule, batch: dict) -> torch.Tensor:
    """The training loss of `batch` (what `training_step` optimises), without a Trainer."""
    output = module.training_step(batch, 0)
    return output["loss"] if isinstance(output, dict) else output


def _stage(
    module_class: type[RLHFModule], spec_options: dict | None = None, **options
) -> Callable[..., RLHFModule]:
    """A builder of `module_class` with `options`, training a model of the given arch with `spec_options`."""

    def make(tokenizer, exports: Exports | None, lr: float, arch: dict) -> RLHFModule:
        extra = dict(options)
        if extra.get("terminal_reward") == "reward_model":
            extra["reward_model"] = ModelSpec(name_or_path=exports.reward_model)
        spec = ModelSpec(arch=dict(arch), **(spec_options or {}))
        trained = "policy" if issubclass(module_class, PolicyModule) else "model"
        return module_class(**{trained: spec}, optim=OptimConfig(lr=lr), tokenizer=tokenizer, **extra)

    return make


#: name -> builder(tokenizer, exports, lr, arch) of every preference-stage configuration under test.
STAGES: dict[str, Callable[..., RLHFModule]] = {
    "sft": _stage(SFTModule),
    "reward_model": _stage(RewardModelModule),
    "gvm_preference": _stage(GVMModule),
    "gvm_score": _stage(GVMModule, terminal_reward="score", lam=0.8, gamma=0.9),
    "gvm_reward_model": _stage(GVMModule, terminal_reward="reward_model"),
    "gvm_ranking": _stage(GVMModule, ranking_weight=0.5),
    "dpo_sigmoid": _stage(DPOModule),
    "dpo_ipo": _stage(DPOModule, loss_type="ipo"),
    "dpo_label_smoothing": _stage(DPOModule, label_smoothing=0.2),
    "dpo_precompute_reference": _stage(DPOModule, precompute_reference=True),
    "dpo_lora": _stage(DPOModule, {"lora": LoraSpec(r=4, alpha=8)}),
    "dpo_rpo": _stage(DPOModule, loss_type=["sigmoid", "nll"], loss_weights=[1.0, 0.5]),
    "simpo": _stage(DPOModule, loss_type="simpo", beta=2.0, simpo_gamma=1.0),
    "orpo": _stage(DPOModule, loss_type="orpo"),
    "kto": _stage(KTOModule, desirable_weight=1.3, undesirable_weight=0.7),
}


def build_stage(
    name: str, tokenizer, exports: Exports | None = None, lr: float = LARGE_LR, arch: dict = TINY_ARCH
) -> RLHFModule:
    """Configuration `name`, training a model of architecture `arch` (its reference is a copy of it)."""
    return STAGES[name](tokenizer, exports, lr, arch)
