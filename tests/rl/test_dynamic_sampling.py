"""DAPO's dynamic sampling: groups whose rewards are all equal are dropped, the kept ones fill a batch over several
rollouts, the cap fills the rest with the last rollout's dropped groups; joining rollouts changes no number."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.algos import varied_groups
from dvpo_lightning.rl import DynamicSampling, Experience, Responses, concat_experiences


def test_varied_groups_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert varied_groups(rewards, 2).tolist() == [False, False, True, True, False, False]
    assert varied_groups(torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5, 0.5]), 3).tolist() == [True] * 3 + [False] * 3
    with pytest.raises(ValueError, match="group_size 4 does not divide the batch size 6"):
        varied_groups(rewards, 4)


def rollout(rewards: list[float], width: int, prompt_width: int, tag: float) -> Experience:
    """A scored rollout: response i has `1 + i % width` tokens; every per-token tensor holds `tag + row` on real
    tokens, so that rows can be followed."""
    rows = len(rewards)
    response_mask = torch.arange(width) < (1 + torch.arange(rows) % width).unsqueeze(-1)  # [B, width]
    prompt_mask = (
        torch.arange(prompt_width) >= prompt_width - 1 - torch.arange(rows).unsqueeze(-1) % prompt_width
    )
    ids = torch.arange(rows).unsqueeze(-1) + 1
    per_token = torch.where(response_mask, tag + torch.arange(rows, dtype=torch.float).unsqueeze(-1), 0)
    return Experience(
        responses=Responses(
            torch.where(prompt_mask, ids, 0),
            prompt_mask,
            torch.where(response_mask, ids, 0),
            response_mask,
            torch.ones(rows, dtype=torch.bool),
        ),
        old_logprobs=per_token,
        ref_logprobs=per_token,
        kl=per_token,
        token_rewards=per_token,
        advantages=per_token,
        returns=per_token,
        values=None,
        reward=torch.tensor(rewards),
    )


class Rollouts:
    """An experience maker that returns prepared rollouts in turn."""

    def __init__(self, *rollouts: Experience):
        self.rollouts = list(rollouts)

    def make(self, responses) -> Experience:
        return self.rollouts.pop(0)


def tags(experience: Experience) -> list[float]:
    return experience.advantages[:, 0].tolist()


def test_kept_groups_of_several_rollouts_fill_the_batch():
    first = rollout([1, 1, 0, 1, 2, 2], width=3, prompt_width=2, tag=10)  # only group 2 varies
    second = rollout([0, 1, 3, 3, 1, 0], width=5, prompt_width=4, tag=20)  # groups 1 and 3 vary
    maker, sampler = Rollouts(first, second), DynamicSampling(group_size=2, max_generations=5)
    assert sampler.around(maker).make(None) is None  # 2 rows kept of 6: sample again
    batch = sampler.around(maker).make(None)
    assert tags(batch) == [12, 13, 20, 21, 24, 25]
    assert sampler.stats == {"rollout/generations": 2.0, "rollout/dropped_groups": 3.0}
    assert sampler.kept == [] and sampler.generations == 0  # the next batch starts afresh
    # every row as it was in its own rollout: padding only moved
    for row, (source, index) in enumerate([(first, 2), (first, 3), (second, 0), (second, 1), (second, 4)]):
        length = int(source.mask[index].sum())
        assert batch.mask[row].sum() == length
        torch.testing.assert_close(batch.token_rewards[row, :length], source.token_rewards[index, :length])
        prompt = source.responses.prompt_input_ids[index][source.responses.prompt_attention_mask[index]]
        torch.testing.assert_close(
            batch.responses.prompt_input_ids[row][batch.responses.prompt_attention_mask[row]], prompt
        )


def test_the_cap_fills_the_batch_with_the_last_rollouts_dropped_groups():
    maker = Rollouts(rollout([1, 1, 0, 0], 2, 2, tag=10), rollout([1, 1, 0, 1], 2, 2, tag=20))
    sampler = DynamicSampling(group_size=2, max_generations=2)
    assert sampler.around(maker).make(None) is None
    assert tags(sampler.around(maker).make(None)) == [22, 23, 20, 21]
    assert sampler.stats == {"rollout/generations": 2.0, "rollout/dropped_groups": 3.0}


def test_a_rollout_whose_groups_all_vary_is_the_batch_as_it_is():
    only = rollout([0, 1, 2, 3], 3, 2, tag=0)
    batch = DynamicSampling(group_size=2, max_generations=3).around(Rollouts(only)).make(None)
    for name in ("old_logprobs", "advantages", "reward"):
        torch.testing.assert_close(getattr(batch, name), getattr(only, name))
    assert batch.values is None


def test_concat_pads_every_block_to_the_widest_part():
    joined = concat_experiences([rollout([0, 1], 2, 3, tag=0), rollout([0, 1], 4, 1, tag=5)])
    assert joined.responses.prompt_input_ids.shape == (4, 3) and joined.mask.shape == (4, 4)
    assert joined.responses.prompt_attention_mask[:, -1].all()  # prompts stay left-padded


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        DynamicSampling(group_size=1, max_generations=3)
