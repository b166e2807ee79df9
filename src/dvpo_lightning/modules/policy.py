"""What stages that train a policy share: the reference policy and generation-based evaluation."""

from __future__ import annotations

import dataclasses

import torch

from dvpo_lightning.algos import sequence_kl
from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.rooms import prompts_with_room
from dvpo_lightning.modules.samples import answer_rows
from dvpo_lightning.modules.sharding import gathered
from dvpo_lightning.rl import (
    SamplingConfig,
    Sequences,
    generate_responses,
    gold_rewards,
    policy_logprobs,
    reference_logprobs,
)


class PolicyModule(RLHFModule):
    """A stage whose result is a policy (SFT, DPO, PPO, DVPO, RTO).

    Reference policy: `reference` when given; else, for a LoRA policy, the policy itself with its adapter
    disabled (no second copy in memory); else a frozen copy built from the policy's own spec.

    Evaluation: when `eval_sampling` is set, every validation batch's prompts are answered by the policy and
    `val/response_length`, `val/finished_rate` and the KL to the reference (`val/kl_ref`, summed over the
    response, k1 and k3) are logged; for on-policy stages also the reward their training optimises (`val/reward`:
    their reward model's or GVM's score, on any data); on the built-in task also the gold reward
    (`val/gold_reward`) and its fraction of the optimum (`val/gold_fraction`). The first answers of each
    validation are kept in `validation_samples`.

    Room for a response: a prompt is only answered when a whole response of `max_new_tokens` fits after it in the
    policy's context (`max_position_embeddings`); longer prompts are dropped and counted (`modules.rooms`).

    Args:
        policy: the policy to train, usually the SFT export.
        reference: the frozen reference policy; default: the policy's own starting weights (a frozen copy, or the
            LoRA policy with its adapter disabled).
        reference_as_disabled_adapter: use the LoRA policy with its adapter switched off as the reference (the
            default when the policy has LoRA and no `reference` is given): no second copy in memory.
        eval_sampling: how validation prompts are answered for the generation metrics; None skips them.
        **kwargs: `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    frozen_models = ("reference",)

    def __init__(
        self,
        policy: ModelSpec,
        reference: ModelSpec | None = None,
        reference_as_disabled_adapter: bool | None = None,
        eval_sampling: SamplingConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if reference_as_disabled_adapter is None:
            reference_as_disabled_adapter = reference is None and policy.lora is not None
        if reference_as_disabled_adapter and policy.lora is None:
            raise ValueError(
                "reference_as_disabled_adapter=true needs a LoRA policy (the reference is the policy with its "
                "adapter switched off): set `policy.lora`, or give a `reference` model, or set it to false"
            )
        if reference_as_disabled_adapter and reference is not None:
            raise ValueError("give either `reference` or reference_as_disabled_adapter=true, not both")
        self.policy_spec = policy
        self.reference_spec = reference
        self.reference_as_disabled_adapter = reference_as_disabled_adapter
        self.eval_sampling = eval_sampling

    def build_policy_and_reference(self, with_reference: bool = True) -> None:
        """The policy, and the reference unless `with_reference` is false (a stage whose loss needs none)."""
        self.policy = build_policy(self.policy_spec, self.tokenizer, role="policy")
        if self.reference_as_disabled_adapter or not with_reference:
            self.reference = None
        else:
            spec = self.reference_spec or dataclasses.replace(
                self.policy_spec, lora=None, gradient_checkpointing=False
            )
            self.reference = build_policy(spec, self.tokenizer, role="reference policy")

    def exported_model_spec(self) -> ModelSpec:
        return self.policy_spec

    def policy_for_generation(self):
        """Context in which the policy generates: gathered once for the whole rollout when sharded (FSDP2)."""
        return gathered(self.policy, self.fsdp)

    @property
    def has_reference(self) -> bool:
        return getattr(self, "reference", None) is not None or self.reference_as_disabled_adapter

    def reference_logprobs(self, sequences: Sequences, temperature: float = 1.0) -> torch.Tensor:
        """Log-probs `[B, R]` of the response tokens under the reference policy."""
        return reference_logprobs(self.policy, self.reference, sequences, temperature)

    @property
    def gold_task(self):
        """The built-in task of the data module (it knows the gold reward), or None."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "task", None)

    def context_length(self) -> int | None:
        """The policy's context in tokens (its config's `max_position_embeddings`), or None if it names none."""
        return getattr(getattr(self.policy, "config", None), "max_position_embeddings", None)

    def validation_reward(self, responses, ref_logprobs: torch.Tensor) -> torch.Tensor | None:
        """The stage's own reward `[B]` of validation answers, where it has one (on-policy stages)."""
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_generations(batch)

    @torch.no_grad()
    def evaluate_generations(self, batch: dict, prefix: str = "val") -> None:
        """Answer the batch's prompts with the policy and log what the answers are worth."""
        if self.eval_sampling is None:
            return
        prompts = prompts_with_room(
            self, batch, self.eval_sampling, self.context_length(), "eval_sampling", prefix
        )
        if prompts is None:
            return
        responses = generate_responses(self.policy, *prompts, self.eval_sampling, self.tokenizer)
        mask = responses.response_mask
        metrics = {
            "response_length": responses.lengths.float().mean(),
            "finished_rate": responses.finished.float().mean(),
        }
        per_response = {"finished": responses.finished}  # [B] each
        if self.has_reference:
            temperature = self.eval_sampling.temperature if self.eval_sampling.do_sample else 1.0
            logprobs = policy_logprobs(self.policy, responses, temperature)[0]
            ref_logprobs = self.reference_logprobs(responses, temperature)
            per_response["kl_ref"] = sequence_kl(logprobs, ref_logprobs, mask, "k1")
            metrics["kl_ref"] = per_response["kl_ref"].mean()
            metrics["kl_ref_k3"] = sequence_kl(logprobs, ref_logprobs, mask, "k3").mean()
            # On-policy stages score their validation answers as they score rollouts (their reward model, GVM,
            # ...): the reward on the user's own data, where no gold reward is known.
            reward = self.validation_reward(responses, ref_logprobs)
            if reward is not None:
                per_response["reward"] = reward
                metrics["reward"] = reward.mean()
        task = self.gold_task
        if task is not None:
            per_response["gold_reward"], fraction = gold_rewards(task, self.tokenizer, responses)
            metrics["gold_reward"], metrics["gold_fraction"] = (
                per_response["gold_reward"].mean(),
                fraction.mean(),
            )
        for name, value in metrics.items():
            self.log(f"{prefix}/{name}", value, batch_size=mask.shape[0], sync_dist=True)
        if prefix == "val" and not self.validation_samples:
            self.remember_validation_samples(answer_rows(self.tokenizer, responses, per_response))


class OfflinePolicyModule(PolicyModule):
    """A policy trained on fixed rows, one loss per batch (DPO and its family, KTO): `_step(batch, split)` computes
    and logs it; validation also answers the batch's prompts."""

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")
        self.evaluate_generations(batch)

    def configure_optimizers(self):
        return self.optimizer_for(self.policy, self.optim, self.trainer.estimated_stepping_batches)
