"""What an RL iteration logs about its experience: rewards, lengths, KL, advantages, returns, values, samples."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import kl_penalty, masked_mean, masked_sum
from dvpo_lightning.rl.experience import Experience
from dvpo_lightning.rl.rollout import decode_responses


def experience_metrics(experience: Experience) -> dict[str, torch.Tensor]:
    """Per-iteration means over the rollout's responses and tokens, under `rollout/`, `kl/`, `advantages/`,
    `returns/` and `value/`. `kl/k1` and `kl/k3` are the KL to the reference summed over each response."""
    responses, mask = experience.responses, experience.mask
    kl_k1 = masked_sum(
        kl_penalty(experience.old_logprobs, experience.ref_logprobs, "k1"), mask, dim=-1
    )  # [B]
    kl_k3 = masked_sum(
        kl_penalty(experience.old_logprobs, experience.ref_logprobs, "k3"), mask, dim=-1
    )  # [B]
    metrics = {
        "rollout/response_length": responses.lengths.float().mean(),
        "rollout/finished_rate": responses.finished.float().mean(),
        "rollout/token_reward_sum": masked_sum(experience.token_rewards, mask, dim=-1).mean(),
        "kl/k1": kl_k1.mean(),
        "kl/k3": kl_k3.mean(),
        "advantages/mean": masked_mean(experience.advantages, mask),
        "advantages/max": experience.advantages[mask].max(),
        "advantages/min": experience.advantages[mask].min(),
        "returns/mean": masked_mean(experience.returns, mask),
    }
    if experience.reward is not None:
        metrics["rollout/reward"] = experience.reward.mean()
    if experience.values is not None:
        metrics["value/mean"] = masked_mean(experience.values, mask)
    return metrics


def sample_rows(
    experience: Experience, tokenizer: PreTrainedTokenizerBase, gold: torch.Tensor | None, count: int = 4
) -> list[dict]:
    """The first `count` (prompt, response, rewards) rows, for the sample logger callback."""
    head = experience.select(torch.arange(min(count, len(experience)), device=experience.mask.device))
    prompts, texts = decode_responses(tokenizer, head.responses)
    return [
        {
            "prompt": prompt,
            "response": text,
            "finished": bool(head.responses.finished[row]),
            **({"reward": float(head.reward[row])} if head.reward is not None else {}),
            **({"gold_reward": float(gold[row])} if gold is not None else {}),
        }
        for row, (prompt, text) in enumerate(zip(prompts, texts))
    ]
