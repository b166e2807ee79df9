"""PPO (`PPOModule`): what an iteration trains and keeps frozen, with a critic from the reward model or from a
GVM, critic warm-up, the critic's starting weights, scoring (the reward at the last token, the critic's state
values), a frozen critic, and micro-batches accumulating to the mini-batch update.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules import OptimConfig
from dvpo_lightning.modules import onpolicy as onpolicy_module
from tests.helpers.onpolicy import (
    FINAL_POSITIONS,
    PositionValues,
    assert_state_positions,
    assert_trains_only_what_it_should,
    build_onpolicy,
    hand_built_rollout,
)
from tests.helpers.stages import quick_trainer, topics_data

#: PPO configurations, and the models each one trains and keeps frozen.
MODELS = {
    "ppo": ({"policy", "critic_model"}, {"reference", "reward_model"}),
    "ppo_frozen_critic": ({"policy"}, {"reference", "reward_model", "critic_model"}),
    "ppo_gvm_critic": ({"policy", "critic_model"}, {"reference", "reward_model"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_iteration_moves_every_trainable_parameter_and_no_frozen_one(name, runs):
    assert_trains_only_what_it_should(runs(name), *MODELS[name])


def test_critic_warmup_iterations_train_the_critic_and_leave_the_policy_as_it_was(runs):
    run = runs("ppo_critic_warmup")  # one iteration, all of it warm-up
    parameters = dict(run.module.named_parameters())
    for key, parameter in parameters.items():
        moved = not torch.equal(parameter, run.before[key])
        assert moved == key.startswith("critic_model."), key


def test_a_ppo_critic_starts_from_the_model_it_is_given(runs, exports, tokenizer):
    gvm = build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer)
    start = {f"critic_model.{key}": value for key, value in gvm.named_parameters()}
    assert all(torch.equal(runs("ppo_gvm_critic").before[key], value) for key, value in start.items())


def test_ppo_scores_with_the_reward_at_the_last_token_and_the_critics_state_values(tokenizer, exports):
    module = build_onpolicy("ppo", tokenizer, exports)
    module.configure_model()
    module.reward_model, module.critic_model = PositionValues(), PositionValues(offset=0.5)
    rollout = hand_built_rollout(tokenizer)
    scorers = module.scorers()
    values, _ = scorers.values(rollout)
    assert values.shape == rollout.response_mask.shape
    assert_state_positions(values, offset=0.5)
    assert scorers.score(rollout, torch.zeros(rollout.response_mask.shape)).tolist() == FINAL_POSITIONS


def test_ppo_with_a_frozen_critic_scores_with_it_but_never_trains_it(runs):
    module = runs("ppo_frozen_critic").module
    assert module.critic is None  # no value loss, no critic in the optimiser
    assert isinstance(module.scorers().values.model, PreTrainedModel)
    assert module.scorers().values.model is module.critic_model


# ------------------------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])  # token and sequence counts
def test_micro_batches_accumulate_to_the_mini_batch_update_and_log_its_loss(
    aggregation, monkeypatch, tokenizer, exports, cache, tmp_path
):
    rollout = hand_built_rollout(tokenizer)  # micro-batches of 2 rows hold different numbers of tokens
    monkeypatch.setattr(onpolicy_module, "generate_responses", lambda *args, **kwargs: rollout)
    # Plain SGD and no gradient clipping: the update is proportional to the gradient, so a micro-batch loss
    # scaled wrongly shows in the weights (Adam's first step and clipping would normalise it away).
    sgd = OptimConfig(optimizer="sgd", lr=0.1)
    deltas, logged = {}, {}
    for micro in (4, 2, 1):
        module = build_onpolicy(
            "ppo",
            tokenizer,
            exports,
            sgd,
            ppo_epochs=1,
            micro_batch_size=micro,
            max_grad_norm=None,
            loss_aggregation=aggregation,
            whiten_advantages=False,  # whitened advantages give a policy loss of ~0 at the first step
        )
        module.configure_model()
        before = {key: parameter.detach().clone() for key, parameter in module.named_parameters()}
        torch.manual_seed(0)
        trainer = quick_trainer(tmp_path / str(micro), max_steps=1)
        trainer.fit(module, datamodule=topics_data(cache))
        logged[micro] = [float(trainer.callback_metrics[key]) for key in ("policy/loss", "value/loss")]
        deltas[micro] = {
            key: parameter.detach() - before[key]
            for key, parameter in module.named_parameters()
            if parameter.requires_grad
        }
    largest = max(delta.abs().max() for delta in deltas[4].values())
    assert largest > 1e-3
    for micro in (2, 1):
        for key, delta in deltas[4].items():
            torch.testing.assert_close(deltas[micro][key], delta, rtol=1e-3, atol=1e-5 * largest, msg=key)
        # the logged losses are the mini-batch's, not divided by the number of micro-batches
        assert logged[micro] == pytest.approx(logged[4], rel=1e-5, abs=1e-7), micro
    assert all(abs(loss) > 1e-4 for loss in logged[4])
