"""The shared on-policy engine of PPO, DVPO and RTO: one `training_step` is one RL iteration.

    generate   sample responses to the batch's prompts with the policy (HF `generate`, KV cache)
    score      old and reference log-probs, the algorithm's values / scores (`score()`), token rewards,
               advantages and returns -- every formula from `dvpo_lightning.algos`
    update     PPO epochs x mini-batches x micro-batches (gradient accumulation), clipped gradients, one
               optimiser step per mini-batch, optional early stop on the approximate KL

Algorithms differ only in `score()` (what values and sequence scores a rollout gets), their advantage
estimator and whether a critic is trained. `trainer.global_step` counts optimiser steps, so
`--trainer.max_steps` is a budget in optimiser steps, the same unit for every algorithm.

Degenerate rollouts are handled, not crashed on: prompts without room in the policy's context for a whole
response are dropped, and every process keeps as many prompts as the one with the fewest, so that all run the
same optimiser steps and collectives (a batch left without prompts is skipped, see
`PolicyModule.prompts_with_room`, and an epoch's worth of such batches in a row is an error); responses that never emit EOS are scored as unfinished
(`rollout/finished_rate`, `ppo.missing_eos_penalty`); rewards, values, advantages or returns that are not finite
are reported in `nonfinite_quantities`, so that the `NonFiniteGuard` callback skips that rollout's steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.algos import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    assemble_token_rewards,
    build_kl_controller,
    get_advantage,
    kl_penalty,
    kl_reward,
    loss_normalizers,
    masked_mean,
    masked_sum,
    masked_whiten,
    penalize_unfinished,
    ppo_policy_loss,
    value_loss,
)
from dvpo_lightning.modules.generation import (
    Responses,
    SamplingConfig,
    decode_responses,
    generate_responses,
    gold_rewards,
)
from dvpo_lightning.modules.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    trainable_parameter_groups,
)
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.modules.scoring import policy_logprobs, state_values

KL_CONTROLLERS = ("fixed", "adaptive")
#: stats that are a micro-batch's share of its mini-batch's loss: summed over the micro-batches, so that the logged
#: loss is the mini-batch's whatever the split (the other stats are per-micro-batch means, averaged).
SUMMED_OVER_MICRO_BATCHES = ("policy/loss", "value/loss")


@dataclass
class PPOConfig:
    """How a rollout is turned into policy updates (shared by PPO, DVPO and RTO).

    Args:
        samples_per_prompt: responses sampled per prompt (consecutive rows; group estimators need > 1).
        ppo_epochs: passes over each rollout.
        mini_batch_size: samples per optimiser step (per rank); None = the whole rollout.
        micro_batch_size: samples per forward/backward pass (gradient accumulation); None = the mini-batch.
        clip_eps: PPO ratio clip (lower side, and upper side unless `clip_eps_high` is set).
        clip_eps_high: upper ratio clip ("clip-higher"); None = `clip_eps`.
        dual_clip: dual-clip constant for negative advantages (> 1); None = off.
        value_clip: critic value clip around the rollout's values (PPO/RTO); None = no clipping.
        loss_aggregation: token-mean, seq-mean-token-mean or seq-mean-token-sum.
        gamma: discount.
        lam: GAE lambda.
        whiten_advantages: normalise advantages over the whole rollout (all ranks).
        kl_estimator: k1, k2, k3 or abs, the per-token KL in the reward.
        kl_controller: fixed or adaptive.
        kl_coef: the KL coefficient (initial value when adaptive).
        kl_target: adaptive controller's target KL per sequence.
        kl_horizon: adaptive controller's horizon in samples.
        max_grad_norm: clip each trained model's gradient norm; None = no clipping.
        target_kl: stop this rollout's epochs early when the approximate KL of an epoch exceeds it.
        missing_eos_penalty: subtracted from the sequence score of responses that never emitted EOS, before PPO
            clamps it and RTO scales it by beta3 (`algos.penalize_unfinished`); DVPO's score is then -penalty.
        scoring_batch_size: rows per forward pass of the frozen scorers; None = the whole rollout.
    """

    samples_per_prompt: int = 1
    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    micro_batch_size: int | None = None
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    value_clip: float | None = 0.2
    loss_aggregation: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    kl_estimator: str = "k1"
    kl_controller: str = "fixed"
    kl_coef: float = 0.01
    kl_target: float | None = None
    kl_horizon: int = 10000
    max_grad_norm: float | None = 1.0
    target_kl: float | None = None
    missing_eos_penalty: float | None = None
    scoring_batch_size: int | None = None

    def __post_init__(self) -> None:
        # Every setting is checked here, so a bad one fails before any model is loaded or sampled from.
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
        for name, value, known in (
            ("kl_estimator", self.kl_estimator, KL_ESTIMATORS),
            ("loss_aggregation", self.loss_aggregation, AGGREGATION_MODES),
            ("kl_controller", self.kl_controller, KL_CONTROLLERS),
        ):
            if value not in known:
                raise ValueError(f"ppo.{name} must be one of {tuple(known)}; got {value!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name} must be in [0, 1]; got {getattr(self, name)}")
        if (self.kl_controller == "adaptive") != (self.kl_target is not None):
            raise ValueError(
                "ppo.kl_target goes with ppo.kl_controller=adaptive, and only with it: the adaptive controller "
                f"steers the KL towards it (got kl_controller={self.kl_controller!r}, kl_target={self.kl_target})"
            )


@dataclass
class Scores:
    """What an algorithm's scorers say about a rollout (all detached)."""

    reward: torch.Tensor  # [B] the model's reward of each response, for logging
    values: torch.Tensor | None = None  # [B, R] V(s_t) of the critic or GVM; None for critic-free estimators
    sequence_scores: torch.Tensor | None = None  # [B] reward added at the last real token
    dense_rewards: list[torch.Tensor] = field(default_factory=list)  # extra per-token reward terms [B, R]
    estimator_kwargs: dict = field(default_factory=dict)  # e.g. DVPO's final_values and terminal


@dataclass
class Experience:
    """A scored rollout, ready for the update; every tensor is aligned with the response block."""

    responses: Responses
    old_logprobs: torch.Tensor  # [B, R]
    ref_logprobs: torch.Tensor  # [B, R]
    kl: torch.Tensor  # [B, R] the reward's per-token KL estimate
    token_rewards: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    returns: torch.Tensor  # [B, R]
    values: torch.Tensor | None  # [B, R]
    reward: torch.Tensor  # [B]

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
                value = Responses(
                    value.prompt_input_ids[rows],
                    value.prompt_attention_mask[rows],
                    value.response_input_ids[rows, :width],
                    value.response_mask[rows, :width],
                    value.finished[rows],
                )
            elif isinstance(value, torch.Tensor):
                value = value[rows, :width] if value.dim() == 2 else value[rows]
            picked[item.name] = value
        return Experience(**picked)


class OnPolicyModule(PolicyModule):
    """Base of PPO, DVPO and RTO. Subclasses implement `build_models` and `score`.

    Args:
        sampling: how rollouts are sampled.
        ppo: the update settings (`PPOConfig`).
        optim: the actor's optimiser and schedule.
        **kwargs: `policy`, `reference`, `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`),
            `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "prompts"
    #: registered advantage estimator (`dvpo_lightning.algos.get_advantage`).
    advantage_estimator = "gae"

    def __init__(
        self,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.sampling = sampling or SamplingConfig()
        self.ppo = ppo or PPOConfig()
        self.optim = optim or OptimConfig(lr=1e-6)
        adaptive = {"target": self.ppo.kl_target, "horizon": self.ppo.kl_horizon}
        self.kl_controller = build_kl_controller(
            self.ppo.kl_controller,
            self.ppo.kl_coef,
            **(adaptive if self.ppo.kl_controller == "adaptive" else {}),
        )
        self.last_samples: list[dict] = []
        self._skipped_batches_in_a_row = 0

    # ------------------------------------------------------------------------------------- subclass API
    @property
    def critic(self) -> torch.nn.Module | None:
        """The trained value model, if the algorithm has one (PPO, RTO)."""
        return None

    def score(self, responses: Responses, ref_logprobs: torch.Tensor) -> Scores:
        raise NotImplementedError

    def penalize_unfinished(self, scores: torch.Tensor | None, finished: torch.Tensor) -> torch.Tensor | None:
        """Sequence scores `[B]` (None: the algorithm has none) less `ppo.missing_eos_penalty` where a response did
        not finish; subclasses call it before clamping or scaling, so the penalty is clamped and scaled alike."""
        penalty = self.ppo.missing_eos_penalty
        if penalty is None:
            return scores
        if scores is None:
            scores = torch.zeros(finished.shape, device=finished.device)
        return penalize_unfinished(scores, finished, penalty)

    def scoring_rows(self, size: int) -> list[slice]:
        """Row slices of one forward pass of the frozen scorers."""
        step = self.ppo.scoring_batch_size or size
        return [slice(start, start + step) for start in range(0, size, step)]

    # --------------------------------------------------------------------------------------- iteration
    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        prompts = self.prompts_with_room(batch, self.sampling, "sampling", "rollout")
        if prompts is None:
            self.skip_batch_without_prompts()
            return None  # nothing to roll out: no optimiser step either
        self._skipped_batches_in_a_row = 0
        prompt_ids, prompt_mask = (
            tensor.repeat_interleave(self.ppo.samples_per_prompt, dim=0) for tensor in prompts
        )
        with self.stage("generate"), self.policy_for_generation():
            responses = generate_responses(
                self.policy, prompt_ids, prompt_mask, self.sampling, self.tokenizer
            )
        with self.stage("score"):
            experience = self.make_experience(responses)
        with self.stage("update"):
            update_stats = self.update(experience)
        self.log_iteration(experience, update_stats)
        tokens = responses.response_mask.sum() + responses.prompt_attention_mask.sum()
        return {"num_tokens": tokens, "num_samples": len(experience)}

    @torch.no_grad()
    def make_experience(self, responses: Responses) -> Experience:
        temperature = self.sampling.temperature
        old_logprobs = torch.cat(
            [
                policy_logprobs(self.policy, responses.select(rows), temperature)[0]
                for rows in self.scoring_rows(len(responses.finished))
            ]
        )
        ref_logprobs = torch.cat(
            [
                self.reference_logprobs(responses.select(rows), temperature)
                for rows in self.scoring_rows(len(responses.finished))
            ]
        )
        scores = self.score(responses, ref_logprobs)
        mask = responses.response_mask
        kl = kl_penalty(old_logprobs, ref_logprobs, self.ppo.kl_estimator, mask=mask)
        token_rewards = assemble_token_rewards(
            mask,
            kl_reward(kl, self.kl_controller.value, mask),
            *scores.dense_rewards,
            scores=scores.sequence_scores,
        )
        advantages, returns = get_advantage(self.advantage_estimator)(
            token_rewards=token_rewards,
            values=scores.values,
            mask=mask,
            gamma=self.ppo.gamma,
            lam=self.ppo.lam,
            **scores.estimator_kwargs,
        )
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, distributed=True)
        quantities = {
            "rewards": token_rewards,
            "values": scores.values,
            "advantages": advantages,
            "returns": returns,
        }
        self.nonfinite_quantities = [
            name
            for name, value in quantities.items()
            if value is not None and not bool(torch.isfinite(value[mask]).all())
        ]
        return Experience(
            responses=responses,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            kl=kl,
            token_rewards=token_rewards,
            advantages=advantages,
            returns=returns,
            values=scores.values,
            reward=scores.reward,
        )

    # ------------------------------------------------------------------------------------------ update
    def update(self, experience: Experience) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        size = len(experience)
        mini = self.ppo.mini_batch_size or size
        micro = min(self.ppo.micro_batch_size or mini, mini)
        totals: dict[str, list[float]] = {}
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(size, device=self.device)
            epoch_kl = []
            for start in range(0, size, mini):
                rows = order[start : start + mini]
                micro_rows = list(rows.split(micro))
                normalizers = loss_normalizers([experience.mask[r] for r in micro_rows], distributed=True)
                minibatch_losses: dict[str, float] = {}
                for rows_of_micro in micro_rows:
                    loss, stats = self.minibatch_loss(experience.select(rows_of_micro), normalizers)
                    self.manual_backward(loss)
                    for name, value in stats.items():
                        value = float(torch.as_tensor(value).detach())
                        if name in SUMMED_OVER_MICRO_BATCHES:
                            minibatch_losses[name] = minibatch_losses.get(name, 0.0) + value
                        else:
                            totals.setdefault(name, []).append(value)
                    epoch_kl.append(float(stats["policy/approx_kl"]))
                for name, value in minibatch_losses.items():
                    totals.setdefault(name, []).append(value)
                for name, norm in self.clip_gradients_of_models(optimizer).items():
                    totals.setdefault(name, []).append(norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            if self.ppo.target_kl is not None and self._mean_over_ranks(epoch_kl) > self.ppo.target_kl:
                totals.setdefault("policy/early_stopped", []).append(1.0)
                break
        return {name: sum(values) / len(values) for name, values in totals.items()}

    def minibatch_loss(self, batch: Experience, normalizers) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch, scaled so that micro-batches sum to the mini-batch loss."""
        logprobs, entropy = policy_logprobs(
            self.policy, batch.responses, self.sampling.temperature, with_entropy=True
        )
        loss, policy_stats = ppo_policy_loss(
            logprobs,
            batch.old_logprobs,
            batch.advantages,
            batch.mask,
            clip_eps_low=self.ppo.clip_eps,
            clip_eps_high=self.ppo.clip_eps_high,
            dual_clip=self.ppo.dual_clip,
            mode=self.ppo.loss_aggregation,
            normalizers=normalizers,
        )
        stats = {f"policy/{name}": value for name, value in policy_stats.items()}
        stats["policy/loss"] = loss.detach()
        stats["policy/entropy"] = masked_mean(entropy, batch.mask)
        if self.critic is not None:
            values = state_values(self.critic, batch.responses)[:, :-1]
            critic_loss, critic_stats = value_loss(
                values,
                batch.returns,
                batch.mask,
                old_values=batch.values,
                clip=self.ppo.value_clip,
                mode=self.ppo.loss_aggregation,
                normalizers=normalizers,
            )
            loss = loss + critic_loss
            stats.update({f"value/{name}": value for name, value in critic_stats.items()})
            stats["value/loss"] = critic_loss.detach()
        return loss, stats

    def clip_gradients_of_models(self, optimizer) -> dict[str, float]:
        """Clip each trained model's gradient norm separately; returns the norms before clipping.

        Under FSDP1 (`FSDPStrategy`) a parameter's gradient is a local shard, so the norm must come from the FSDP
        root: Lightning's `clip_gradients` clips all trained parameters together there.
        """
        if isinstance(self.trainer.strategy, FSDPStrategy):
            if self.ppo.max_grad_norm is not None:
                self.clip_gradients(
                    optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm"
                )
            return {}
        models = {"policy/grad_norm": self.policy}
        if self.critic is not None:
            models["value/grad_norm"] = self.critic
        norms = {}
        for name, model in models.items():
            parameters = [p for p in model.parameters() if p.grad is not None]
            if not parameters:
                continue
            max_norm = self.ppo.max_grad_norm if self.ppo.max_grad_norm is not None else math.inf
            norms[name] = float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        return norms

    def _mean_over_ranks(self, values: list[float]) -> float:
        local = torch.tensor(sum(values) / max(len(values), 1), device=self.device)
        return float(self.trainer.strategy.reduce(local, reduce_op="mean"))

    # ----------------------------------------------------------------------------------------- logging
    def log_iteration(self, experience: Experience, update_stats: dict[str, float]) -> None:
        responses, mask = experience.responses, experience.mask
        if not bool(responses.finished.any()):
            penalty = self.ppo.missing_eos_penalty
            rank_zero_warn(
                f"No response of a rollout emitted EOS within sampling.max_new_tokens={self.sampling.max_new_tokens} "
                "tokens: all were scored as unfinished (rollout/finished_rate is 0"
                + (f", each lost ppo.missing_eos_penalty={penalty}" if penalty is not None else "")
                + "); raise sampling.max_new_tokens if responses need more room"
            )
        kl_k1 = masked_sum(kl_penalty(experience.old_logprobs, experience.ref_logprobs, "k1"), mask, dim=-1)
        kl_k3 = masked_sum(kl_penalty(experience.old_logprobs, experience.ref_logprobs, "k3"), mask, dim=-1)
        mean_kl = float(self.trainer.strategy.reduce(kl_k1.mean(), reduce_op="mean"))
        metrics = {
            "rollout/reward": experience.reward.mean(),
            "rollout/response_length": responses.lengths.float().mean(),
            "rollout/finished_rate": responses.finished.float().mean(),
            "rollout/token_reward_sum": masked_sum(experience.token_rewards, mask, dim=-1).mean(),
            "kl/k1": kl_k1.mean(),
            "kl/k3": kl_k3.mean(),
            "kl/coef": torch.tensor(self.kl_controller.value),
            "advantages/mean": masked_mean(experience.advantages, mask),
            "advantages/max": experience.advantages[mask].max(),
            "advantages/min": experience.advantages[mask].min(),
            "returns/mean": masked_mean(experience.returns, mask),
            **{f"time/{name}": torch.tensor(seconds) for name, seconds in self.stage_seconds.items()},
            **{name: torch.tensor(value) for name, value in update_stats.items()},
        }
        if experience.values is not None:
            metrics["value/mean"] = masked_mean(experience.values, mask)
        task = self.gold_task
        gold = None
        if task is not None:
            gold, fraction = gold_rewards(task, self.tokenizer, responses)
            metrics["rollout/gold_reward"], metrics["rollout/gold_fraction"] = gold.mean(), fraction.mean()
        size = len(experience)
        for name, value in metrics.items():
            self.log(
                name,
                value.float(),
                batch_size=size,
                prog_bar=name in ("rollout/reward", "rollout/gold_reward"),
                sync_dist=True,
            )
        self.kl_controller.update(mean_kl, n_steps=size * self.trainer.world_size)
        self.remember_samples(experience, gold)

    def remember_samples(self, experience: Experience, gold: torch.Tensor | None, count: int = 4) -> None:
        """A few (prompt, response, rewards) rows for the sample logger callback."""
        head = experience.select(torch.arange(min(count, len(experience)), device=self.device))
        prompts, texts = decode_responses(self.tokenizer, head.responses)
        self.last_samples = [
            {
                "prompt": prompt,
                "response": text,
                "finished": bool(head.responses.finished[row]),
                "reward": float(head.reward[row]),
                **({"gold_reward": float(gold[row])} if gold is not None else {}),
            }
            for row, (prompt, text) in enumerate(zip(prompts, texts))
        ]

    def skip_batch_without_prompts(self) -> None:
        """Count a skipped batch; an epoch's worth of them in a row means no batch will ever train: an error."""
        self._skipped_batches_in_a_row += 1
        if self._skipped_batches_in_a_row >= self.trainer.num_training_batches:
            raise ValueError(
                f"{self._skipped_batches_in_a_row} training batches in a row (an epoch's worth) had no prompt with "
                f"room for a response of sampling.max_new_tokens={self.sampling.max_new_tokens} tokens in the "
                f"policy's context of {self.context_length()} tokens: lower data.max_prompt_length or "
                "sampling.max_new_tokens"
            )

    # ---------------------------------------------------------------------------------------- plumbing
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_generations(batch)

    def optimizer_steps_per_iteration(self) -> int:
        if getattr(self.trainer, "datamodule", None) is None:
            raise ValueError(
                "without a data module the rollout size is unknown, so the LR schedule cannot be sized from the "
                "number of iterations: set --trainer.max_steps (optimiser steps)"
            )
        rollout = self.trainer.datamodule.batch_size * self.ppo.samples_per_prompt
        mini = self.ppo.mini_batch_size or rollout
        return self.ppo.ppo_epochs * math.ceil(rollout / mini)

    def trained_parameter_groups(self) -> list[dict]:
        """Parameter groups of every trained model, each with its own learning rate and decay."""
        groups = trainable_parameter_groups(self.policy, self.optim.weight_decay)
        for group in groups:
            group["lr"] = self.optim.lr
        return groups

    def configure_optimizers(self):
        if self.trainer.max_steps > 0:
            total = self.trainer.max_steps
        else:
            total = self.trainer.estimated_stepping_batches * self.optimizer_steps_per_iteration()
        optimizer = build_optimizer(self.trained_parameter_groups(), self.optim)
        return [optimizer], [build_scheduler(optimizer, self.optim, int(total))]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
