"""A model loaded by path trains in train mode: HF's `from_pretrained` returns it in eval mode and Lightning keeps
modules' modes, and in eval mode HF skips gradient checkpointing (the option would silently do nothing)."""

from __future__ import annotations

import lightning.pytorch as pl

from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.modules import DPOModule, OptimConfig
from tests.helpers.stages import quick_trainer, tiny, topics_data


def test_a_loaded_policy_trains_in_train_mode_with_checkpointing_and_its_reference_stays_in_eval(tmp_path):
    data = topics_data(tmp_path / "cache", mode="pairs", size=40)
    path = export_model(build_policy(tiny(), data.tokenizer), data.tokenizer, str(tmp_path / "sft"))
    seen = []

    class Modes(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            layer = module.policy.model.layers[0]
            seen.append((layer.training, layer.gradient_checkpointing, module.reference.training))

    module = DPOModule(
        policy=ModelSpec(name_or_path=path, gradient_checkpointing=True),
        optim=OptimConfig(lr=1e-4),
        tokenizer=data.tokenizer,
        export_dir=str(tmp_path / "dpo"),
    )
    quick_trainer(tmp_path, max_steps=1, callbacks=[Modes()]).fit(module, datamodule=data)
    assert seen == [(True, True, False)]
