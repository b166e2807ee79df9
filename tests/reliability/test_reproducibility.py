"""The same configuration and seed give identical metrics and weights on CPU, for every stage: two fits of each
module, from the same seed, log the same numbers at every step and end with the same parameters, bit for bit.
On-policy stages sample their rollouts, so this needs every random draw to come from the seeded generators.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from dvpo_lightning.callbacks import NonFiniteGuard, RandomState
from tests.helpers.onpolicy import build_onpolicy, export_frozen_models
from tests.helpers.stages import Exports, build_stage, quick_trainer, topics_data

STAGES = ("sft", "reward_model", "gvm_preference", "dpo_sigmoid", "ppo", "dvpo_gvm", "rto")


class MetricsPerStep(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(
            {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if not name.startswith("time/")
            }
        )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return export_frozen_models(tmp_path_factory.mktemp("exports"), tokenizer)


def fit(name: str, root, cache, tokenizer, exports) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    pl.seed_everything(0)
    if name in ("ppo", "dvpo_gvm", "rto"):
        module = build_onpolicy(name, tokenizer, exports)
    else:
        module = build_stage(name, tokenizer, Exports(reward_model=exports.reward_model))
    metrics = MetricsPerStep()
    trainer = quick_trainer(root, max_steps=4, callbacks=[metrics, RandomState(), NonFiniteGuard()])
    trainer.fit(module, datamodule=topics_data(cache, size=40))
    weights = {key: value.clone() for key, value in module.state_dict().items()}
    return metrics.steps, weights


@pytest.mark.parametrize("name", STAGES)
def test_the_same_seed_gives_the_same_metrics_and_weights(name, tmp_path, cache, tokenizer, exports):
    first_metrics, first_weights = fit(name, tmp_path / "first", cache, tokenizer, exports)
    second_metrics, second_weights = fit(name, tmp_path / "second", cache, tokenizer, exports)
    assert (
        len(first_metrics) >= 2 and first_metrics[0] != first_metrics[-1]
    )  # steps that log changing numbers
    assert first_metrics == second_metrics
    assert first_weights.keys() == second_weights.keys()
    for key, weight in first_weights.items():
        assert torch.equal(weight, second_weights[key]), key
