"""What an RL iteration logs about its experience: rewards, lengths, KL, advantages, returns, values, samples."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import masked_mean, masked_sum, sequence_kl
from dvpo_lightning.rl.experience import Experience
from dvpo_lightning.rl.rollout import decode_responses


def experience_metrics(experience: Experience) -> dict[str, torch.Tensor]:
    """Per-iteration means over the rollout's responses and tokens, under `rollout/`, `kl/`, `advantages/`,
    `returns/` and `value/`. `kl/k1` and `kl/k3` are the KL to the reference summed over each response."""
    responses, mask = experience.responses, experience.mask
    kl_k1 = sequence_kl(experience.old_logprobs, experience.ref_logprobs, mask, "k1")  # [B]
    kl_k3 = sequence_kl(experience.old_logprobs, experience.ref_logprobs, mask, "k3")  # [B]
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


def iteration_metrics(
    experience: Experience,
    update_stats: dict[str, float],
    kl_coef: float,
    phase_seconds: dict[str, float],
    gold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """What one RL iteration logs: its experience's metrics, the KL coefficient (`kl/coef`), each phase's wall time
    (`time/<phase>`), the update's statistics and, on the built-in task, the gold reward and its fraction of the
    optimum of each response (`gold`: two `[B]`)."""
    metrics = {
        **experience_metrics(experience),
        "kl/coef": torch.tensor(kl_coef),
        **{f"time/{name}": torch.tensor(seconds) for name, seconds in phase_seconds.items()},
        **{name: torch.tensor(value) for name, value in update_stats.items()},
    }
    if gold is not None:
        metrics["rollout/gold_reward"], metrics["rollout/gold_fraction"] = (part.mean() for part in gold)
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


def no_eos_warning(max_new_tokens: int, missing_eos_penalty: float | None) -> str:
    """What to tell a user whose rollout has no response that emitted EOS."""
    penalty = (
        f", each lost ppo.missing_eos_penalty={missing_eos_penalty}"
        if missing_eos_penalty is not None
        else ""
    )
    return (
        f"No response of a rollout emitted EOS within sampling.max_new_tokens={max_new_tokens} tokens: all were "
        f"scored as unfinished (rollout/finished_rate is 0{penalty}); raise sampling.max_new_tokens if responses "
        "need more room"
    )
