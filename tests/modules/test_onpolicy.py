"""The on-policy modules (PPO, DVPO, RTO): what an iteration trains and what it must not, padding, value
alignment, DVPO's models and bootstrap conventions, the KL controller in checkpoints, generation, gradient
accumulation, metrics and option checks.

Each configuration of `tests.helpers.onpolicy.ONPOLICY` is fitted at most once (one RL iteration, two
optimiser steps, a large learning rate) by the module-scoped `runs` fixture; the tests of training,
checkpoints and metrics read those fits. The tests of the experience run `make_experience` on the
hand-built rollout, whose rows have known lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import pytest
import torch
from transformers import PreTrainedModel

from dvpo_lightning.algos import earned_values, loss_normalizers
from dvpo_lightning.models import (
    LoraSpec,
    ModelSpec,
    build_policy,
    build_value_model,
    export_model,
    response_logits,
)
from dvpo_lightning.modules import (
    DVPOModule,
    OnPolicyModule,
    OptimConfig,
    PPOConfig,
    PPOModule,
    RTOModule,
    SamplingConfig,
)
from dvpo_lightning.modules import dvpo as dvpo_module
from dvpo_lightning.modules import onpolicy as onpolicy_module
from dvpo_lightning.rl import (
    final_values,
    generate_responses,
    gold_token_rewards,
    policy_logprobs,
    state_values,
)
from tests.helpers.onpolicy import (
    ONPOLICY,
    PositionValues,
    ScriptedPolicy,
    bias_logits,
    build_onpolicy,
    export_frozen_models,
    gvm_bootstrap,
    hand_built_rollout,
    pad_rollout,
    perturb,
    row_alone,
)
from tests.helpers.stages import quick_trainer, tiny, topics_data
from tests.helpers.tiny import TINY_ARCH

#: configurations trained in the parametrised tests, and the models each one trains and keeps frozen
#: (a LoRA policy's base weights are frozen: they are its reference).
MODELS = {
    "dvpo_gvm": ({"policy"}, {"reference", "value_model"}),
    "dvpo_zero": ({"policy"}, {"reference", "value_model"}),
    "dvpo_lora": ({"policy"}, {"policy", "value_model"}),
    "dvpo_gold": ({"policy"}, {"reference"}),
    "ppo": ({"policy", "critic_model"}, {"reference", "reward_model"}),
    "ppo_frozen_critic": ({"policy"}, {"reference", "reward_model", "critic_model"}),
    "rto": ({"policy", "critic_model"}, {"reference", "reward_model", "dpo_model"}),
    "rto_without_dpo": ({"policy", "critic_model"}, {"reference", "reward_model"}),
    "rto_rs_ppo": ({"policy", "critic_model"}, {"reference", "reward_model", "dpo_model"}),
    "ppo_gvm_critic": ({"policy", "critic_model"}, {"reference", "reward_model"}),
    "grpo": ({"policy"}, {"reference", "scorer"}),
    "dr_grpo": ({"policy"}, {"reference", "scorer"}),
    "gvm_grpo": ({"policy"}, {"reference", "scorer"}),
    "rloo": ({"policy"}, {"reference", "scorer"}),
    "reinforce_pp": ({"policy"}, {"reference", "scorer"}),
}
#: configurations whose scoring paths differ: frozen reference, disabled adapter, critic and reward model, DPO
#: model, and a policy with absolute positions.
PADDING = ("dvpo_gvm", "dvpo_lora", "ppo", "rto_rs_ppo", "dvpo_gpt2", "grpo")
#: those whose rows are scored independently (a group estimator's row needs its group)
ROW_WISE = tuple(name for name in PADDING if "samples_per_prompt" not in ONPOLICY[name].ppo)
PER_TOKEN = ("old_logprobs", "ref_logprobs", "kl", "values", "token_rewards", "advantages", "returns")


@dataclass
class Run:
    module: OnPolicyModule
    trainer: pl.Trainer
    before: dict[str, torch.Tensor]  # every parameter before training, by name


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return export_frozen_models(tmp_path_factory.mktemp("exports"), tokenizer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache, tokenizer, exports):
    """`runs(name)`: configuration `name` after one iteration on the built-in task (fitted on first use)."""
    fitted: dict[str, Run] = {}

    def run(name: str) -> Run:
        if name not in fitted:
            module = build_onpolicy(name, tokenizer, exports)
            module.configure_model()
            before = {key: parameter.detach().clone() for key, parameter in module.named_parameters()}
            trainer = quick_trainer(tmp_path_factory.mktemp(name), max_steps=2)
            torch.manual_seed(0)
            trainer.fit(module, datamodule=topics_data(cache))
            fitted[name] = Run(module, trainer, before)
        return fitted[name]

    return run


def top_level(names) -> set[str]:
    return {name.split(".", 1)[0] for name in names}


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("name", list(MODELS))
def test_one_iteration_moves_every_trainable_parameter_and_no_frozen_one(name, runs):
    run = runs(name)
    assert run.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1  # one RL iteration
    assert run.trainer.global_step == 2  # of two PPO epochs, one optimiser step each
    parameters = dict(run.module.named_parameters())
    trainable = [key for key, parameter in parameters.items() if parameter.requires_grad]
    frozen = [key for key, parameter in parameters.items() if not parameter.requires_grad]
    assert (top_level(trainable), top_level(frozen)) == MODELS[name]
    assert [key for key in trainable if torch.equal(parameters[key], run.before[key])] == []
    assert [key for key in frozen if not torch.equal(parameters[key], run.before[key])] == []
    run.module.train()  # as a strategy or user code may: frozen models must stay in eval mode
    for model_name in run.module.frozen_models:
        model = getattr(run.module, model_name, None)
        if model is not None:
            assert not model.training, f"frozen {model_name} left eval mode"


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


# ------------------------------------------------------------------------------------------------- padding
def assert_same_on_real_tokens(padded, plain, padded_mask, plain_mask) -> None:
    for name in PER_TOKEN:
        if getattr(plain, name) is None:  # values of a critic-free algorithm
            assert getattr(padded, name) is None, name
            continue
        expected = getattr(plain, name)[plain_mask]
        torch.testing.assert_close(getattr(padded, name)[padded_mask], expected, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", PADDING)
def test_extra_padding_changes_no_number_of_the_experience_or_the_loss(name, tokenizer, exports):
    module = build_onpolicy(name, tokenizer, exports)
    module.configure_model()
    perturb(module.policy)  # the policy leaves the reference: KL terms are not all zero
    rollout = hand_built_rollout(tokenizer)
    padded = pad_rollout(rollout, tokenizer.pad_token_id, left=3, right=2)
    plain, wide = module.experience_maker().make(rollout), module.experience_maker().make(padded)
    mask, width = rollout.response_mask, rollout.response_length
    assert plain.kl[mask].abs().max() > 1e-4
    assert_same_on_real_tokens(wide, plain, padded.response_mask, mask)
    for field in ("token_rewards", "advantages", "returns"):
        assert torch.count_nonzero(getattr(wide, field)[:, width:]) == 0, f"{field} on padding"
    # A policy that moved since the rollout, so the ratios are not all 1 and every token's log-prob counts.
    perturb(module.policy, seed=1)
    with torch.no_grad():
        loss, stats = module.updater().loss(plain, loss_normalizers(mask))
        padded_loss, padded_stats = module.updater().loss(wide, loss_normalizers(padded.response_mask))
    assert padded_loss.item() == pytest.approx(loss.item(), abs=1e-5)
    assert padded_stats["policy/entropy"].item() == pytest.approx(stats["policy/entropy"].item(), abs=1e-5)


@pytest.mark.parametrize("name", ROW_WISE)
def test_a_heavily_padded_batch_matches_its_rows_scored_one_at_a_time(name, tokenizer, exports):
    module = build_onpolicy(name, tokenizer, exports, whiten_advantages=False)  # whitening mixes rows
    module.configure_model()
    perturb(module.policy)
    padded = pad_rollout(hand_built_rollout(tokenizer), tokenizer.pad_token_id, left=6, right=5)
    batch = module.experience_maker().make(padded)
    rows = [module.experience_maker().make(row_alone(padded, row)) for row in range(len(batch))]
    for row, alone in enumerate(rows):
        assert alone.mask.all()  # no padding at all
        this_row = torch.zeros_like(batch.mask)
        this_row[row] = batch.mask[row]
        assert_same_on_real_tokens(batch, alone, this_row, alone.mask)
    perturb(module.policy, seed=1)
    normalizers = loss_normalizers(batch.mask)  # the batch's counts: the rows' losses sum to the batch loss
    with torch.no_grad():
        total = sum(module.updater().loss(alone, normalizers)[0] for alone in rows)
        loss = module.updater().loss(batch, normalizers)[0]
    assert total.item() == pytest.approx(loss.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------- value alignment
# The hand-built rollout has prompts of 3, 5, 2, 4 tokens and responses of 4, 1, 3, 5 tokens. Position ids count
# real tokens from 0, so V(s_t), read before response token t, is at position (prompt length - 1 + t), and the
# complete response at its last real token, position (prompt length - 1 + response length).
STATE_POSITIONS = [[2, 3, 4, 5], [4], [1, 2, 3], [3, 4, 5, 6, 7]]
FINAL_POSITIONS = [6, 5, 4, 8]


def assert_state_positions(values: torch.Tensor, offset: float = 0.0) -> None:
    for row, expected in enumerate(STATE_POSITIONS):
        assert values[row, : len(expected)].tolist() == [position + offset for position in expected]


@pytest.mark.parametrize("left, right", [(0, 0), (3, 2)])
def test_state_values_are_read_before_each_token_and_final_values_at_the_last(left, right, tokenizer):
    rollout = pad_rollout(hand_built_rollout(tokenizer), tokenizer.pad_token_id, left, right)
    values = state_values(PositionValues(), rollout)  # [B, R + 1]
    assert values.shape == (4, rollout.response_length + 1)
    assert_state_positions(values)
    assert final_values(values, rollout.response_mask).tolist() == FINAL_POSITIONS


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


@pytest.mark.parametrize(
    "name, options, expected",
    [
        # reward-model scores [6, 5, 4, 8]; rows 1 and 3 are unfinished: 6, 0, 4, 3, then clamped to +-1
        ("ppo", {"score_clip": 1.0}, [1.0, 0.0, 1.0, 1.0]),
        ("rto_without_dpo", {"score_clip": 1.0, "beta3": 2.0}, [2.0, 0.0, 2.0, 2.0]),  # scaled with the score
        ("dvpo_gvm", {}, [0.0, -5.0, 0.0, -5.0]),  # no score: the penalty alone
    ],
)
def test_the_missing_eos_penalty_is_applied_to_the_score_before_it_is_clamped_and_scaled(
    name, options, expected, tokenizer, exports
):
    module = build_onpolicy(name, tokenizer, exports, missing_eos_penalty=5.0)
    for option, value in options.items():
        setattr(module, option, value)
    module.configure_model()
    for scorer in ("reward_model", "critic_model", "value_model", "scorer"):
        if hasattr(module, scorer):
            setattr(module, scorer, PositionValues())
    rollout = hand_built_rollout(tokenizer)
    maker = module.experience_maker()
    score = maker.scorers.score
    raw = score(rollout, torch.zeros(rollout.response_mask.shape)) if score is not None else None
    assert maker.sequence_scores(raw, rollout.finished).tolist() == expected


# ----------------------------------------------------------------------------------------------- DVPO models
def hf_models(module: OnPolicyModule) -> set[str]:
    return {name for name, child in module.named_children() if isinstance(child, PreTrainedModel)}


def parameter_names(module: OnPolicyModule, parameters) -> set[str]:
    names = {id(parameter): name for name, parameter in module.named_parameters()}
    return {names[id(parameter)] for parameter in parameters}


def trainable_names(module: OnPolicyModule, *models: str) -> set[str]:
    return {f"{model}.{name}" for model in models for name, _ in getattr(module, model).named_parameters()}


def adam_moments(run: Run) -> int:
    """Numbers held in the optimisers' first and second moments."""
    states = [state for optimizer in run.trainer.optimizers for state in optimizer.state.values()]
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
        assert adam_moments(run) == 2 * counts[models]
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


def test_ppo_with_a_frozen_critic_scores_with_it_but_never_trains_it(runs):
    module = runs("ppo_frozen_critic").module
    assert module.critic is None  # no value loss, no critic in the optimiser
    assert isinstance(module.scorers().values.model, PreTrainedModel)
    assert module.scorers().values.model is module.critic_model


# ---------------------------------------------------------------------------------------------- checkpoints
def test_kl_controller_state_is_checkpointed_and_restored_and_frozen_models_are_left_out(
    runs, tokenizer, tmp_path
):
    run = runs("dvpo_adaptive_kl")
    # The rollout's KL is exactly 0 (policy == reference before the update), so with target 1 the error is
    # clipped at -0.2, and 4 samples over horizon 10 give 0.1 * (1 - 0.2 * 4 / 10).
    assert run.module.kl_controller.value == pytest.approx(0.092)
    path = tmp_path / "dvpo.ckpt"
    run.trainer.save_checkpoint(path)
    checkpoint = torch.load(
        path
    )  # torch's default weights_only=True: the config dataclasses are allow-listed
    assert checkpoint["kl_controller"]["value"] == pytest.approx(0.092)
    assert top_level(checkpoint["state_dict"]) == {"policy"}  # no reference, no GVM
    restored = DVPOModule.load_from_checkpoint(path, tokenizer=tokenizer)
    assert restored.kl_controller.value == pytest.approx(0.092)
    trained = run.module.state_dict()
    state = restored.state_dict()
    assert [key for key in checkpoint["state_dict"] if not torch.equal(state[key], trained[key])] == []


# ----------------------------------------------------------------------------------------------- generation
def test_generation_cuts_responses_after_the_first_eos_and_passes_the_sampling_settings(tokenizer):
    rollout = hand_built_rollout(tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    a, b, c = rollout.prompt_input_ids[1, :3].tolist()  # ordinary tokens
    policy = ScriptedPolicy(
        torch.tensor(
            [
                [a, eos, b, eos, c],  # finished at its first EOS
                [a, b, c, a, b],  # unfinished: fills the budget
                [eos, a, b, c, a],  # an empty answer: EOS only
                [a, b, eos, pad, pad],  # what HF returns for a row that finished early
            ]
        )
    )
    sampling = SamplingConfig(max_new_tokens=5, min_new_tokens=1, temperature=0.7, top_p=0.9, top_k=5)
    responses = generate_responses(
        policy, rollout.prompt_input_ids, rollout.prompt_attention_mask, sampling, tokenizer
    )
    assert responses.response_input_ids.tolist() == [
        [a, eos, pad, pad, pad],
        [a, b, c, a, b],
        [eos, pad, pad, pad, pad],
        [a, b, eos, pad, pad],
    ]
    assert responses.response_mask.int().tolist() == [
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0],
    ]
    assert responses.finished.tolist() == [True, False, True, True]
    assert torch.equal(responses.prompt_input_ids, rollout.prompt_input_ids)
    assert torch.equal(responses.prompt_attention_mask, rollout.prompt_attention_mask)
    settings = policy.calls[0]
    assert settings == {
        **settings,
        "training": False,  # generation runs in eval mode
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "max_new_tokens": 5,
        "min_new_tokens": 1,
        "pad_token_id": pad,
        "eos_token_id": eos,
        "suppress_tokens": [pad],
    }
    assert policy.training  # and gives the policy back in the mode it had
    greedy = SamplingConfig(max_new_tokens=5, do_sample=False, temperature=0.7)
    generate_responses(policy, rollout.prompt_input_ids, rollout.prompt_attention_mask, greedy, tokenizer)
    assert policy.calls[1]["do_sample"] is False
    assert not {"temperature", "top_p", "top_k"} & set(policy.calls[1])


@pytest.fixture(scope="module")
def eager_policy(tokenizer):
    """A tiny policy that would rather emit padding (+10) and often ends early (EOS +2.5)."""
    policy = build_policy(tiny(), tokenizer)
    bias_logits(policy, {tokenizer.pad_token_id: 10.0, tokenizer.eos_token_id: 2.5})
    return policy


def test_sampled_responses_hold_no_padding_and_end_at_their_first_eos(eager_policy, tokenizer):
    rollout = hand_built_rollout(tokenizer)
    prompt_ids = rollout.prompt_input_ids.repeat(4, 1)  # [16, P]
    prompt_mask = rollout.prompt_attention_mask.repeat(4, 1)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    responses = generate_responses(
        eager_policy, prompt_ids, prompt_mask, SamplingConfig(max_new_tokens=6), tokenizer
    )
    ids, mask, finished = responses.response_input_ids, responses.response_mask, responses.finished
    assert finished.any() and not finished.all()  # both kinds of row are checked
    assert torch.equal(responses.prompt_input_ids, prompt_ids)  # prompts stay as given: left-padded
    assert torch.equal(responses.prompt_attention_mask, prompt_mask)
    lengths = responses.lengths
    assert torch.equal(mask, torch.arange(ids.shape[1]) < lengths[:, None])  # right-padded
    assert (ids[mask] != pad).all(), "the pad token was sampled"
    assert (ids[~mask] == pad).all()
    last = ids.gather(1, (lengths - 1)[:, None])[:, 0]
    assert torch.equal(finished, last == eos)
    assert torch.equal(((ids == eos) & mask).sum(-1), finished.long())  # EOS only at the end
    assert (lengths[~finished] == 6).all()


def test_greedy_decoding_is_deterministic_and_picks_the_most_likely_allowed_token(eager_policy, tokenizer):
    rollout = hand_built_rollout(tokenizer)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
    answers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        answers.append(
            generate_responses(
                eager_policy, rollout.prompt_input_ids, rollout.prompt_attention_mask, greedy, tokenizer
            )
        )
    first, second = answers
    assert torch.equal(first.response_input_ids, second.response_input_ids)
    mask = first.response_mask
    with torch.no_grad():
        logits = response_logits(eager_policy, *first.model_inputs(), first.response_length)  # [B, R, V]
    logits[..., tokenizer.pad_token_id] = -math.inf  # the pad token is never a candidate
    assert torch.equal(logits.argmax(-1)[mask], first.response_input_ids[mask])


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


# ---------------------------------------------------------------------------------------------------- metrics
ITERATION_METRICS = (
    "rollout/reward",
    "rollout/response_length",
    "rollout/gold_reward",
    "kl/k1",
    "kl/k3",
    "policy/entropy",
    "policy/clip_fraction",
    "policy/approx_kl",
    "advantages/mean",
    "time/generate",
    "time/score",
    "time/update",
)


@pytest.mark.parametrize("name", ["dvpo_gvm", "ppo", "ppo_frozen_critic"])
def test_one_iteration_logs_the_rl_metrics(name, runs):
    metrics = runs(name).trainer.callback_metrics
    expected = ITERATION_METRICS + (("value/loss",) if name == "ppo" else ())
    assert [key for key in expected if key not in metrics] == []
    assert ("value/loss" in metrics) == (name == "ppo")  # DVPO and a frozen critic train no critic
    assert all(math.isfinite(float(metrics[key])) for key in expected)
    assert all(float(metrics[f"time/{stage}"]) > 0 for stage in ("generate", "score", "update"))
    assert 1 <= float(metrics["rollout/response_length"]) <= 8


# ---------------------------------------------------------------------------------------------- option checks
@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: RTOModule(policy=tiny(), reward_model=tiny(), beta1=0.1), "dpo_model"),
        (lambda: RTOModule(policy=tiny(), reward_model=tiny(), beta1=0.0, shaping="reward"), "shaping"),
        (
            lambda: DVPOModule(policy=tiny(), value_model=tiny(), advantage=gvm_bootstrap("last_value")),
            "bootstrap",
        ),
        (
            lambda: DVPOModule(policy=tiny(), value_model=tiny(), reference_as_disabled_adapter=True),
            "reference_as_disabled_adapter",
        ),
        (lambda: DVPOModule(policy=tiny()), "gold_values"),
        (lambda: DVPOModule(policy=tiny(), value_model=tiny(), gold_values=True), "gold_values"),
        (lambda: DVPOModule(policy=tiny(), gold_values=True, ppo=PPOConfig(gamma=0.9)), "ppo.gamma"),
        (
            lambda: PPOModule(
                policy=tiny(), reward_model=tiny(), train_critic=False, critic_warmup_iterations=2
            ),
            "train_critic",
        ),
        (lambda: PPOConfig(ppo_epochs=0), "ppo_epochs"),
        (lambda: PPOConfig(micro_batch_size=0), "micro_batch_size"),
        (lambda: SamplingConfig(temperature=0.0), "temperature"),
    ],
    ids=[
        "rto_beta1_without_dpo_model",
        "rto_unknown_shaping",
        "dvpo_unknown_bootstrap",
        "disabled_adapter_without_lora",
        "dvpo_without_values",
        "dvpo_with_gvm_and_gold_values",
        "dvpo_gold_values_discounted",
        "ppo_frozen_critic_warmup",
        "zero_ppo_epochs",
        "zero_micro_batch_size",
        "zero_temperature",
    ],
)
def test_bad_options_fail_at_construction_naming_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


@pytest.mark.parametrize(
    "options, option",
    [
        ({"kl_estimator": "k5"}, "kl_estimator"),
        ({"loss_aggregation": "mean"}, "loss_aggregation"),
        ({"gamma": 2.0}, "gamma"),
        ({"kl_controller": "adaptive"}, "kl_target"),
        ({"kl_target": 6.0}, "kl_target"),
    ],
    ids=[
        "unknown_kl_estimator",
        "unknown_loss_aggregation",
        "gamma_above_one",
        "adaptive_without_target",
        "target_without_adaptive",
    ],
)
def test_ppo_settings_fail_at_construction_naming_the_option(options, option):
    with pytest.raises(ValueError, match=option):
        PPOConfig(**options)


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
