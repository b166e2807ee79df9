"""Critic-free policy gradient (`CriticFreeModule`: GRPO, Dr. GRPO, GVM-scored GRPO, RLOO, REINFORCE++): what an
iteration trains and keeps frozen in each, and the checks of its scorer and of its groups.
"""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.models import ModelSpec
from dvpo_lightning.modules import CriticFreeModule, PPOConfig
from dvpo_lightning.rl import Responses, SamplingConfig, Scorers
from tests.helpers.onpolicy import assert_trains_only_what_it_should
from tests.helpers.stages import quick_trainer, tiny, topics_data

#: critic-free configurations, and the models each one trains and keeps frozen.
MODELS = {
    "grpo": ({"policy"}, {"reference", "scorer"}),
    "dr_grpo": ({"policy"}, {"reference", "scorer"}),
    "gvm_grpo": ({"policy"}, {"reference", "scorer"}),
    "rloo": ({"policy"}, {"reference", "scorer"}),
    "reinforce_pp": ({"policy"}, {"reference", "scorer"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_iteration_moves_every_trainable_parameter_and_no_frozen_one(name, runs):
    assert_trains_only_what_it_should(runs(name), *MODELS[name])


def test_critic_free_scoring_needs_exactly_one_of_a_reward_model_and_a_value_model():
    groups = PPOConfig(samples_per_prompt=2)  # the default estimator's groups, checked first
    for scorers in ({}, {"reward_model": tiny(), "value_model": tiny()}):
        with pytest.raises(ValueError, match=r"exactly one of `reward_model` .* or\s+`value_model`"):
            CriticFreeModule(policy=tiny(), ppo=groups, **scorers)


def test_a_group_estimator_with_one_sample_per_prompt_fails_at_construction_naming_samples_per_prompt():
    with pytest.raises(ValueError, match=r"advantage.estimator='grpo' .* \(set samples_per_prompt\)"):
        CriticFreeModule(policy=tiny(), reward_model=tiny(), ppo=PPOConfig(samples_per_prompt=1))


def test_dapo_overlong_shaping_is_a_dense_reward_at_the_last_token():
    """max_new_tokens 6, buffer 4: lengths 1, 3, 5, 6 get 0, -0.25, -0.75, -1 (times the factor 2)."""
    module = CriticFreeModule(
        policy=tiny(),
        reward_model=tiny(),
        sampling=SamplingConfig(max_new_tokens=6),
        ppo=PPOConfig(samples_per_prompt=2),
        overlong_buffer=4,
        overlong_penalty=2.0,
    )
    mask = torch.arange(6) < torch.tensor([[1], [3], [5], [6]])
    ids = torch.zeros(4, 6, dtype=torch.long)
    responses = Responses(ids[:, :1], mask[:, :1], ids, mask, torch.ones(4, dtype=torch.bool))
    module.scorer = torch.nn.Identity()  # instead of building the reward model
    (overlong,) = module.scorers().dense
    rewards = overlong(responses, torch.zeros(4, 6))
    assert rewards.sum(-1).tolist() == [0.0, -0.5, -1.5, -2.0]
    assert (
        rewards[torch.arange(4), mask.sum(-1) - 1] == rewards.sum(-1)
    ).all()  # all of it at the last token
    with pytest.raises(ValueError, match="overlong_buffer, overlong_penalty .*buffer=8, max_length=6"):
        CriticFreeModule(
            policy=tiny(),
            reward_model=tiny(),
            sampling=SamplingConfig(max_new_tokens=6),
            overlong_buffer=8,
            ppo=PPOConfig(samples_per_prompt=2),
        )


def test_dynamic_sampling_updates_once_a_batch_is_collected(tmp_path, cache, tokenizer, exports):
    """Scores all equal: every group is dropped, so the first rollout only collects; the second reaches the cap
    (max_generations 2), fills the batch with its own groups and updates."""
    module = CriticFreeModule(
        policy=tiny(),
        reward_model=ModelSpec(name_or_path=exports.reward_model),
        sampling=SamplingConfig(max_new_tokens=4),
        ppo=PPOConfig(samples_per_prompt=2, ppo_epochs=2),
        tokenizer=tokenizer,
        dynamic_sampling=True,
        max_generations=2,
    )
    module.scorers = lambda: Scorers(
        score=lambda responses, ref_logprobs: torch.zeros(len(responses.finished))
    )
    trainer = quick_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=topics_data(cache))
    assert trainer.global_step == 2  # one update of two epochs
    assert float(trainer.logged_metrics["rollout/generations"]) == 2.0
    rows = trainer.datamodule.batch_size * 2
    assert float(trainer.logged_metrics["rollout/dropped_groups"]) == 2 * (rows // 2)  # every group of both
