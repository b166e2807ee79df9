"""PPO for RLHF: actor and critic trained, reward model and reference frozen (four models)."""

from __future__ import annotations

import torch

from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.onpolicy import OnPolicyModule
from dvpo_lightning.modules.optim import OptimConfig, trainable_parameter_groups
from dvpo_lightning.rl import Scorers, SequenceValue, StateValues


class PPOModule(OnPolicyModule):
    """PPO with a learned critic (docs/algorithms.md §6; OpenRLHF's defaults).

    Per-token reward: the KL penalty, plus the reward model's score at the last token (less
    `ppo.missing_eos_penalty` for an unfinished response, then clamped to +-`score_clip`); GAE advantages from the
    critic's values; the critic is trained with the clipped value loss alongside the actor (one optimiser step
    updates both; each model's gradient norm is clipped on its own).

    The critic starts from the reward model's weights, or from any value model given as `critic` -- a GVM export
    makes a pretrained critic (NeMo-RL's value warm start) -- and `critic_warmup_iterations` first train the critic
    alone on the initial policy's rollouts (verl's critic warm-up). `train_critic=false` keeps the critic frozen at
    its starting weights (a diagnostic: PPO with a frozen critic, as DVPO's GVM is).

    Args:
        reward_model: the frozen reward model (the RM stage's export).
        critic: the critic's starting weights; default: the reward model's.
        critic_optim: the critic's learning rate, betas, eps and weight decay (its optimiser type and schedule
            are the actor's, `optim`).
        score_clip: clamp of the reward model's score; None = no clamp.
        critic_warmup_iterations: RL iterations at the start of training that update the critic only.
        train_critic: train the critic (PPO); false keeps it frozen at its starting weights, with no value loss.
        **kwargs: `sampling`, `ppo`, `advantage`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    default_estimator = "gae"
    frozen_models = ("reference", "reward_model")

    def __init__(
        self,
        reward_model: ModelSpec,
        critic: ModelSpec | None = None,
        critic_optim: OptimConfig | None = None,
        score_clip: float | None = 10.0,
        critic_warmup_iterations: int = 0,
        train_critic: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if critic_warmup_iterations < 0:
            raise ValueError(f"critic_warmup_iterations must be >= 0; got {critic_warmup_iterations}")
        if critic_warmup_iterations and not train_critic:
            raise ValueError(
                f"critic_warmup_iterations={critic_warmup_iterations} trains the critic alone, but train_critic=false "
                "freezes it: set one of them to its default"
            )
        if not train_critic:
            self.frozen_models = (*self.frozen_models, "critic_model")
        self.reward_model_spec = reward_model
        self.critic_spec = critic or reward_model
        self.critic_optim = critic_optim or OptimConfig(lr=1e-5)
        self.score_clip = score_clip
        self.critic_warmup_iterations = critic_warmup_iterations
        self.train_critic = train_critic
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()
        self.reward_model = build_value_model(self.reward_model_spec, self.tokenizer, role="reward model")
        self.critic_model = build_value_model(self.critic_spec, self.tokenizer, role="critic")

    @property
    def critic(self) -> torch.nn.Module | None:
        return self.critic_model if self.train_critic else None

    def scorers(self) -> Scorers:
        return Scorers(
            score=SequenceValue(self.reward_model),
            values=StateValues(self.critic_model),
            score_clip=self.score_clip,
        )

    def trains_policy(self) -> bool:
        """The policy waits for the first `critic_warmup_iterations` iterations (counted in training batches)."""
        return self.trainer.fit_loop.epoch_loop.total_batch_idx >= self.critic_warmup_iterations

    def trained_parameter_groups(self) -> list[dict]:
        groups = super().trained_parameter_groups()
        if not self.train_critic:
            return groups
        for group in trainable_parameter_groups(self.critic_model, self.critic_optim.weight_decay):
            group.update(lr=self.critic_optim.lr, betas=self.critic_optim.betas, eps=self.critic_optim.eps)
            groups.append(group)
        return groups
