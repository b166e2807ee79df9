"""Critic-free policy gradient (GRPO, RLOO, REINFORCE++): policy and reference trained against one sequence score."""

from __future__ import annotations

from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.onpolicy import OnPolicyModule
from dvpo_lightning.rl import DynamicSampling, Experience, OverlongPenalty, Scorers, SequenceValue


class CriticFreeModule(OnPolicyModule):
    """GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO, CISPO and DAPO (docs/algorithms.md §10-11), chosen by
    `advantage.estimator` and `ppo.policy_loss`.

    No critic: each response's score -- a reward model's (`reward_model`), or a GVM's value of the complete
    response (`value_model`: GVM-scored GRPO, DVPO without a critic at all) -- is placed at its last token, and the
    estimator compares responses to the same prompt (`ppo.samples_per_prompt` of them) or whitens return-to-go over
    the batch. Three models: the trained policy, the frozen reference and the frozen scorer.

    Args:
        reward_model: a frozen reward model (the RM stage's export) whose score is the reward.
        value_model: a frozen GVM (the GVM stage's export) whose value of the complete response is the reward.
        score_clip: clamp of the score; None = no clamp.
        overlong_buffer: DAPO's overlong reward shaping: a penalty from 0 to `-overlong_penalty` over the last
            `overlong_buffer` tokens before `sampling.max_new_tokens` (docs/algorithms.md §10); None = off.
        overlong_penalty: the penalty at the maximum length.
        dynamic_sampling: DAPO's dynamic sampling: drop the groups whose scores are all equal and update once the
            groups kept over further rollouts fill a batch (`rl.DynamicSampling`; logs `rollout/generations` and
            `rollout/dropped_groups`).
        max_generations: rollouts collected at most per update with dynamic sampling; the last one's dropped
            groups then fill the rest.
        **kwargs: `sampling`, `ppo`, `advantage`, `optim` (see `OnPolicyModule`), `policy`, `reference`,
            `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`), `tokenizer`, `export_dir`, `fsdp`
            (see `RLHFModule`).
    """

    default_estimator = "grpo"
    has_values = False
    frozen_models = ("reference", "scorer")

    def __init__(
        self,
        reward_model: ModelSpec | None = None,
        value_model: ModelSpec | None = None,
        score_clip: float | None = None,
        overlong_buffer: int | None = None,
        overlong_penalty: float = 1.0,
        dynamic_sampling: bool = False,
        max_generations: int = 10,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if (reward_model is None) == (value_model is None):
            raise ValueError(
                "CriticFreeModule scores responses with exactly one of `reward_model` (a reward model's score) or "
                f"`value_model` (a GVM's value of the complete response); got reward_model={reward_model}, "
                f"value_model={value_model}"
            )
        self.reward_model_spec, self.value_model_spec = reward_model, value_model
        self.score_clip = score_clip
        self.overlong = None
        if overlong_buffer is not None:
            try:
                self.overlong = OverlongPenalty(
                    self.sampling.max_new_tokens, overlong_buffer, overlong_penalty
                )
            except ValueError as error:
                raise ValueError(
                    f"overlong_buffer, overlong_penalty (max_length: sampling.max_new_tokens): {error}"
                ) from None
        self.sampler = None
        if dynamic_sampling:
            self.sampler = DynamicSampling(self.ppo.samples_per_prompt, max_generations)
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()
        spec, role = (
            (self.reward_model_spec, "reward model")
            if self.reward_model_spec is not None
            else (self.value_model_spec, "global value model")
        )
        self.scorer = build_value_model(spec, self.tokenizer, role=role)

    def scorers(self) -> Scorers:
        dense = (self.overlong,) if self.overlong is not None else ()
        return Scorers(score=SequenceValue(self.scorer), dense=dense, score_clip=self.score_clip)

    def experience_maker(self):
        """The engine's experience maker, or with dynamic sampling one that returns None until a batch is full."""
        maker = super().experience_maker()
        return maker if self.sampler is None else self.sampler.around(maker)

    def log_iteration(self, experience: Experience, update_stats: dict[str, float]) -> None:
        stats = self.sampler.stats if self.sampler is not None else {}
        super().log_iteration(experience, {**update_stats, **stats})
