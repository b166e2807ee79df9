"""Scorers: what the frozen (or trained) models of an algorithm say about a rollout.

Three kinds, by what they give the experience maker:

- a *sequence scorer* `(responses, ref_logprobs) -> [B]`: one reward per response, placed at its last token
  (`SequenceValue` over a reward model, or over a GVM for GVM-scored GRPO; `GoldReward` on the built-in task);
- a *dense scorer* `(responses, ref_logprobs) -> [B, R]`: a reward per response token (`DPOTokenReward`, RTO's);
- a *value scorer* `(responses) -> (values [B, R], final_values [B])`: V(s_t) before each token and the value of
  the complete response (`StateValues` over PPO's critic or DVPO's GVM).

A new scorer is a class with that call; an algorithm chooses its scorers in its LightningModule.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import dpo_token_reward, rs_ppo_shaping
from dvpo_lightning.rl.forward import final_values, policy_logprobs, state_values
from dvpo_lightning.rl.rollout import decode_responses
from dvpo_lightning.rl.sequences import Responses

DPO_SHAPINGS = ("rto", "rs-ppo")


class SequenceValue:
    """A value model's output at the last real token: a reward model's score, or a GVM's value of the complete
    response (GVM-scored GRPO)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, responses: Responses, ref_logprobs: torch.Tensor) -> torch.Tensor:
        return final_values(state_values(self.model, responses), responses.response_mask)  # [B]


class StateValues:
    """A critic's or a GVM's values: V(s_t) `[B, R]` and the complete response's value `[B]`."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def __call__(self, responses: Responses) -> tuple[torch.Tensor, torch.Tensor]:
        values = state_values(self.model, responses)  # [B, R + 1]
        return values[:, :-1], final_values(values, responses.response_mask)


class DPOTokenReward:
    """RTO's dense reward `clip(beta1 * (log pi_dpo - log pi_ref), +-clip)` per token (`algos.dpo_token_reward`);
    `shaping="rs-ppo"` moves each response's sum to its last token (RS-PPO). `dpo_model=None` with `beta1 = 0`."""

    def __init__(
        self,
        dpo_model: nn.Module | None,
        beta1: float,
        clip: float | None,
        temperature: float,
        shaping: str = "rto",
    ):
        if shaping not in DPO_SHAPINGS:
            raise ValueError(f"shaping must be one of {DPO_SHAPINGS}; got {shaping!r}")
        self.dpo_model, self.beta1, self.clip = dpo_model, beta1, clip
        self.temperature, self.shaping = temperature, shaping

    @torch.no_grad()
    def __call__(self, responses: Responses, ref_logprobs: torch.Tensor) -> torch.Tensor:
        mask = responses.response_mask
        dpo_logprobs = None
        if self.dpo_model is not None:
            dpo_logprobs = policy_logprobs(self.dpo_model, responses, self.temperature)[0]
        dense = dpo_token_reward(dpo_logprobs, ref_logprobs, mask, self.beta1, self.clip)  # [B, R]
        return rs_ppo_shaping(dense, mask) if self.shaping == "rs-ppo" else dense


class GoldReward:
    """The built-in task's gold reward of each response (known only on the built-in task)."""

    def __init__(self, task, tokenizer: PreTrainedTokenizerBase):
        self.task, self.tokenizer = task, tokenizer

    def __call__(self, responses: Responses, ref_logprobs: torch.Tensor | None = None) -> torch.Tensor:
        return gold_rewards(self.task, self.tokenizer, responses)[0].to(responses.response_mask.device)


def gold_rewards(
    task, tokenizer: PreTrainedTokenizerBase, responses: Responses
) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in task's gold reward of each response and its fraction of the prompt's optimum, `[B]` each."""
    prompts, texts = decode_responses(tokenizer, responses)
    scores = torch.tensor(task.score(prompts, texts, responses.finished.tolist()), dtype=torch.float32)
    optimum = torch.tensor(task.optimum(prompts), dtype=torch.float32)
    return scores, scores / optimum.clamp(min=1e-8)
