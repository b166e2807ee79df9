"""The built-in task's gold reward token by token, and the oracle critic built from it."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.collate import pad_sequences
from dvpo_lightning.rl import GoldValues, Responses, gold_rewards, gold_token_rewards

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
