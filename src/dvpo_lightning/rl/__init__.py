"""The RL engine, without Lightning: rollout, scorers, the experience maker, the PPO-style update, KL control.

    responses  = generate_responses(policy, prompt_ids, prompt_mask, sampling, tokenizer)   # rollout
    experience = ExperienceMaker(policy, reference, Scorers(...), ppo, advantage, kl_coef).make(responses)
    stats      = PPOUpdate(policy, critic, ppo, kl_coef).run(experience, backward, step)

Every formula comes from `dvpo_lightning.algos`; this layer runs models and moves tensors between them. The
on-policy LightningModules only choose models, scorers and the estimator, and hand Lightning's optimiser hooks to
`PPOUpdate`; a notebook or `dvpo_lightning.evaluation` uses the same pieces without a Trainer.
"""

from dvpo_lightning.rl import compiled_rollout  # noqa: F401  (registers the "compiled" rollout backend)
from dvpo_lightning.rl.config import AdvantageConfig, PPOConfig
from dvpo_lightning.rl.dynamic_sampling import DynamicSampling, concat_experiences
from dvpo_lightning.rl.experience import Experience, ExperienceMaker, Scorers
from dvpo_lightning.rl.forward import (
    final_values,
    policy_logprobs,
    reference_logprobs,
    state_mask,
    state_values,
)
from dvpo_lightning.rl.metrics import experience_metrics, iteration_metrics, no_eos_warning, sample_rows
from dvpo_lightning.rl.rollout import (
    ROLLOUT_BACKENDS,
    SamplingConfig,
    decode_responses,
    generate_responses,
    register_rollout_backend,
    warmup_seconds,
)
from dvpo_lightning.rl.scorers import (
    DPOTokenReward,
    GoldReward,
    GoldValues,
    MonteCarloValues,
    OverlongPenalty,
    SequenceValue,
    StateValues,
    gold_rewards,
    gold_token_rewards,
)
from dvpo_lightning.rl.sequences import Responses, Sequences, pair_sequences, sft_sequences
from dvpo_lightning.rl.update import PPOUpdate, clip_grad_norms
from dvpo_lightning.rl.value_targets import (
    TERMINAL_REWARDS,
    check_reward_subset,
    check_terminal_reward,
    check_trained_value_form,
    check_value_form,
    fitted_states,
    subset_fitted_values,
    terminal_rewards,
)

__all__ = [
    "ROLLOUT_BACKENDS",
    "AdvantageConfig",
    "DPOTokenReward",
    "DynamicSampling",
    "Experience",
    "ExperienceMaker",
    "GoldReward",
    "GoldValues",
    "MonteCarloValues",
    "PPOConfig",
    "PPOUpdate",
    "Responses",
    "SamplingConfig",
    "OverlongPenalty",
    "Scorers",
    "SequenceValue",
    "Sequences",
    "StateValues",
    "TERMINAL_REWARDS",
    "check_reward_subset",
    "check_terminal_reward",
    "check_trained_value_form",
    "check_value_form",
    "clip_grad_norms",
    "concat_experiences",
    "decode_responses",
    "experience_metrics",
    "iteration_metrics",
    "final_values",
    "generate_responses",
    "no_eos_warning",
    "gold_rewards",
    "gold_token_rewards",
    "pair_sequences",
    "policy_logprobs",
    "reference_logprobs",
    "register_rollout_backend",
    "sample_rows",
    "fitted_states",
    "subset_fitted_values",
    "terminal_rewards",
    "sft_sequences",
    "state_mask",
    "state_values",
    "warmup_seconds",
]
