"""Writing a stage's result as a Hugging Face directory, with its lineage record and model card."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from dvpo_lightning.models import build_policy, build_value_model, export_model, is_lora
from dvpo_lightning.modules.lineage import current_inputs, export_record, warn_if_inputs_rewritten
from dvpo_lightning.modules.sharding import full_state_dict, is_sharded


def export_stage(module: pl.LightningModule, directory: str) -> None:
    """Write `module`'s exported model to `directory` (rank zero writes; a collective when the model is sharded).

    A sharded model is gathered first (every rank takes part); a sharded LoRA model is loaded into an unsharded twin
    on rank zero, whose adapters are then merged as usual.
    """
    model = getattr(module, module.exported_model)
    state = full_state_dict(model) if is_sharded(model) else None
    if module._trainer is None or module.trainer.is_global_zero:
        if state is not None and is_lora(model):
            build = build_policy if module.exported_model == "policy" else build_value_model
            twin = build(module.exported_model_spec(), module.tokenizer)
            twin.load_state_dict(state)
            twin.config.update(model.config.to_diff_dict())  # what training set on it (a GVM's value_form)
            model, state = twin, None
        inputs = module.inputs_at_start if module.inputs_at_start is not None else current_inputs(module)
        warn_if_inputs_rewritten(module, inputs)
        info = {**export_record(module, directory, inputs), **module.export_info()}
        export_model(model, module.tokenizer, directory, info=info, state_dict=state)
        rank_zero_info(f"Exported {module.exported_model} to {directory}")
    if module._trainer is not None:
        module.trainer.strategy.barrier("export")
