"""A DVPO fit that crashes after a checkpoint and is resumed from it logs, step for step, exactly what an
uninterrupted fit logs, and ends with the same weights: step counters, optimiser, KL controller (adaptive), data
position and random state all come back, across a validation that samples and an epoch boundary. The checkpoint
is written mid-epoch, or after an epoch's last batch (the resumed run must start the next epoch, not skip it).

In process, so it runs in seconds; `test_reliability_kill.py` does the same with a SIGKILLed `dvpo fit`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dvpo_lightning.callbacks import NonFiniteGuard, RandomState
from dvpo_lightning.modules import SamplingConfig
from tests.helpers.onpolicy import build_onpolicy, export_frozen_models
from tests.helpers.stages import topics_data

# 2 PPO epochs x 2 mini-batches: 4 optimiser steps a rollout; 16 rows give 3 rollouts of 4 prompts an epoch.
MAX_STEPS = 20


class Crash(Exception):
    pass


class CrashAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise Crash


class Metrics(pl.Callback):
    """What each training batch and each validation logged (time aside: it differs between any two runs)."""

    def __init__(self) -> None:
        self.training: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.training.append(self.take(trainer, lambda name: not name.startswith(("val/", "time/"))))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.validation.append(self.take(trainer, lambda name: name.startswith("val/")))

    @staticmethod
    def take(trainer, wanted) -> dict[str, float]:
        return {name: float(value) for name, value in trainer.callback_metrics.items() if wanted(name)}


def fit(root, cache, tokenizer, exports, *extra_callbacks, ckpt_path=None):
    pl.seed_everything(0)
    module = build_onpolicy("dvpo_adaptive_kl", tokenizer, exports, mini_batch_size=2)
    module.eval_sampling = SamplingConfig(max_new_tokens=4)  # validation samples too
    metrics = Metrics()
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=4, save_last=True)
    trainer = pl.Trainer(
        max_steps=MAX_STEPS,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=[checkpoints, RandomState(), NonFiniteGuard(), metrics, *extra_callbacks],
    )
    trainer.fit(module, datamodule=topics_data(cache, size=16, batch_size=4), ckpt_path=ckpt_path)
    return metrics, module


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return export_frozen_models(tmp_path_factory.mktemp("exports"), tokenizer)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache, tokenizer, exports):
    return fit(tmp_path_factory.mktemp("whole"), cache, tokenizer, exports)


@pytest.mark.parametrize("crash_step", [8, 12], ids=["mid-epoch", "after-the-last-batch-of-an-epoch"])
def test_a_crashed_dvpo_fit_resumed_from_its_checkpoint_repeats_the_uninterrupted_fit(
    crash_step, tmp_path, cache, tokenizer, exports, uninterrupted
):
    whole_metrics, whole = uninterrupted
    with pytest.raises(Crash):
        fit(tmp_path, cache, tokenizer, exports, CrashAtStep(crash_step))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == crash_step
    resumed_metrics, resumed = fit(tmp_path, cache, tokenizer, exports, ckpt_path=str(last))

    # 5 rollouts in all, each followed by a validation; the resumed fit does those after its checkpoint.
    done = crash_step // 4
    assert len(whole_metrics.training) == 5 and len(resumed_metrics.training) == 5 - done
    assert resumed_metrics.training == whole_metrics.training[done:]
    assert resumed_metrics.validation == whole_metrics.validation[done:]
    assert resumed_metrics.validation[0]  # validation logged something
    assert resumed.kl_controller.value == whole.kl_controller.value != 0.1  # adaptive: it moved
    for (name, weight), (_, other) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(weight, other), name
