"""PPO for RLHF: actor and critic trained, reward model and reference frozen (four models)."""

from __future__ import annotations

import torch

from dvpo_lightning.algos import clamp_scores
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.generation import Responses
from dvpo_lightning.modules.onpolicy import OnPolicyModule, Scores
from dvpo_lightning.modules.optim import OptimConfig, trainable_parameter_groups
from dvpo_lightning.modules.scoring import final_values, state_values


class PPOModule(OnPolicyModule):
    """PPO with a learned critic (the algorithms doc, section 3; OpenRLHF's defaults).

    Per-token reward: the KL penalty, plus the reward model's score at the last token (less
    `ppo.missing_eos_penalty` for an unfinished response, then clamped to +-`score_clip`); GAE advantages from the critic's values; the critic is trained with the clipped value loss
    alongside the actor (one optimiser step updates both; each model's gradient norm is clipped on its own).

    Args:
        reward_model: the frozen reward model (the RM stage's export).
        critic: the critic's starting weights; default: the reward model's.
        critic_optim: the critic's learning rate, betas, eps and weight decay (its optimiser type and schedule
            are the actor's, `optim`).
        score_clip: clamp of the reward model's score; None = no clamp.
        **kwargs: `sampling`, `ppo`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    advantage_estimator = "gae"
    frozen_models = ("reference", "reward_model")

    def __init__(
        self,
        reward_model: ModelSpec,
        critic: ModelSpec | None = None,
        critic_optim: OptimConfig | None = None,
        score_clip: float | None = 10.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.reward_model_spec = reward_model
        self.critic_spec = critic or reward_model
        self.critic_optim = critic_optim or OptimConfig(lr=1e-5)
        self.score_clip = score_clip
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()
        self.reward_model = build_value_model(self.reward_model_spec, self.tokenizer, role="reward model")
        self.critic_model = build_value_model(self.critic_spec, self.tokenizer, role="critic")

    @property
    def critic(self) -> torch.nn.Module:
        return self.critic_model

    def score(self, responses: Responses, ref_logprobs: torch.Tensor) -> Scores:
        rows = self.scoring_rows(len(responses.finished))
        mask = responses.response_mask
        rewards = torch.cat([state_values(self.reward_model, responses.select(r)) for r in rows])
        values = torch.cat([state_values(self.critic_model, responses.select(r)) for r in rows])
        reward = final_values(rewards, mask)
        scores = self.penalize_unfinished(reward, responses.finished)
        if self.score_clip is not None:
            scores = clamp_scores(scores, self.score_clip)
        return Scores(reward=reward, values=values[:, :-1], sequence_scores=scores)

    def trained_parameter_groups(self) -> list[dict]:
        groups = super().trained_parameter_groups()
        for group in trainable_parameter_groups(self.critic_model, self.critic_optim.weight_decay):
            group.update(lr=self.critic_optim.lr, betas=self.critic_optim.betas, eps=self.critic_optim.eps)
            groups.append(group)
        return groups
