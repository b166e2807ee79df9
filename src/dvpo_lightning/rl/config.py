"""The settings of an RL iteration: how a rollout is scored and updated on (`PPOConfig`, with its registered policy
loss), and which advantage estimator turns its rewards into advantages (`AdvantageConfig`).

Each setting's check is written once, in the code that uses it: sizes and the KL placement here, names and ranges
in the `algos` function that reads them (`check_kl_estimator`, `check_aggregation`, `check_discounts`,
`build_kl_controller`, the policy loss and the estimator themselves). The configs call those checks when they are
made, so a bad setting fails, naming its option, before any model loads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from dvpo_lightning.algos import (
    POLICY_LOSS_INPUTS,
    ROLLOUT_INPUTS,
    KLController,
    advantages_are_normalized,
    build_kl_controller,
    check_aggregation,
    check_discounts,
    check_kl_clamp,
    check_kl_estimator,
    check_kl_loss_estimator,
    get_advantage,
    get_policy_loss,
)

KL_PLACEMENTS = ("reward", "loss")
#: PPO's clip settings and the keyword each is given to the policy losses that declare it (verl's actor config).
SHARED_CLIP_SETTINGS = {
    "clip_eps": "clip_eps_low",
    "clip_eps_high": "clip_eps_high",
    "dual_clip": "dual_clip",
}


@dataclass
class PPOConfig:
    """How a rollout is scored and turned into policy updates (every on-policy algorithm).

    Args:
        samples_per_prompt: responses sampled per prompt (consecutive rows; group estimators need > 1).
        ppo_epochs: passes over each rollout.
        mini_batch_size: samples per optimiser step (per rank); None = the whole rollout.
        micro_batch_size: samples per forward/backward pass (gradient accumulation); None = the mini-batch.
        policy_loss: the registered policy loss (`algos.POLICY_LOSSES`): ppo, gspo, gspo_token, cispo, or yours.
        policy_loss_options: its own keyword options, e.g. `{max_weight: 5.0}` for cispo.
        clip_eps: ratio clip (lower side, and upper side unless `clip_eps_high` is set), for the losses that clip.
        clip_eps_high: upper ratio clip ("clip-higher"; DAPO: 0.28 with clip_eps 0.2); None = `clip_eps`.
        dual_clip: dual-clip constant for negative advantages (> 1; `ppo` loss); None = off.
        value_clip: critic value clip around the rollout's values (PPO/RTO); None = no clipping.
        loss_aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, or TRL's grpo, bnpo, dr_grpo, dapo.
        gamma: discount.
        lam: GAE lambda.
        whiten_advantages: normalise advantages over the whole rollout (all ranks); None = unless the estimator
            declares them already normalised within each group (grpo, rloo: `algos.normalized_advantages`).
        kl_estimator: k1, k2, k3 or abs, the per-token KL estimate; with kl_placement "loss" only k2 or k3 (as a loss
            term k1's gradient averages to zero and abs's is not a KL's: `algos.check_kl_loss_estimator`).
        kl_placement: "reward" (a -kl_coef * kl_t token reward; PPO, DVPO, RTO, REINFORCE++) or "loss" (a
            kl_coef * kl_t loss term on the new log-probs; GRPO).
        kl_clamp: bound every per-token KL estimate to [-kl_clamp, kl_clamp] (OpenRLHF: 10); None = no bound.
        kl_controller: fixed or adaptive.
        kl_coef: the KL coefficient (initial value when adaptive).
        kl_target: adaptive controller's target KL per sequence.
        kl_horizon: adaptive controller's horizon in samples.
        max_grad_norm: clip each trained model's gradient norm; None = no clipping.
        target_kl: stop this rollout's epochs early when the approximate KL of an epoch exceeds it.
        missing_eos_penalty: subtracted from the sequence score of responses that never emitted EOS, before it
            is clamped and scaled (`algos.penalize_unfinished`); an algorithm without a score gets -penalty.
        scoring_batch_size: rows per forward pass of the scorers; None = the whole rollout.
    """

    samples_per_prompt: int = 1
    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    micro_batch_size: int | None = None
    policy_loss: str = "ppo"
    policy_loss_options: dict[str, Any] = field(default_factory=dict)
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    loss_aggregation: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool | None = None
    kl_estimator: str = "k1"
    kl_placement: str = "reward"
    kl_clamp: float | None = None
    kl_controller: str = "fixed"
    kl_coef: float = 0.01
    kl_target: float | None = None
    kl_horizon: int = 10000
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None
    missing_eos_penalty: float | None = None
    scoring_batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "samples_per_prompt",
            "ppo_epochs",
            "mini_batch_size",
            "micro_batch_size",
            "scoring_batch_size",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ppo.{name} must be >= 1; got {value}")
        if self.kl_placement not in KL_PLACEMENTS:
            raise ValueError(f"ppo.kl_placement must be one of {KL_PLACEMENTS}; got {self.kl_placement!r}")
        checks = {
            "kl_estimator": lambda: check_kl_estimator(self.kl_estimator),
            "kl_clamp": lambda: check_kl_clamp(self.kl_clamp),
            "loss_aggregation": lambda: check_aggregation(self.loss_aggregation),
            "gamma, ppo.lam": lambda: check_discounts(self.gamma, self.lam),
            "policy_loss": self.check_policy_loss,
            "kl_controller, ppo.kl_coef, ppo.kl_target": self.build_kl_controller,
        }
        for options, check in checks.items():
            try:
                check()
            except ValueError as error:
                raise ValueError(f"ppo.{options}: {error}") from None
        if self.kl_placement == "loss":
            try:
                check_kl_loss_estimator(self.kl_estimator)
            except ValueError as error:
                raise ValueError(
                    f"ppo.kl_estimator={self.kl_estimator} with ppo.kl_placement=loss: {error}"
                ) from None

    def policy_loss_arguments(self) -> dict[str, Any]:
        """The keyword options `policy_loss` is called with: the clip settings it declares, and its own options.
        A clip setting changed from its default for a loss that does not use it is an error, as is an unknown
        option."""
        parameters = inspect.signature(get_policy_loss(self.policy_loss)).parameters
        defaults = {item.name: item.default for item in fields(self)}
        arguments, ignored = {}, []
        for setting, keyword in SHARED_CLIP_SETTINGS.items():
            if keyword in parameters:
                arguments[keyword] = getattr(self, setting)
            elif getattr(self, setting) != defaults[setting]:
                ignored.append(f"ppo.{setting}")
        own = [name for name in parameters if name not in (*POLICY_LOSS_INPUTS, *arguments)]
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} not used by this loss; its options: {', '.join(own) or 'none'}"
            )
        unknown = sorted(set(self.policy_loss_options) - set(own))
        if unknown:
            raise ValueError(
                f"policy_loss_options {unknown} are not options of the {self.policy_loss!r} policy loss (clip "
                f"settings are ppo.{', ppo.'.join(SHARED_CLIP_SETTINGS)}); its options: {', '.join(own) or 'none'}"
            )
        return {**arguments, **self.policy_loss_options}

    def check_policy_loss(self) -> None:
        """Call the policy loss once on one token, so that an option's value it refuses fails at start-up."""
        token = torch.zeros(1, 1)
        mask = torch.ones(1, 1, dtype=torch.bool)
        try:
            get_policy_loss(self.policy_loss)(
                logprobs=token,
                old_logprobs=token,
                advantages=token,
                mask=mask,
                **self.policy_loss_arguments(),
            )
        except TypeError as error:
            raise ValueError(str(error)) from None

    def build_kl_controller(self) -> KLController:
        """The KL controller these settings describe (`algos.build_kl_controller` checks them)."""
        horizon = (
            self.kl_horizon if self.kl_controller == "adaptive" else None
        )  # a default, so given only then
        return build_kl_controller(self.kl_controller, self.kl_coef, target=self.kl_target, horizon=horizon)

    def optimizer_steps_per_rollout(self, rollout_size: int) -> int:
        """Optimiser steps one rollout of `rollout_size` samples takes: epochs x mini-batches."""
        mini = self.mini_batch_size or rollout_size
        return self.ppo_epochs * -(-rollout_size // mini)


#: the arguments every estimator takes; its other keyword parameters, but `ROLLOUT_INPUTS`, are its options.
UNIFORM_ARGUMENTS = ("token_rewards", "values", "mask", "gamma", "lam")


@dataclass
class AdvantageConfig:
    """The registered advantage estimator (`algos.ADVANTAGE_ESTIMATORS`) and its own options.

    Args:
        estimator: the estimator's registered name: gae, gvm, reinforce, rloo, grpo, or one registered by you.
        options: its own keyword options, e.g. `{bootstrap: zero}` for gvm, `{scale_by_std: false}` for grpo
            (Dr. GRPO), `{group_baseline: true}` for reinforce. Discount and lambda are `ppo.gamma`/`ppo.lam`.
    """

    estimator: str = "gae"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = self.option_names()  # an unknown estimator fails here, listing the known ones
        unknown = sorted(set(self.options) - set(known))
        if unknown:
            raise ValueError(
                f"advantage.options {unknown} are not options of the {self.estimator!r} estimator; its options: "
                f"{', '.join(known) or 'none'}"
            )

    def check(self, *, with_values: bool, group_size: int, gamma: float, lam: float) -> None:
        """Run the estimator once on a one-token rollout of one group, so that what it refuses -- an option's value,
        values given to a critic-free estimator or missing for one with a critic, a group too small -- fails at
        start-up, in the estimator's own words, instead of at the first rollout."""
        token_rewards = torch.zeros(group_size, 1)
        try:
            self(
                token_rewards=token_rewards,
                values=torch.zeros_like(token_rewards) if with_values else None,
                mask=torch.ones_like(token_rewards, dtype=torch.bool),
                gamma=gamma,
                lam=lam,
                final_values=torch.zeros(group_size),
                group_size=group_size,
                scores=torch.zeros(group_size),
            )
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"advantage.estimator={self.estimator!r} with this run's settings: {error}"
            ) from None

    def whitens(self, whiten_advantages: bool | None) -> bool:
        """Whether advantages are whitened over the batch: as `ppo.whiten_advantages` says, else (None) unless the
        estimator declared them already normalised."""
        if whiten_advantages is not None:
            return whiten_advantages
        return not advantages_are_normalized(get_advantage(self.estimator))

    def option_names(self) -> list[str]:
        parameters = inspect.signature(get_advantage(self.estimator)).parameters
        return [name for name in parameters if name not in UNIFORM_ARGUMENTS + ROLLOUT_INPUTS]

    def option(self, name: str) -> Any:
        """The value of option `name`: the config's, else the estimator's default."""
        if name in self.options:
            return self.options[name]
        return inspect.signature(get_advantage(self.estimator)).parameters[name].default

    def __call__(
        self,
        *,
        token_rewards: Tensor,
        values: Tensor | None,
        mask: Tensor,
        gamma: float,
        lam: float,
        **rollout,
    ) -> tuple[Tensor, Tensor]:
        """`(advantages, returns)` `[B, T]`; `rollout` holds the `ROLLOUT_INPUTS`, each passed only to an
        estimator that declares it."""
        function = get_advantage(self.estimator)
        parameters = inspect.signature(function).parameters
        declared = {name: value for name, value in rollout.items() if name in parameters}
        return function(
            token_rewards=token_rewards,
            values=values,
            mask=mask,
            gamma=gamma,
            lam=lam,
            **declared,
            **self.options,
        )
