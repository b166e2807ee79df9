"""Scorers: what the frozen (or trained) models of an algorithm say about a rollout.

Three kinds, by what they give the experience maker:

- a *sequence scorer* `(responses, ref_logprobs) -> [B]`: one reward per response, placed at its last token
  (`SequenceValue` over a reward model, or over a GVM for GVM-scored GRPO; `GoldReward` on the built-in task);
- a *dense scorer* `(responses, ref_logprobs) -> [B, R]`: a reward per response token (`DPOTokenReward`, RTO's;
  `OverlongPenalty`, DAPO's length penalty at the last token);
- a *value scorer* `(responses) -> (values [B, R], final_values [B])`: V(s_t) before each token and the value of
  the complete response (`StateValues` over PPO's critic or DVPO's GVM; `GoldValues`, the oracle of the built-in
  task).

A new scorer is a class with that call; an algorithm chooses its scorers in its LightningModule.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import (
    add_at_last_token,
    dpo_token_reward,
    earned_values,
    overlong_penalty,
    rs_ppo_shaping,
)
from dvpo_lightning.rl.forward import final_values, policy_logprobs, state_values
from dvpo_lightning.rl.rollout import SamplingConfig, decode_responses, generate_responses
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


class OverlongPenalty:
    """DAPO's overlong reward shaping (`algos.overlong_penalty`) at each response's last token: 0 up to
    `max_length - buffer` tokens, then down to `-factor` at `max_length` (sampling's `max_new_tokens`)."""

    def __init__(self, max_length: int, buffer: int, factor: float = 1.0):
        overlong_penalty(torch.zeros(1), max_length, buffer, factor)  # a bad setting fails here, not mid-run
        self.max_length, self.buffer, self.factor = max_length, buffer, factor

    def __call__(self, responses: Responses, ref_logprobs: torch.Tensor) -> torch.Tensor:
        mask = responses.response_mask
        penalty = overlong_penalty(responses.lengths, self.max_length, self.buffer, self.factor)  # [B]
        return add_at_last_token(torch.zeros(mask.shape, device=mask.device), penalty, mask)  # [B, R]


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


class GoldValues:
    """An oracle critic on the built-in task: V(s_t) is the gold reward the prefix y_<t has earned and the complete
    response's value its gold reward (`algos.earned_values` of `gold_token_rewards`). Its TD errors are the gold
    token scores, so DVPO on it assigns credit exactly: the upper bound of what a frozen value model can give."""

    def __init__(self, task, tokenizer: PreTrainedTokenizerBase):
        self.task, self.tokenizer = task, tokenizer

    def __call__(self, responses: Responses) -> tuple[torch.Tensor, torch.Tensor]:
        mask = responses.response_mask
        return earned_values(gold_token_rewards(self.task, self.tokenizer, responses).to(mask.device), mask)


class MonteCarloValues:
    """The value function of `policy` on the built-in task, by Monte Carlo: V(s_t) is the mean gold reward of
    `continuations` responses that continue the prefix y_<t with `policy` (`sampling`, whose `max_new_tokens` is
    the whole response's budget), and the complete response's value its gold reward.

    What a value model of that policy's returns is trained to predict (expected returns, not the reward earned so
    far as `GoldValues`): the ceiling of a value model's token credit on the policy's own samples, short of
    sampling noise (which shrinks as `continuations` grows). Costs `continuations` sampled responses per state,
    `batch_size` responses a `generate` call; sampled from `seed` without touching the caller's random streams.
    """

    def __init__(
        self,
        policy: nn.Module,
        task,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingConfig,
        continuations: int = 32,
        batch_size: int = 1024,
        seed: int = 0,
    ):
        if continuations < 1:
            raise ValueError(f"continuations must be >= 1; got {continuations}")
        self.policy, self.task, self.tokenizer, self.sampling = policy, task, tokenizer, sampling
        self.continuations, self.batch_size, self.seed = continuations, batch_size, seed

    @torch.no_grad()
    def __call__(self, responses: Responses) -> tuple[torch.Tensor, torch.Tensor]:
        mask = responses.response_mask
        longest = int(mask.sum(-1).max())
        if longest > self.sampling.max_new_tokens:
            raise ValueError(
                f"MonteCarloValues continues responses within sampling.max_new_tokens="
                f"{self.sampling.max_new_tokens} tokens, but a response has {longest}: give the budget they were "
                "sampled with"
            )
        values = torch.zeros(mask.shape, device=mask.device)  # [B, R]
        cuda_devices = [mask.device] if mask.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):  # the caller's random streams stay as they were
            torch.manual_seed(self.seed)
            for t in range(mask.shape[1]):
                rows = torch.nonzero(mask[:, t]).flatten()  # the responses that visit state s_t
                for chunk in rows.split(max(1, self.batch_size // self.continuations)):
                    values[chunk, t] = self.continued_rewards(responses, chunk, t).mean(dim=-1)
        return values, gold_rewards(self.task, self.tokenizer, responses)[0].to(mask.device)

    def continued_rewards(self, responses: Responses, rows: torch.Tensor, t: int) -> torch.Tensor:
        """Gold rewards `[len(rows), continuations]` of the responses `rows` continued from their first `t` tokens."""
        k = self.continuations
        prefix = responses.response_input_ids[rows, :t].repeat_interleave(k, dim=0)  # [N * k, t], all real
        prompt_ids = responses.prompt_input_ids[rows].repeat_interleave(k, dim=0)
        prompt_mask = responses.prompt_attention_mask[rows].repeat_interleave(k, dim=0)
        real = torch.ones_like(prefix, dtype=torch.bool)
        budget = replace(
            self.sampling,
            max_new_tokens=self.sampling.max_new_tokens - t,
            min_new_tokens=max(0, self.sampling.min_new_tokens - t),
        )
        rest = generate_responses(
            self.policy,
            torch.cat([prompt_ids, prefix], 1),
            torch.cat([prompt_mask, real], 1),
            budget,
            self.tokenizer,
        )
        whole = Responses(
            prompt_ids,
            prompt_mask,
            torch.cat([prefix, rest.response_input_ids], 1),
            torch.cat([real, rest.response_mask], 1),
            rest.finished,
        )
        return gold_rewards(self.task, self.tokenizer, whole)[0].view(len(rows), k).to(rows.device)


def gold_rewards(
    task, tokenizer: PreTrainedTokenizerBase, responses: Responses
) -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in task's gold reward of each response and its fraction of the prompt's optimum, `[B]` each."""
    prompts, texts = decode_responses(tokenizer, responses)
    scores = torch.tensor(task.score(prompts, texts, responses.finished.tolist()), dtype=torch.float32)
    optimum = torch.tensor(task.optimum(prompts), dtype=torch.float32)
    return scores, scores / optimum.clamp(min=1e-8)


def gold_token_rewards(task, tokenizer: PreTrainedTokenizerBase, responses: Responses) -> torch.Tensor:
    """The built-in task's gold reward token by token, `[B, R]`, 0 on padding; each row sums to its gold reward.

    Each word's score (`task.token_scores`) sits on its token and the end's on the EOS token; an unfinished
    response's penalty for not finishing is added to its last token. Special tokens other than EOS score 0 (the
    task never sees them). Needs a tokenizer with one token per word of the task, as the built-in tasks' are.
    """
    prompts, texts = decode_responses(tokenizer, responses)
    special = set(tokenizer.all_special_ids)
    rewards = torch.zeros(responses.response_mask.shape)
    for row, (prompt, text, finished) in enumerate(zip(prompts, texts, responses.finished.tolist())):
        ids = responses.response_input_ids[row][responses.response_mask[row]].tolist()
        columns = torch.nonzero(responses.response_mask[row].cpu()).flatten().tolist()  # [T] of this row
        scores = task.token_scores(prompt, text, bool(finished))  # one per word, then the end's
        words = [column for column, token in zip(columns, ids) if token not in special]
        if len(words) != len(scores) - 1:
            raise ValueError(
                f"the task {task.name!r} splits the response {text!r} into {len(scores) - 1} words but the tokenizer "
                f"into {len(words)} tokens: gold token rewards need one token per word (the task's own tokenizer)"
            )
        rewards[row, words] = torch.tensor(scores[:-1])
        rewards[row, columns[-1]] += scores[-1]
    return rewards
