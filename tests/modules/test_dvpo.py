"""DVPO (`DVPOModule`): what an iteration trains and keeps frozen in each configuration, the LoRA policy's
reference (its adapter disabled), the GVM's values given to the estimator, fewer models, trained parameters and
optimiser states than PPO and never a critic, the final-value bootstrap, gold values, and the checks of the GVM
it loads (a trained final value, its gamma) and of LoRA dropout.
"""

from __future__ import annotations

import pytest
import torch
from lightning import pytorch as pl
from transformers import PreTrainedModel

from dvpo_lightning.algos import earned_values, loss_normalizers
from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy, build_value_model, export_model
from dvpo_lightning.modules import DVPOModule, OnPolicyModule
from dvpo_lightning.modules import dvpo as dvpo_module
from dvpo_lightning.rl import (
    PPOConfig,
    final_values,
    generate_responses,
    gold_token_rewards,
    policy_logprobs,
    state_values,
)
from tests.helpers.onpolicy import (
    FINAL_POSITIONS,
    PositionValues,
    assert_state_positions,
    assert_trains_only_what_it_should,
    build_onpolicy,
    gvm_bootstrap,
    hand_built_rollout,
    perturb,
)
from tests.helpers.stages import tiny
from tests.helpers.tiny import TINY_ARCH

#: DVPO configurations, and the models each one trains and keeps frozen (a LoRA policy's base weights are
#: frozen: they are its reference).
MODELS = {
    "dvpo_gvm": ({"policy"}, {"reference", "value_model"}),
    "dvpo_zero": ({"policy"}, {"reference", "value_model"}),
    "dvpo_lora": ({"policy"}, {"policy", "value_model"}),
    "dvpo_gold": ({"policy"}, {"reference"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_iteration_moves_every_trainable_parameter_and_no_frozen_one(name, runs):
    assert_trains_only_what_it_should(runs(name), *MODELS[name])


def test_a_lora_policys_reference_is_its_base_model_with_the_adapter_disabled(runs, tokenizer):
    module = runs("dvpo_lora").module
    assert module.reference is None  # no second copy of the weights
    rollout = hand_built_rollout(tokenizer)
    mask = rollout.response_mask
    with torch.no_grad():
        base = policy_logprobs(build_policy(tiny(), tokenizer), rollout)[0]
        reference = module.reference_logprobs(rollout)
        trained = policy_logprobs(module.policy, rollout)[0]
    torch.testing.assert_close(reference[mask], base[mask], rtol=0, atol=1e-6)
    assert (trained[mask] - base[mask]).abs().max() > 1e-3  # the adapter trained, the reference did not


def test_dvpo_gives_its_estimator_the_gvm_state_values_and_final_values(tokenizer, exports):
    module = build_onpolicy("dvpo_gvm", tokenizer, exports)
    module.configure_model()
    module.value_model = PositionValues()
    rollout = hand_built_rollout(tokenizer)
    scorers = module.scorers()
    values, final = scorers.values(rollout)
    assert values.shape == rollout.response_mask.shape  # [B, R]: the complete response's column is dropped
    assert_state_positions(values)
    assert final.tolist() == FINAL_POSITIONS
    assert (module.advantage.estimator, module.advantage.option("bootstrap")) == ("gvm", "final_value")
    assert scorers.score is None and scorers.dense == ()  # no reward model, no score
    assert module.experience_maker().make(rollout).reward.tolist() == FINAL_POSITIONS


# ----------------------------------------------------------------------------------------------- DVPO models
def hf_models(module: OnPolicyModule) -> set[str]:
    return {name for name, child in module.named_children() if isinstance(child, PreTrainedModel)}


def parameter_names(module: OnPolicyModule, parameters) -> set[str]:
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    return {names[id(parameter)] for parameter in parameters}


def trainable_names(module: OnPolicyModule, *models: str) -> set[str]:
    return {f"{model}.{name}" for model in models for name, _ in getattr(module, model).named_parameters()}


def adam_moments(trainer: pl.Trainer) -> int:
    """Numbers held in the optimisers' first and second moments."""
    states = [state for optimizer in trainer.optimizers for state in optimizer.state.values()]
    return sum(state[key].numel() for state in states for key in ("exp_avg", "exp_avg_sq"))


def test_dvpo_holds_fewer_models_trained_parameters_and_optimiser_states_than_ppo(runs):
    dvpo, ppo = runs("dvpo_gvm"), runs("ppo")
    assert hf_models(dvpo.module) == {"policy", "reference", "value_model"}
    assert hf_models(ppo.module) == {"policy", "reference", "reward_model", "critic_model"}
    assert dvpo.module.critic is None
    counts = {}
    for run, models in ((dvpo, ("policy",)), (ppo, ("policy", "critic_model"))):
        module = run.module
        trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
        assert parameter_names(module, trainable) == trainable_names(module, *models)
        optimised = [parameter for optimizer in run.trainer.optimizers for parameter in optimizer.state]
        assert parameter_names(module, optimised) == trainable_names(module, *models)
        counts[models] = sum(parameter.numel() for parameter in trainable)
        assert adam_moments(run.trainer) == 2 * counts[models]
    assert counts[("policy",)] < counts[("policy", "critic_model")]


def test_dvpo_never_builds_a_critic_or_a_reward_model(monkeypatch, tokenizer, exports):
    roles = []

    def recording_build_value_model(spec, tokenizer, role="value model"):
        roles.append(role)
        return build_value_model(spec, tokenizer, role)

    monkeypatch.setattr(dvpo_module, "build_value_model", recording_build_value_model)
    module = build_onpolicy("dvpo_gvm", tokenizer, exports)
    module.configure_model()
    assert roles == ["global value model"]
    assert not hasattr(module, "reward_model") and not hasattr(module, "critic_model")


def test_dvpo_final_value_bootstrap_adds_the_final_value_to_every_advantage_of_its_row(tokenizer, exports):
    rollout = hand_built_rollout(tokenizer)
    mask = rollout.response_mask
    modules, experiences = {}, {}
    for name in ("dvpo_gvm", "dvpo_zero"):
        module = modules[name] = build_onpolicy(
            name, tokenizer, exports, whiten_advantages=False, gamma=1.0, lam=1.0
        )
        module.configure_model()
        perturb(module.policy)  # KL rewards too, the same in both
        experiences[name] = module.experience_maker().make(rollout)
    with torch.no_grad():
        final = final_values(state_values(modules["dvpo_gvm"].value_model, rollout), mask)  # [B]
    assert final.abs().min() > 1e-3
    expected = torch.where(mask, final[:, None], 0.0)  # A_gvm - A_zero = V_final * (gamma * lam)^k = V_final
    gvm, zero = experiences["dvpo_gvm"], experiences["dvpo_zero"]
    torch.testing.assert_close(gvm.advantages - zero.advantages, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(gvm.returns - zero.returns, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(gvm.token_rewards, zero.token_rewards)  # the bootstrap is no reward


def test_dvpo_with_gold_values_scores_with_the_gold_reward_earned_before_each_token(runs, tokenizer):
    run = runs("dvpo_gold")
    module = run.module
    assert not hasattr(module, "value_model") and module.critic is None
    data = run.trainer.datamodule
    prompts = next(iter(data.train_dataloader()))
    rollout = generate_responses(
        module.policy,
        prompts["prompt_input_ids"],
        prompts["prompt_attention_mask"],
        module.sampling,
        tokenizer,
    )
    values, final = module.scorers().values(rollout)
    gold = gold_token_rewards(data.task, tokenizer, rollout)  # [B, R]
    expected_values, expected_final = earned_values(gold, rollout.response_mask)
    torch.testing.assert_close(values, expected_values)
    torch.testing.assert_close(final, expected_final)
    assert float(gold.abs().sum()) > 0


def test_dvpo_gold_values_need_a_built_in_task(tokenizer):
    module = DVPOModule(policy=tiny(), gold_values=True, tokenizer=tokenizer)
    module.configure_model()
    with pytest.raises(ValueError, match="gold_values=true needs the gold reward of a built-in task"):
        module.scorers()  # no Trainer, so no data module and no task


# --------------------------------------------------------------------------------- the GVM and LoRA it loads
@pytest.mark.parametrize("train_final_value", [True, False])
def test_dvpo_refuses_a_gvm_whose_final_value_was_never_trained_when_it_reads_it(
    train_final_value, tokenizer, exports, tmp_path
):
    gvm = build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer)
    training = {
        "terminal_reward": "preference",
        "gamma": 1.0,
        "lam": 0.95,
        "train_final_value": train_final_value,
    }
    path = export_model(gvm, tokenizer, str(tmp_path / "gvm"), info={"value_training": training})
    for bootstrap in ("final_value", "zero"):
        module = DVPOModule(
            policy=tiny(),
            value_model=ModelSpec(name_or_path=path),
            advantage=gvm_bootstrap(bootstrap),
            tokenizer=tokenizer,
        )
        if bootstrap == "final_value" and not train_final_value:
            with pytest.raises(ValueError, match="bootstrap`='final_value' .* train_final_value=false"):
                module.check_model_sources()
        else:
            module.check_model_sources()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"advantage": gvm_bootstrap("zero")}, "needs `advantage.estimator`='gvm' with .*'final_value'"),
        ({"ppo": PPOConfig(gamma=0.9)}, "`ppo.gamma` must be 1; got 0.9"),
        ({}, None),
    ],
)
def test_dvpo_refuses_to_misread_an_earned_gvm(options, message, tokenizer, exports, tmp_path):
    gvm = build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer)
    info = {"value_training": {"value_form": "earned", "gamma": 1.0, "train_final_value": True}}
    path = export_model(gvm, tokenizer, str(tmp_path / "gvm"), info=info)
    module = DVPOModule(
        policy=tiny(), value_model=ModelSpec(name_or_path=path), tokenizer=tokenizer, **options
    )
    if message is None:
        module.check_model_sources()
    else:
        with pytest.raises(ValueError, match=message):
            module.check_model_sources()


def test_dvpo_refuses_to_misread_an_earned_gvm_with_no_export_record(tokenizer, exports, tmp_path):
    """Its config says how to read it: DVPO checks that too when it loads the model."""
    gvm = build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer)
    gvm.config.dvpo_value_form = "earned"
    path = export_model(gvm, tokenizer, str(tmp_path / "gvm"))
    module = DVPOModule(
        policy=tiny(), value_model=ModelSpec(name_or_path=path), tokenizer=tokenizer, ppo=PPOConfig(gamma=0.9)
    )
    module.check_model_sources()  # no record of how it was trained
    with pytest.raises(ValueError, match="`ppo.gamma` must be 1; got 0.9"):
        module.configure_model()


def test_dvpo_warns_when_its_gamma_is_not_the_one_its_gvm_was_trained_with(tokenizer, exports, tmp_path):
    gvm = build_value_model(ModelSpec(name_or_path=exports.gvm), tokenizer)
    path = export_model(gvm, tokenizer, str(tmp_path / "gvm"), info={"value_training": {"gamma": 0.9}})
    module = DVPOModule(policy=tiny(), value_model=ModelSpec(name_or_path=path), tokenizer=tokenizer)
    with pytest.warns(UserWarning, match=r"`ppo.gamma`=1.0 differs from the gamma=0.9"):
        module.check_model_sources()


def test_lora_dropout_is_off_so_the_first_update_starts_at_a_ratio_of_exactly_one(tokenizer, exports):
    lora = LoraSpec(r=4, alpha=8, dropout=0.5)
    with pytest.warns(UserWarning, match=r"lora.dropout=0.5 is switched off by disable_dropout=true"):
        policy = ModelSpec(arch=TINY_ARCH, lora=lora)
    module = DVPOModule(policy=policy, value_model=ModelSpec(name_or_path=exports.gvm), tokenizer=tokenizer)
    module.configure_model()
    perturb(module.policy)  # non-zero LoRA B matrices: dropout on the adapters' input would show
    module.train()
    experience = module.experience_maker().make(hand_built_rollout(tokenizer))
    normalizers = loss_normalizers(experience.mask)
    _, stats = module.updater().loss(experience, normalizers)
    assert float(stats["policy/ratio_max"]) == 1.0 and float(stats["policy/ratio_mean"]) == 1.0
