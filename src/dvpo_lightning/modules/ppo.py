"""PPO for RLHF: actor and critic trained, reward model and reference frozen (four models)."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.algos import clamp_scores
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.generation import Responses, SamplingConfig
from dvpo_lightning.modules.onpolicy import OnPolicyModule, PPOConfig, Scores
from dvpo_lightning.modules.optim import OptimConfig, trainable_parameter_groups
from dvpo_lightning.modules.scoring import final_values, state_values
from dvpo_lightning.modules.sharding import FSDPConfig


class PPOModule(OnPolicyModule):
    """PPO with a learned critic (the algorithms doc, section 3; OpenRLHF's defaults).

    Per-token reward: the KL penalty, plus the reward model's score (clamped to +-`score_clip`) at the last
    token; GAE advantages from the critic's values; the critic is trained with the clipped value loss
    alongside the actor (one optimiser step updates both; each model's gradient norm is clipped on its own).

    Args:
        policy: the actor, usually the SFT export.
        reward_model: the frozen reward model (the RM stage's export).
        critic: the critic's starting weights; default: the reward model's.
        critic_optim: the critic's learning rate, betas, eps and weight decay (its optimiser type and schedule
            are the actor's, `optim`).
        score_clip: clamp of the reward model's score; None = no clamp.
        reference, reference_as_disabled_adapter, sampling, ppo, optim, eval_sampling, tokenizer, export_dir, fsdp:
            as in `DVPOModule`.
    """

    advantage_estimator = "gae"
    frozen_models = ("reference", "reward_model")

    def __init__(
        self,
        policy: ModelSpec,
        reward_model: ModelSpec,
        critic: ModelSpec | None = None,
        critic_optim: OptimConfig | None = None,
        score_clip: float | None = 10.0,
        reference: ModelSpec | None = None,
        reference_as_disabled_adapter: bool | None = None,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        export_dir: str | None = None,
        fsdp: FSDPConfig | None = None,
    ):
        super().__init__(
            policy=policy,
            reference=reference,
            reference_as_disabled_adapter=reference_as_disabled_adapter,
            sampling=sampling,
            ppo=ppo,
            optim=optim,
            eval_sampling=eval_sampling,
            tokenizer=tokenizer,
            export_dir=export_dir,
            fsdp=fsdp,
        )
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
        scores = final_values(rewards, mask)
        if self.score_clip is not None:
            scores = clamp_scores(scores, self.score_clip)
        return Scores(reward=scores, values=values[:, :-1], sequence_scores=scores)

    def trained_parameter_groups(self) -> list[dict]:
        groups = super().trained_parameter_groups()
        for group in trainable_parameter_groups(self.critic_model, self.critic_optim.weight_decay):
            group.update(lr=self.critic_optim.lr, betas=self.critic_optim.betas, eps=self.critic_optim.eps)
            groups.append(group)
        return groups
