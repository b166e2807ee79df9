"""What a stage records in its export about its run, and its warnings about the models it reads (see
`dvpo_lightning.models.lineage` for the records themselves).

A stage notes the identity and record of every model it loads by path when it begins (`current_inputs`), keeps them in its
checkpoints so that a resumed run still knows what the run began with, and warns when an input was rewritten
since (checked on resume and at export) or when its inputs come from different SFT exports.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.models.lineage import (
    code_version,
    disagreeing_inputs,
    identity,
    new_export_id,
    read_export_info,
    rewritten_inputs,
)

#: metric families that describe the run's cost, not the model
VOLATILE_METRICS = ("perf/", "time/", "lr-")


def input_identities(module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """The identity of each model `module` loads by path, by option (`policy`, `value_model`, ...)."""
    return {
        option: identity(spec.name_or_path, spec.revision)
        for option, spec in module.model_specs().items()
        if spec.name_or_path is not None
    }


def current_inputs(module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """Per option: the identity and the lineage record (None without one) of each model `module` loads by path."""
    return {
        option: {
            "identity": found,
            "export": read_export_info(found["path"]) if "path" in found else None,
        }
        for option, found in input_identities(module).items()
    }


def warn(module: pl.LightningModule, problems: list[str]) -> None:
    for problem in problems:
        rank_zero_warn(f"{type(module).__name__}: {problem}")


def warn_if_inputs_disagree(module: pl.LightningModule, inputs: dict[str, dict[str, Any]]) -> None:
    warn(module, disagreeing_inputs({option: found["export"] for option, found in inputs.items()}))


def warn_if_inputs_rewritten(module: pl.LightningModule, at_start: dict[str, dict[str, Any]]) -> None:
    before = {option: found["identity"] for option, found in at_start.items()}
    warn(module, rewritten_inputs(before, input_identities(module)))


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last value of every scalar metric that describes the model (cost metrics left out)."""
    return {
        name: float(value)
        for name, value in sorted(trainer.callback_metrics.items())
        if not name.startswith(VOLATILE_METRICS) and getattr(value, "numel", lambda: 1)() == 1
    }


def export_record(module: pl.LightningModule, directory: str, inputs: dict[str, dict[str, Any]]) -> dict:
    """The lineage record of `module`'s export to `directory` (see `dvpo_lightning.models.lineage`), `inputs` as
    they were when the run began."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    seed = os.environ.get(
        "PL_GLOBAL_SEED"
    )  # set by Lightning's seed_everything (the CLI's --seed_everything)
    return {
        "export_id": new_export_id(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": type(module).__name__,
        "exported_model": module.exported_model,
        "export_dir": os.path.abspath(directory),
        "global_step": module.global_step,
        "seed": int(seed) if seed is not None else None,
        # the seeds of each model's random initialisation (the data's is in `data`): the run's unless pinned
        "init_seeds": {option: spec.resolved_init_seed() for option, spec in module.model_specs().items()},
        # Outside the `dvpo` CLI only the module's own arguments are known.
        "config": module.run_config
        if module.run_config is not None
        else {"model": {"class_path": type(module).__qualname__, "init_args": dict(module.hparams)}},
        "data": datamodule.describe() if hasattr(datamodule, "describe") else None,
        "code": code_version(),
        "inputs": inputs,
        "metrics": final_metrics(trainer) if trainer is not None else {},
    }
