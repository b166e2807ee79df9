"""The built-in task's gold reward token by token, the oracle critic built from it, a policy's own values by Monte
Carlo, gold-scored pairs of a policy's own samples, and the evaluation of value models against the gold reward."""

from __future__ import annotations

import json

import pytest
import torch

from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.collate import pad_sequences
from dvpo_lightning.evaluation import (
    evaluate_policy,
    gold_agreement,
    group_means,
    held_out_responses,
    judge_policy,
    pairwise_value_accuracy,
    value_scorer,
    within_token_pearson,
)
from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, export_model
from dvpo_lightning.rl import (
    GoldValues,
    MonteCarloValues,
    Responses,
    SamplingConfig,
    final_values,
    gold_rewards,
    gold_token_rewards,
    pair_sequences,
    state_values,
)
from dvpo_lightning.sampled_pairs import inner_special_tokens, write_scored_pairs
from tests.helpers.stages import export_random_value_model, tiny

PROMPT = "tell me about : cat river . answer :"


def rollout(tokenizer, texts: list[str], finished: list[bool]) -> Responses:
    """Responses to PROMPT: each text's words, then EOS where finished."""
    eos = [tokenizer.eos_token_id]
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    responses = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + (eos if done else [])
        for text, done in zip(texts, finished)
    ]
    prompt_ids, prompt_mask = pad_sequences([prompt] * len(texts), tokenizer.pad_token_id, "left")
    response_ids, response_mask = pad_sequences(responses, tokenizer.pad_token_id, "right")
    return Responses(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(finished))


def test_gold_token_rewards_by_hand(tokenizer):
    task = get_task("topics")
    responses = rollout(tokenizer, ["cat and cat", "river dog"], [True, False])
    rewards = gold_token_rewards(task, tokenizer, responses)
    # cover +1, filler -1/16, repeat -0.5, EOS 0 | cover +1, off-topic -0.5 and unfinished -1 on the last token
    assert rewards.tolist() == [[1.0, -0.0625, -0.5, 0.0], [1.0, -1.5, 0.0, 0.0]]
    assert rewards.sum(-1).tolist() == gold_rewards(task, tokenizer, responses)[0].tolist()


def test_a_special_token_inside_a_response_scores_nothing(tokenizer):
    task = get_task("topics")
    responses = rollout(tokenizer, ["cat <unk> river"], [True])
    assert gold_token_rewards(task, tokenizer, responses).tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_a_tokenizer_with_several_tokens_per_word_is_refused(tokenizer):
    responses = rollout(tokenizer, ["cat river"], [True])

    class OneWordTask:
        name = "one-word"

        def token_scores(self, prompt, response, finished):
            return [1.0, 0.0]  # a single word, then the end

    with pytest.raises(ValueError, match="into 1 words but the tokenizer into 2 tokens"):
        gold_token_rewards(OneWordTask(), tokenizer, responses)


def test_gold_values_are_the_gold_reward_earned_before_each_token(tokenizer):
    responses = rollout(tokenizer, ["cat and cat", "river dog"], [True, False])
    values, final = GoldValues(get_task("topics"), tokenizer)(responses)
    assert values.tolist() == [[0.0, 1.0, 0.9375, 0.4375], [0.0, 1.0, 0.0, 0.0]]
    assert final.tolist() == [0.4375, -0.5]


def test_greedy_monte_carlo_values_of_a_policys_own_greedy_answers_are_their_gold_rewards(tokenizer, cache):
    """Greedy decoding continues every prefix of a greedy answer with the rest of that answer, so each state's value
    is the answer's gold reward (rows of several lengths, finished and not: each row's budget is what it had)."""
    data = RLHFDataModule(
        "builtin:topics", mode="prompts", builtin_size=120, val_size=12, batch_size=12, cache_dir=str(cache)
    )
    data.setup("validate")
    policy = tiny_policy(tokenizer)
    greedy = SamplingConfig(max_new_tokens=6, do_sample=False)
    (answers,) = held_out_responses(policy, data, greedy)
    assert len(set(answers.lengths.tolist())) > 1 and answers.finished.any() and not answers.finished.all()
    values, final = MonteCarloValues(policy, data.task, tokenizer, greedy, continuations=2, batch_size=5)(
        answers
    )
    gold = gold_rewards(data.task, tokenizer, answers)[0]
    torch.testing.assert_close(final, gold)
    mask = answers.response_mask
    torch.testing.assert_close(values[mask], gold.unsqueeze(-1).expand_as(values)[mask])


def test_monte_carlo_values_refuse_answers_longer_than_their_budget(tokenizer):
    answers = rollout(tokenizer, ["cat and a river"], [True])  # 5 tokens
    scorer = MonteCarloValues(
        tiny_policy(tokenizer), get_task("topics"), tokenizer, SamplingConfig(max_new_tokens=4)
    )
    with pytest.raises(ValueError, match="within sampling.max_new_tokens=4 tokens, but a response has 5"):
        scorer(answers)


def tiny_policy(tokenizer):
    return build_policy(tiny(init_seed=3), tokenizer).eval()


def test_gold_scored_pairs_of_a_policys_samples(tokenizer, cache, tmp_path):
    policy_dir = export_model(build_policy(tiny(init_seed=3), tokenizer), tokenizer, str(tmp_path / "policy"))
    options = dict(builtin_size=120, val_size=20, batch_size=8, cache_dir=str(cache))
    output = tmp_path / "pairs.jsonl"
    written = write_scored_pairs(policy_dir, output, pairs=6, **options)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert written == len(rows) == 6
    task = get_task("topics")
    held_out = RLHFDataModule("builtin:topics", mode="prompts", **options)
    held_out.setup("fit")
    held_out_prompts = {held_out.tokenizer.decode(ids) for ids in held_out.val_dataset["prompt_ids"]}
    for row in rows:
        assert row["prompt"] not in held_out_prompts
        assert row["chosen"] != row["rejected"] and row["chosen_score"] >= row["rejected_score"]
        for key in ("chosen", "rejected"):
            # as the data module will see it: unfinished exactly when it fills the response budget
            finished = len(row[key].split()) < task.recommended_max_response_length
            assert row[f"{key}_score"] == task.score([row["prompt"]], [row[key]], [finished])[0]
    pairs = RLHFDataModule(str(output), tokenizer=policy_dir, mode="pairs", val_size=2, batch_size=4)
    pairs.setup("fit")
    batch = next(iter(pairs.train_dataloader()))
    assert {"chosen_score", "rejected_score"} <= set(batch)  # ready for the GVM's terminal_reward: score


@pytest.mark.slow
def test_pairs_scored_by_a_gvm_carry_its_complete_response_values_on_any_prompt_data(
    tokenizer, cache, hh_file, tmp_path
):
    """VC-PPO's Monte-Carlo targets as self-distillation: each answer's score is the GVM's value of it, as the GVM
    stage will read the pair back; prompts without a gold reward (HH-RLHF) are fine."""
    policy_dir = export_model(build_policy(tiny(init_seed=3), tokenizer), tokenizer, str(tmp_path / "policy"))
    gvm_dir = export_random_value_model(tmp_path / "gvm", tokenizer)
    output = tmp_path / "pairs.jsonl"
    options = dict(builtin_size=120, val_size=20, batch_size=8, cache_dir=str(cache))
    assert write_scored_pairs(policy_dir, output, pairs=4, value_model=gvm_dir, **options) == 4
    task = get_task("topics")  # a file's lengths are the task's, as when the answers were sampled
    lengths = {
        key: getattr(task, f"recommended_{key}") for key in ("max_prompt_length", "max_response_length")
    }
    pairs = RLHFDataModule(
        str(output), tokenizer=policy_dir, mode="pairs", val_size=1, batch_size=4, **lengths
    )
    pairs.setup("fit")
    batch = next(iter(pairs.train_dataloader()))
    sequences = pair_sequences(batch)
    with torch.no_grad():
        gvm = build_value_model(ModelSpec(name_or_path=gvm_dir), tokenizer)
        values = final_values(state_values(gvm, sequences), sequences.response_mask)  # [2B]
    scores = torch.cat([batch["chosen_score"], batch["rejected_score"]])
    torch.testing.assert_close(scores, values, atol=1e-4, rtol=1e-4)
    assert (batch["chosen_score"] >= batch["rejected_score"]).all() and values.std() > 1e-3
    hh_output = tmp_path / "hh_pairs.jsonl"
    assert write_scored_pairs(
        policy_dir, hh_output, str(hh_file), pairs=2, value_model=gvm_dir, max_samples=50
    )


def test_gold_scored_pairs_need_a_built_in_task(tokenizer, hh_file, tmp_path):
    policy_dir = export_model(build_policy(tiny(), tokenizer), tokenizer, str(tmp_path / "policy"))
    with pytest.raises(ValueError, match="need a built-in task's gold reward"):
        write_scored_pairs(policy_dir, tmp_path / "pairs.jsonl", dataset=str(hh_file), max_samples=50)


def test_answers_with_a_special_token_inside_are_found(tokenizer):
    responses = rollout(tokenizer, ["cat <unk> river", "cat river"], [True, False])
    assert inner_special_tokens(responses, tokenizer).tolist() == [True, False]


def test_the_gold_values_rank_held_out_pairs_as_their_gold_scores_do(cache):
    pairs = RLHFDataModule(
        "builtin:topics", mode="pairs", builtin_size=120, val_size=40, cache_dir=str(cache)
    )
    pairs.setup("validate")
    accuracy = pairwise_value_accuracy(GoldValues(pairs.task, pairs.tokenizer), pairs)
    chosen, rejected = (torch.tensor(pairs.val_dataset[f"{key}_score"]) for key in ("chosen", "rejected"))
    assert accuracy.pairs == 40
    assert accuracy.final_value == pytest.approx(float((chosen > rejected).float().mean()))


def test_gold_agreement_of_the_oracle_is_perfect_and_of_a_random_value_model_is_not(
    tokenizer, cache, tmp_path
):
    data = RLHFDataModule(
        "builtin:topics", mode="prompts", builtin_size=120, val_size=24, cache_dir=str(cache)
    )
    data.setup("validate")
    policy = build_policy(tiny(init_seed=3), tokenizer)
    samples = held_out_responses(policy, data, SamplingConfig(max_new_tokens=16))
    assert sum(len(responses.finished) for responses in samples) == 24
    oracle = gold_agreement(GoldValues(data.task, tokenizer), samples, data)
    assert (oracle.final_value_pearson, oracle.token_credit_pearson) == pytest.approx((1.0, 1.0))
    assert oracle.contextual_credit_pearson == pytest.approx(1.0)
    # the oracle credits each token its gold reward: the class means are the classes
    assert oracle.credit_by_gold_reward == pytest.approx(
        {key: float(key) for key in oracle.credit_by_gold_reward}
    )
    assert {"1", "-0.0625"} <= set(oracle.credit_by_gold_reward)
    random_model = export_random_value_model(tmp_path / "value", tokenizer)
    random = gold_agreement(value_scorer(random_model, data), samples, data)
    assert abs(random.final_value_pearson) < 0.9 and abs(random.token_credit_pearson) < 0.9
    assert random.responses == 24


def test_within_token_pearson_keeps_only_what_the_token_identity_does_not_explain():
    token_ids = torch.tensor([7, 7, 9, 9, 4])
    x = torch.tensor([1.0, 3.0, 2.0, 4.0, 5.0])
    # centred on their token's mean: x [-1, 1, -1, 1, 0], y [-1, 1, 1, -1, 0]: no agreement within the tokens,
    # although x and y agree across them
    y = torch.tensor([0.0, 2.0, 3.0, 1.0, 7.0])
    assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.5
    assert within_token_pearson(x, y, token_ids) == pytest.approx(0.0, abs=1e-6)
    # a token-level offset changes nothing: y [-1, 1, -1, 1, 0] after centring, as x
    assert within_token_pearson(x, torch.tensor([5.0, 7.0, -1.0, 1.0, 0.0]), token_ids) == pytest.approx(1.0)


def test_group_means_average_each_key():
    keys, means, group_of = group_means(
        torch.tensor([1.0, 2.0, 4.0, 7.0]), torch.tensor([0.5, -1.0, 0.5, 0.5])
    )
    assert keys.tolist() == [-1.0, 0.5] and means.tolist() == [2.0, 4.0] and group_of.tolist() == [1, 0, 1, 1]


def test_a_policy_judged_by_the_gold_values_gets_the_gold_reward_of_evaluate_policy(
    tokenizer, cache, tmp_path
):
    data = RLHFDataModule(
        "builtin:topics", mode="prompts", builtin_size=120, val_size=12, cache_dir=str(cache)
    )
    data.setup("validate")
    policy = export_model(build_policy(tiny(init_seed=5), tokenizer), tokenizer, str(tmp_path / "policy"))
    reference = export_model(
        build_policy(tiny(init_seed=6), tokenizer), tokenizer, str(tmp_path / "reference")
    )
    sampling = SamplingConfig(max_new_tokens=12)
    gold = evaluate_policy(policy, reference, data, sampling, seed=3)
    judged = judge_policy(
        policy, reference, data, sampling, {"gold": GoldValues(data.task, tokenizer)}, seed=3
    )
    assert judged.per_prompt["gold"] == pytest.approx(gold.per_prompt_gold)
    assert judged.kl_ref == pytest.approx(gold.kl_ref) and judged.kl_ref != 0
    assert judged.summary()["gold_reward"] == pytest.approx(gold.gold_reward)
    assert judged.response_length == pytest.approx(gold.response_length)
