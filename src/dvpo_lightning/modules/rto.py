"""RTO: PPO whose per-token reward adds a dense DPO term (Reinforced Token Optimization)."""

from __future__ import annotations

from dataclasses import replace

from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.modules.ppo import PPOModule
from dvpo_lightning.rl import DPOTokenReward, Scorers


class RTOModule(PPOModule):
    """RTO (docs/algorithms.md §9): PPO with

        r_t = clip(beta1 * (log pi_dpo(y_t) - log pi_ref(y_t)), +-dpo_clip) - beta2 * KL_t,  + beta3 * r_RM at the end

    where beta2 is `ppo.kl_coef` and r_RM is PPO's sequence score (the reward model's, less
    `ppo.missing_eos_penalty` when unfinished, clamped): the penalty is part of the score, so beta3 scales it too.
    `beta1 = 0` turns the DPO term off (no DPO model is loaded): plain PPO. `shaping="rs-ppo"` subtracts each
    response's DPO sum at its last token, so the term only moves credit between tokens (the RS-PPO ablation).

    Args:
        dpo_model: the DPO-trained policy (the DPO stage's export); required unless beta1 = 0.
        beta1: weight of the dense DPO term.
        dpo_clip: bound of the scaled DPO term `beta1 * log-ratio` (the reference code uses 0.05); None = no clip
            (the paper).
        beta3: weight of the reward model's score.
        shaping: "rto" or "rs-ppo".
        **kwargs: `reward_model`, `critic`, `critic_optim`, `score_clip`, `critic_warmup_iterations` (see
            `PPOModule`) and everything `PPOModule` passes on.
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
        if beta1 != 0 and dpo_model is None:
            raise ValueError(
                f"beta1={beta1} needs `dpo_model` (the DPO stage's export); set beta1: 0 to run without the DPO term"
            )
        self.dpo_model_spec = dpo_model if beta1 != 0 else None
        self.beta1, self.dpo_clip, self.beta3, self.shaping = beta1, dpo_clip, beta3, shaping
        self.dpo_term(dpo_model=None)  # checks `shaping` before any model is built
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        super().build_models()
        self.dpo_model = (
            build_policy(self.dpo_model_spec, self.tokenizer, role="DPO model")
            if self.dpo_model_spec is not None
            else None
        )

    def dpo_term(self, dpo_model) -> DPOTokenReward:
        return DPOTokenReward(dpo_model, self.beta1, self.dpo_clip, self.sampling.temperature, self.shaping)

    def scorers(self) -> Scorers:
        return replace(super().scorers(), dense=(self.dpo_term(self.dpo_model),), score_weight=self.beta3)
