"""RTO: PPO whose per-token reward adds a dense DPO term (Reinforced Token Optimization)."""

from __future__ import annotations

import torch

from dvpo_lightning.algos import dpo_token_reward, rs_ppo_shaping
from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.modules.generation import Responses
from dvpo_lightning.modules.onpolicy import Scores
from dvpo_lightning.modules.ppo import PPOModule
from dvpo_lightning.modules.scoring import policy_logprobs

SHAPINGS = ("rto", "rs-ppo")


class RTOModule(PPOModule):
    """RTO (the algorithms doc, section 6): PPO with

        r_t = clip(beta1 * (log pi_dpo(y_t) - log pi_ref(y_t)), +-dpo_clip) - beta2 * KL_t,  + beta3 * r_RM at the end

    where beta2 is `ppo.kl_coef` and r_RM is PPO's sequence score (the reward model's, less
    `ppo.missing_eos_penalty` when unfinished, clamped): the penalty is part of the score, so beta3 scales it too. `beta1 = 0` turns the DPO term off (no DPO model is loaded): plain PPO.
    `shaping="rs-ppo"` subtracts each response's DPO sum at its last token, so the term only moves credit
    between tokens (the RS-PPO ablation).

    Args:
        dpo_model: the DPO-trained policy (the DPO stage's export); required unless beta1 = 0.
        beta1: weight of the dense DPO term.
        dpo_clip: bound of the scaled DPO term `beta1 * log-ratio` (the reference code uses 0.05); None = no clip
            (the paper).
        beta3: weight of the reward model's score.
        shaping: "rto" or "rs-ppo".
        **kwargs: `reward_model`, `critic`, `critic_optim`, `score_clip` (see `PPOModule`) and everything
            `PPOModule` passes on.
    """

    frozen_models = ("reference", "reward_model", "dpo_model")

    def __init__(
        self,
        dpo_model: ModelSpec | None = None,
        beta1: float = 0.05,
        dpo_clip: float | None = None,
        beta3: float = 1.0,
        shaping: str = "rto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if shaping not in SHAPINGS:
            raise ValueError(f"shaping must be one of {SHAPINGS}; got {shaping!r}")
        if beta1 != 0 and dpo_model is None:
            raise ValueError(
                f"beta1={beta1} needs `dpo_model` (the DPO stage's export); set beta1: 0 to run without the DPO term"
            )
        self.dpo_model_spec = dpo_model if beta1 != 0 else None
        self.beta1, self.dpo_clip, self.beta3, self.shaping = beta1, dpo_clip, beta3, shaping
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        super().build_models()
        self.dpo_model = (
            build_policy(self.dpo_model_spec, self.tokenizer, role="DPO model")
            if self.dpo_model_spec is not None
            else None
        )

    def score(self, responses: Responses, ref_logprobs: torch.Tensor) -> Scores:
        scores = super().score(responses, ref_logprobs)
        mask = responses.response_mask
        dpo_logprobs = None
        if self.dpo_model is not None:
            temperature = self.sampling.temperature
            rows = self.scoring_rows(len(responses.finished))
            dpo_logprobs = torch.cat(
                [policy_logprobs(self.dpo_model, responses.select(r), temperature)[0] for r in rows]
            )
        dense = dpo_token_reward(dpo_logprobs, ref_logprobs, mask, self.beta1, self.dpo_clip)
        if self.shaping == "rs-ppo":
            dense = rs_ppo_shaping(dense, mask)
        scores.dense_rewards.append(dense)
        scores.sequence_scores = self.beta3 * scores.sequence_scores
        return scores
