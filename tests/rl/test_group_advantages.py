"""The group estimators inside the experience maker: their advantages are not whitened a second time unless asked
for (the review's example), and RLOO's OpenRLHF form receives the sequence scores."""

from __future__ import annotations

import copy

import pytest
import torch

from dvpo_lightning.models import build_policy, freeze
from dvpo_lightning.rl import AdvantageConfig, ExperienceMaker, PPOConfig, Responses, Scorers
from tests.helpers.onpolicy import perturb
from tests.helpers.stages import tiny

SCORES = torch.tensor([1.0, 0.0, 0.4])
LENGTHS = [8, 1, 1]
GRPO = [1.0596, -0.9272, -0.1325]  # (r - 0.4667) / (0.5033 + 1e-6), one prompt's group of three
GRPO_WHITENED = [0.4568, -2.3984, -1.2563]  # the same, whitened again over the 10 tokens (unbiased std)


def _rollout(tokenizer) -> Responses:
    ordinary = next(i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids)
    response_mask = torch.tensor([[True] * length + [False] * (8 - length) for length in LENGTHS])
    response_ids = torch.where(response_mask, ordinary, tokenizer.pad_token_id)
    prompt = torch.full((3, 2), ordinary)
    return Responses(
        prompt, torch.ones(3, 2, dtype=torch.bool), response_ids, response_mask, torch.ones(3).bool()
    )


def _experience(tokenizer, advantage: AdvantageConfig, **ppo):
    policy = build_policy(tiny(), tokenizer)
    reference = freeze(copy.deepcopy(policy))
    perturb(policy)  # a KL to the reference that is not 0
    maker = ExperienceMaker(
        policy,
        reference,
        Scorers(score=lambda responses, ref_logprobs: SCORES),
        PPOConfig(samples_per_prompt=3, **ppo),
        advantage,
        lambda: 0.1,
    )
    return maker.make(_rollout(tokenizer))


def _first_tokens(advantages: torch.Tensor) -> list[float]:
    return [round(value, 4) for value in advantages[:, 0].tolist()]


def test_grpo_advantages_are_not_whitened_again_unless_asked_for(tokenizer):
    """The review's example: scores (1, 0, 0.4), lengths (8, 1, 1), the KL in the loss."""
    experience = _experience(tokenizer, AdvantageConfig("grpo"), kl_placement="loss", kl_estimator="k3")
    assert _first_tokens(experience.advantages) == pytest.approx(GRPO, abs=1e-4)
    asked = _experience(
        tokenizer, AdvantageConfig("grpo"), kl_placement="loss", kl_estimator="k3", whiten_advantages=True
    )
    assert _first_tokens(asked.advantages) == pytest.approx(GRPO_WHITENED, abs=1e-4)
    dr_grpo = _experience(
        tokenizer, AdvantageConfig("grpo", {"scale_by_std": False}), kl_placement="loss", kl_estimator="k3"
    )
    assert _first_tokens(dr_grpo.advantages) == pytest.approx([0.5333, -0.4667, -0.0667], abs=1e-4)


def test_rloo_openrlhf_form_baselines_the_scores_the_maker_places(tokenizer):
    """The KL stays in the token rewards; the baseline is the other responses' mean score: (0.2, 0.7, 0.5)."""
    experience = _experience(tokenizer, AdvantageConfig("rloo", {"form": "openrlhf"}), kl_placement="reward")
    mask = experience.mask
    return_to_go = torch.where(mask, experience.token_rewards, 0).flip(-1).cumsum(-1).flip(-1)
    expected = torch.where(mask, return_to_go - torch.tensor([[0.2], [0.7], [0.5]]), 0)
    torch.testing.assert_close(experience.advantages, expected)
    assert experience.kl[mask].abs().sum() > 0  # a KL term that the score baseline leaves alone
