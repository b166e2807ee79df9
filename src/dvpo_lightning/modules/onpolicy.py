"""The LightningModule of every on-policy algorithm: one `training_step` is one RL iteration of the `rl` engine.

Algorithms differ only in the models they build (`build_models`), the scorers they choose (`scorers`) and their
advantage estimator (the `advantage` option); generating, scoring and updating are `rl`'s (docs/design.md, "The RL
engine"). `trainer.global_step` counts optimiser steps, so `--trainer.max_steps` is the same unit for every
algorithm. Degenerate rollouts are handled, not crashed on: prompts without room for a response are dropped, every
process keeping as many as the one with the fewest (`modules.rooms`); responses without EOS are
scored as unfinished (`ppo.missing_eos_penalty`); non-finite rewards, values, advantages or returns are reported in
`nonfinite_quantities`, so that the `NonFiniteGuard` callback skips that rollout's steps.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from dvpo_lightning.modules.optim import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    schedule_length,
    step_manually,
    trainable_parameter_groups,
)
from dvpo_lightning.modules.phases import split_warmup, timed_phase
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.modules.rooms import EmptyBatches, prompts_with_room
from dvpo_lightning.rl import (
    AdvantageConfig,
    Experience,
    ExperienceMaker,
    PPOConfig,
    PPOUpdate,
    SamplingConfig,
    Scorers,
    generate_responses,
    gold_rewards,
    iteration_metrics,
    no_eos_warning,
    sample_rows,
    warmup_seconds,
)


class OnPolicyModule(PolicyModule):
    """Base of the on-policy algorithms. Subclasses implement `build_models` and `scorers`.

    Args:
        sampling: how rollouts are sampled.
        ppo: how a rollout is scored and updated on (`rl.PPOConfig`).
        advantage: the advantage estimator and its options (`rl.AdvantageConfig`); default: the algorithm's.
        optim: the actor's optimiser and schedule.
        **kwargs: `policy`, `reference`, `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`),
            `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "prompts"
    #: the estimator of a config that names none.
    default_estimator = "gae"
    #: whether the algorithm's scorers give the estimator values (a critic or a GVM).
    has_values = True

    def __init__(
        self,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        advantage: AdvantageConfig | None = None,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.sampling = sampling or SamplingConfig()
        self.ppo = ppo or PPOConfig()
        self.advantage = advantage or AdvantageConfig(self.default_estimator)
        self.advantage.check(
            with_values=self.has_values,
            group_size=self.ppo.samples_per_prompt,
            gamma=self.ppo.gamma,
            lam=self.ppo.lam,
        )
        self.optim = optim or OptimConfig(lr=1e-6)
        self.kl_controller = self.ppo.build_kl_controller()
        self.last_samples: list[dict] = []
        self.phase_seconds: dict[str, float] = {}  # of the last iteration, by phase (`modules.phases`)
        self.empty_batches = EmptyBatches()

    # ------------------------------------------------------------------------------------- subclass API
    @property
    def critic(self) -> torch.nn.Module | None:
        """The trained value model, if the algorithm has one (PPO, RTO)."""
        return None

    def scorers(self) -> Scorers:
        raise NotImplementedError

    def validation_reward(self, responses, ref_logprobs: torch.Tensor) -> torch.Tensor | None:
        return self.scorers().reward(responses, ref_logprobs)

    def trains_policy(self) -> bool:
        """Whether this iteration updates the policy (PPO's critic warm-up iterations do not)."""
        return True

    # --------------------------------------------------------------------------------------- the engine
    def kl_coef(self) -> float:
        return self.kl_controller.value

    def experience_maker(self) -> ExperienceMaker:
        return ExperienceMaker(
            self.policy,
            self.reference,
            self.scorers(),
            self.ppo,
            self.advantage,
            self.kl_coef,
            self.sampling.temperature,
        )

    def updater(self) -> PPOUpdate:
        sampled = (self.sampling.temperature, self.sampling.max_new_tokens)
        return PPOUpdate(self.policy, self.critic, self.ppo, self.kl_coef, *sampled)

    def training_step(self, batch: dict, batch_idx: int) -> dict | None:
        prompts = prompts_with_room(self, batch, self.sampling, self.context_length(), "sampling", "rollout")
        if prompts is None:
            self.empty_batches.count(self.trainer, self.sampling, self.context_length())
            return None  # nothing to roll out: no optimiser step either
        self.empty_batches.reset()
        prompt_ids, prompt_mask = (
            tensor.repeat_interleave(self.ppo.samples_per_prompt, dim=0) for tensor in prompts
        )
        compiled_before = warmup_seconds(self.policy)
        with timed_phase(self, "generate"), self.policy_for_generation():
            responses = generate_responses(
                self.policy, prompt_ids, prompt_mask, self.sampling, self.tokenizer
            )
        split_warmup(self.phase_seconds, warmup_seconds(self.policy) - compiled_before, self.sampling.backend)
        with timed_phase(self, "score"):
            experience = self.experience_maker().make(responses)
        if experience is None:  # dynamic sampling (`CriticFreeModule`): more groups before the update
            return None
        self.nonfinite_quantities = experience.nonfinite_quantities()
        with timed_phase(self, "update"):
            update_stats = self.updater().run(
                experience, self.manual_backward, self.optimizer_step_with_clipping, self.trains_policy()
            )
        self.log_iteration(experience, update_stats)
        tokens = responses.response_mask.sum() + responses.prompt_attention_mask.sum()
        return {"num_tokens": tokens, "num_samples": len(experience)}

    def optimizer_step_with_clipping(self) -> dict[str, float]:
        """One optimiser step with the gradient norms clipped (`modules.optim.step_manually`); the norms before
        clipping. Under FSDP1 (`FSDPStrategy`) all trained parameters are clipped together and no norm is returned."""
        if isinstance(self.trainer.strategy, FSDPStrategy):
            return step_manually(self, self.ppo.max_grad_norm)
        models = {"policy/grad_norm": self.policy}
        if self.critic is not None:
            models["value/grad_norm"] = self.critic
        return step_manually(self, self.ppo.max_grad_norm, models)

    # ----------------------------------------------------------------------------------------- logging
    def log_iteration(self, experience: Experience, update_stats: dict[str, float]) -> None:
        responses = experience.responses
        if not bool(responses.finished.any()):
            rank_zero_warn(no_eos_warning(self.sampling.max_new_tokens, self.ppo.missing_eos_penalty))
        gold = gold_rewards(self.gold_task, self.tokenizer, responses) if self.gold_task is not None else None
        metrics = iteration_metrics(
            experience, update_stats, self.kl_controller.value, self.phase_seconds, gold
        )
        size = len(experience)
        for name, value in metrics.items():
            self.log(
                name,
                value.float(),
                batch_size=size,
                prog_bar=name in ("rollout/reward", "rollout/gold_reward"),
                sync_dist=True,
            )
        mean_kl = float(self.trainer.strategy.reduce(metrics["kl/k1"], reduce_op="mean"))
        self.kl_controller.update(mean_kl, n_steps=size * self.trainer.world_size)
        self.last_samples = sample_rows(experience, self.tokenizer, gold[0] if gold is not None else None)

    # ---------------------------------------------------------------------------------------- plumbing
    def trained_parameter_groups(self) -> list[dict]:
        """Parameter groups of every trained model, each with its own learning rate and decay."""
        groups = trainable_parameter_groups(self.policy, self.optim.weight_decay)
        for group in groups:
            group["lr"] = self.optim.lr
        return groups

    def configure_optimizers(self):
        optimizer = build_optimizer(self.trained_parameter_groups(), self.optim)
        total = schedule_length(self.trainer, self.optimizer_steps_per_iteration)
        return [optimizer], [build_scheduler(optimizer, self.optim, total)]

    def optimizer_steps_per_iteration(self) -> int:
        if getattr(self.trainer, "datamodule", None) is None:
            raise ValueError(
                "without a data module the rollout size is unknown, so the LR schedule cannot be sized from the "
                "number of iterations: set --trainer.max_steps (optimiser steps)"
            )
        return self.ppo.optimizer_steps_per_rollout(
            self.trainer.datamodule.batch_size * self.ppo.samples_per_prompt
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "kl_controller" in checkpoint:
            self.kl_controller.load_state_dict(checkpoint["kl_controller"])
