"""The experience maker: a sampled rollout in, a scored `Experience` out (OpenRLHF's pipeline, without a trainer).

    old and reference log-probs  ->  the scorers  ->  token rewards  ->  advantages and returns

Token rewards are assembled from the pieces `algos.rewards` documents: the KL penalty (when `ppo.kl_placement`
is "reward"), the dense scorers' terms, and the sequence score at the last token, which is first penalised for a
missing EOS, then clamped (`score_clip`), then scaled (`score_weight`, RTO's beta3). The advantage estimator is
the config's (`AdvantageConfig`), given the value scorer's values and final values and the group size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from dvpo_lightning.algos import (
    assemble_token_rewards,
    clamp_scores,
    kl_penalty,
    kl_reward,
    masked_whiten,
    penalize_unfinished,
)
from dvpo_lightning.rl.config import AdvantageConfig, PPOConfig
from dvpo_lightning.rl.forward import policy_logprobs, reference_logprobs
from dvpo_lightning.rl.sequences import Responses

SequenceScorer = Callable[[Responses, torch.Tensor], torch.Tensor]  # -> [B]
DenseScorer = Callable[[Responses, torch.Tensor], torch.Tensor]  # -> [B, R]
ValueScorer = Callable[[Responses], tuple[torch.Tensor, torch.Tensor]]  # -> [B, R], [B]


@dataclass
class Experience:
    """A scored rollout, ready for the update; every tensor is aligned with the response block."""

    responses: Responses
    old_logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    kl: torch.Tensor  # [B, R] the per-token KL estimate (`ppo.kl_estimator`)
    token_rewards: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    values: torch.Tensor | None  # [B, R] the value scorer's V(s_t); None without one
    reward: (
        torch.Tensor
    )  # [B] the algorithm's reward of each response (its score, else the final value), for logs

    @property
    def mask(self) -> torch.Tensor:
        return self.responses.response_mask

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, rows: torch.Tensor) -> Experience:
        """The rows `rows` of every tensor, with the response block trimmed to their longest response."""
        width = max(int(self.mask[rows].sum(-1).max()), 1)
        picked = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Responses):
                value = value.select(rows, width)
            elif isinstance(value, torch.Tensor):
                value = value[rows, :width] if value.dim() == 2 else value[rows]
            picked[item.name] = value
        return Experience(**picked)

    def nonfinite_quantities(self) -> list[str]:
        """Names of the quantities with a NaN or inf on a real token (the `NonFiniteGuard` skips their steps)."""
        quantities = {
            "rewards": self.token_rewards,
            "values": self.values,
            "advantages": self.advantages,
            "returns": self.returns,
        }
        return [
            name
            for name, value in quantities.items()
            if value is not None and not bool(torch.isfinite(value[self.mask]).all())
        ]


@dataclass
class Scorers:
    """What an algorithm scores its rollouts with (see `dvpo_lightning.rl.scorers`)."""

    score: SequenceScorer | None = None  # the sequence score, e.g. a reward model's
    dense: tuple[DenseScorer, ...] = ()  # per-token reward terms, e.g. RTO's DPO term
    values: ValueScorer | None = None  # a critic or a GVM; None for critic-free estimators
    score_clip: float | None = None  # clamp of the (penalised) score
    score_weight: float = 1.0  # weight of the (penalised, clamped) score

    def reward(self, responses: Responses, ref_logprobs: torch.Tensor) -> torch.Tensor | None:
        """The reward `[B]` of answers as `rollout/reward` logs it: the sequence score, else the value scorer's value
        of the complete response (DVPO's GVM); None for neither."""
        if self.score is not None:
            return self.score(responses, ref_logprobs)
        return self.values(responses)[1] if self.values is not None else None


class ExperienceMaker:
    """Scores rollouts of `policy` against its reference with `scorers`, the KL coefficient `kl_coef()` and the
    estimator `advantage`. Needs no Trainer: a notebook or `evaluation` builds one from models."""

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        scorers: Scorers,
        ppo: PPOConfig,
        advantage: AdvantageConfig,
        kl_coef: Callable[[], float],
        temperature: float = 1.0,
    ):
        self.policy, self.reference, self.scorers = policy, reference, scorers
        self.ppo, self.advantage, self.kl_coef, self.temperature = ppo, advantage, kl_coef, temperature

    def blocks(self, responses: Responses) -> list[torch.Tensor]:
        """Row indices of each forward pass of a scorer (`ppo.scoring_batch_size` rows): the rows sorted by length,
        so that a block holds rows of similar lengths and little padding."""
        size = len(responses.finished)
        if self.ppo.scoring_batch_size is None or self.ppo.scoring_batch_size >= size:
            return [torch.arange(size, device=responses.response_mask.device)]  # one block: nothing to sort
        order = torch.argsort(responses.total_lengths, stable=True)
        return list(order.split(self.ppo.scoring_batch_size))

    def in_blocks(self, responses: Responses, function: Callable) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """`function(block, rows)` on each block of rows of `responses`, trimmed of the padding its rows do not need;
        the results (`[b]` or `[b, w]` each) put back in row order, `[B]` or `[B, R]`."""
        blocks = self.blocks(responses)
        results = []
        for rows in blocks:
            block = responses.select(rows, max(int(responses.response_mask[rows].sum(-1).max()), 1))
            result = function(block, rows)
            results.append(result if isinstance(result, tuple) else (result,))
        order = torch.cat(blocks)
        merged = []
        for pieces in zip(*results):  # one quantity, block by block
            by_block = torch.cat([_widen(piece, responses.response_length) for piece in pieces])
            merged.append(torch.empty_like(by_block).index_copy_(0, order, by_block))
        return tuple(merged) if isinstance(result, tuple) else merged[0]

    @torch.no_grad()
    def make(self, responses: Responses) -> Experience:
        temperature, mask = self.temperature, responses.response_mask
        old_logprobs = self.in_blocks(
            responses, lambda block, rows: policy_logprobs(self.policy, block, temperature)[0]
        )
        ref_logprobs = self.in_blocks(
            responses, lambda block, rows: reference_logprobs(self.policy, self.reference, block, temperature)
        )
        values = final = None
        if self.scorers.values is not None:
            values, final = self.in_blocks(responses, lambda block, rows: self.scorers.values(block))
        raw_score = None
        if self.scorers.score is not None:
            raw_score = self.in_blocks(
                responses,
                lambda block, rows: self.scorers.score(block, ref_logprobs[rows, : block.response_length]),
            )
        dense = [
            self.in_blocks(
                responses,
                lambda block, rows, scorer=scorer: scorer(block, ref_logprobs[rows, : block.response_length]),
            )
            for scorer in self.scorers.dense
        ]
        kl = kl_penalty(old_logprobs, ref_logprobs, self.ppo.kl_estimator, mask=mask, clamp=self.ppo.kl_clamp)
        reward_terms = [kl_reward(kl, self.kl_coef(), mask)] if self.ppo.kl_placement == "reward" else []
        scores = self.sequence_scores(raw_score, responses.finished)
        token_rewards = assemble_token_rewards(mask, *reward_terms, *dense, scores=scores)
        advantages, returns = self.advantage(
            token_rewards=token_rewards,
            values=values,
            mask=mask,
            gamma=self.ppo.gamma,
            lam=self.ppo.lam,
            final_values=final,
            group_size=self.ppo.samples_per_prompt,
            scores=scores,
        )
        if self.advantage.whitens(self.ppo.whiten_advantages):
            advantages = masked_whiten(advantages, mask, distributed=True)
        return Experience(
            responses=responses,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            kl=kl,
            token_rewards=token_rewards,
            advantages=advantages,
            returns=returns,
            values=values,
            reward=raw_score if raw_score is not None else final,
        )

    def sequence_scores(self, raw: torch.Tensor | None, finished: torch.Tensor) -> torch.Tensor | None:
        """The score placed at the last token `[B]`: penalised for a missing EOS, clamped, then scaled."""
        penalty = self.ppo.missing_eos_penalty
        if raw is None and penalty is None:
            return None
        score = raw if raw is not None else torch.zeros(finished.shape, device=finished.device)
        if penalty is not None:
            score = penalize_unfinished(score, finished, penalty)
        if self.scorers.score_clip is not None:
            score = clamp_scores(score, self.scorers.score_clip)
        return self.scorers.score_weight * score


def _widen(piece: torch.Tensor, width: int) -> torch.Tensor:
    """A block's per-token result `[b, w]` padded with zeros to the rollout's `[b, width]`; `[b]` as it is."""
    return torch.nn.functional.pad(piece, (0, width - piece.shape[1])) if piece.dim() == 2 else piece
