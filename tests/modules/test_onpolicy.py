"""The engine the on-policy modules share (`OnPolicyModule`): padding changes no number of the experience or
the loss, values are read at the right positions, the missing-EOS penalty, the KL controller in checkpoints,
generation, the logged metrics, and the checks of the options every on-policy module takes. What each algorithm
trains and its own behaviour are in test_dvpo.py, test_ppo.py, test_rto.py and test_critic_free.py.

Configurations of `tests.helpers.onpolicy.ONPOLICY` are fitted at most once per file by the module-scoped `runs`
fixture (tests/modules/conftest.py); the tests of checkpoints and metrics read those fits. The tests of the
experience run `make_experience` on the hand-built rollout, whose rows have known lengths.
"""

from __future__ import annotations

import math

import pytest
import torch

from dvpo_lightning.algos import loss_normalizers
from dvpo_lightning.models import build_policy, response_logits
from dvpo_lightning.modules import DVPOModule, PPOConfig, PPOModule, SamplingConfig
from dvpo_lightning.rl import final_values, generate_responses, state_values
from tests.helpers.onpolicy import (
    FINAL_POSITIONS,
    ONPOLICY,
    PositionValues,
    ScriptedPolicy,
    assert_state_positions,
    bias_logits,
    build_onpolicy,
    gvm_bootstrap,
    hand_built_rollout,
    pad_rollout,
    perturb,
    row_alone,
    top_level,
)
from tests.helpers.stages import tiny

#: configurations whose scoring paths differ: frozen reference, disabled adapter, critic and reward model, DPO
#: model, and a policy with absolute positions.
PADDING = ("dvpo_gvm", "dvpo_lora", "ppo", "rto_rs_ppo", "dvpo_gpt2", "grpo")
#: those whose rows are scored independently (a group estimator's row needs its group)
ROW_WISE = tuple(name for name in PADDING if "samples_per_prompt" not in ONPOLICY[name].ppo)
PER_TOKEN = ("old_logprobs", "ref_logprobs", "kl", "values", "token_rewards", "advantages", "returns")


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
# The hand-built rollout has prompts of 3, 5, 2, 4 tokens and responses of 4, 1, 3, 5 tokens: see STATE_POSITIONS.
@pytest.mark.parametrize("left, right", [(0, 0), (3, 2)])
def test_state_values_are_read_before_each_token_and_final_values_at_the_last(left, right, tokenizer):
    rollout = pad_rollout(hand_built_rollout(tokenizer), tokenizer.pad_token_id, left, right)
    values = state_values(PositionValues(), rollout)  # [B, R + 1]
    assert values.shape == (4, rollout.response_length + 1)
    assert_state_positions(values)
    assert final_values(values, rollout.response_mask).tolist() == FINAL_POSITIONS


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
