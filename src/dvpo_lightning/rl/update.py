"""The PPO-style update: epochs x mini-batches x micro-batches over an `Experience`, without a Trainer.

    for each of `ppo_epochs`:                  (early stop when the epoch's approximate KL > `target_kl`)
        for each mini-batch (a random split):  one optimiser `step()`
            for each micro-batch:              `backward(loss)` (gradient accumulation; rows of similar lengths)

Micro-batch losses are normalised by the token and sequence counts of the whole mini-batch on every rank
(`algos.loss_normalizers`), so any split trains like the whole mini-batch on one process. The caller owns the
optimiser: `backward` and `step` are its callables (a LightningModule passes `manual_backward` and its optimiser
and scheduler step; a notebook passes `loss.backward` and `optimizer.step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from dvpo_lightning.algos import (
    get_policy_loss,
    kl_loss,
    loss_normalizers,
    masked_mean,
    value_loss,
)
from dvpo_lightning.algos.distributed import all_reduce_sum, world_size
from dvpo_lightning.rl.config import PPOConfig
from dvpo_lightning.rl.experience import Experience
from dvpo_lightning.rl.forward import policy_logprobs, state_values

#: stats that are a micro-batch's share of its mini-batch's loss: summed over the micro-batches, so that the logged
#: loss is the mini-batch's whatever the split (the other stats are per-micro-batch means, averaged).
SUMMED_OVER_MICRO_BATCHES = ("policy/loss", "value/loss", "kl/loss")


class PPOUpdate:
    """Updates `policy` (and `critic`, when given) on experiences, with the policy loss `ppo.policy_loss` and PPO's
    clipped value loss. `max_response_length` (sampling's `max_new_tokens`) is the `dr_grpo` aggregation's
    constant."""

    def __init__(
        self,
        policy: nn.Module,
        critic: nn.Module | None,
        ppo: PPOConfig,
        kl_coef: Callable[[], float],
        temperature: float = 1.0,
        max_response_length: int | None = None,
    ):
        self.policy, self.critic, self.ppo, self.kl_coef = policy, critic, ppo, kl_coef
        self.temperature, self.max_response_length = temperature, max_response_length
        self.policy_loss = get_policy_loss(ppo.policy_loss)
        self.policy_loss_arguments = ppo.policy_loss_arguments()

    def run(
        self,
        experience: Experience,
        backward: Callable[[torch.Tensor], None],
        step: Callable[[], dict[str, float]],
        train_policy: bool = True,
    ) -> dict[str, float]:
        """Train on `experience`; returns each stat's mean over the update. `step()` clips, steps and zeroes the
        gradients and returns the gradient norms it measured. `train_policy=False` trains the critic alone (its
        warm-up iterations)."""
        size = len(experience)
        mini = self.ppo.mini_batch_size or size
        micro = min(self.ppo.micro_batch_size or mini, mini)
        totals: dict[str, list[float]] = {}
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(size, device=experience.mask.device)
            epoch_kl = []
            for start in range(0, size, mini):
                micro_rows = self.micro_batches(experience, order[start : start + mini], micro)
                normalizers = loss_normalizers(
                    [experience.mask[r] for r in micro_rows], True, self.max_response_length
                )
                minibatch_losses: dict[str, float] = {}
                for rows in micro_rows:
                    loss, stats = self.loss(experience.select(rows), normalizers, train_policy)
                    backward(loss)
                    for name, value in stats.items():
                        value = float(torch.as_tensor(value).detach())
                        if name in SUMMED_OVER_MICRO_BATCHES:
                            minibatch_losses[name] = minibatch_losses.get(name, 0.0) + value
                        else:
                            totals.setdefault(name, []).append(value)
                    if train_policy:
                        epoch_kl.append(float(stats["policy/approx_kl"]))
                for name, value in {**minibatch_losses, **step()}.items():
                    totals.setdefault(name, []).append(value)
            device = experience.mask.device
            if (
                self.ppo.target_kl is not None
                and epoch_kl
                and mean_over_ranks(epoch_kl, device) > self.ppo.target_kl
            ):
                totals.setdefault("policy/early_stopped", []).append(1.0)
                break
        return {name: sum(values) / len(values) for name, values in totals.items()}

    @staticmethod
    def micro_batches(experience: Experience, rows: torch.Tensor, micro: int) -> list[torch.Tensor]:
        """A mini-batch's `rows` split into micro-batches of `micro` rows of similar lengths (sorted by length): each
        is trimmed to its own longest prompt and response, so less padding is computed. The mini-batch, its
        normalisers and its gradient are the same whatever the split."""
        if micro >= len(rows):  # one micro-batch: sorting would trim nothing, only reorder the sums
            return [rows]
        lengths = experience.responses.total_lengths[rows]
        return list(rows[torch.argsort(lengths, stable=True)].split(micro))

    def loss(self, batch: Experience, normalizers, train_policy: bool = True) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch, scaled so that micro-batches sum to the mini-batch loss."""
        ppo, stats = self.ppo, {}
        loss = torch.zeros((), device=batch.mask.device)
        if train_policy:
            logprobs, entropy = policy_logprobs(
                self.policy, batch.responses, self.temperature, with_entropy=True
            )
            policy_loss, policy_stats = self.policy_loss(
                logprobs=logprobs,
                old_logprobs=batch.old_logprobs,
                advantages=batch.advantages,
                mask=batch.mask,
                mode=ppo.loss_aggregation,
                normalizers=normalizers,
                **self.policy_loss_arguments,
            )
            stats = {f"policy/{name}": value for name, value in policy_stats.items()}
            stats["policy/loss"] = policy_loss.detach()
            stats["policy/entropy"] = masked_mean(entropy, batch.mask)
            loss = policy_loss
            if ppo.kl_placement == "loss":
                kl_term, kl_stats = kl_loss(
                    logprobs,
                    batch.ref_logprobs,
                    batch.mask,
                    kl_coef=self.kl_coef(),
                    estimator=ppo.kl_estimator,
                    mode=ppo.loss_aggregation,
                    normalizers=normalizers,
                    clamp=ppo.kl_clamp,
                )
                loss = loss + kl_term
                stats["kl/loss"] = kl_term.detach()
                stats["kl/policy_mean"] = kl_stats["kl_mean"]
        if self.critic is not None:
            values = state_values(self.critic, batch.responses)[:, :-1]
            critic_loss, critic_stats = value_loss(
                values,
                batch.returns,
                batch.mask,
                old_values=batch.values,
                clip=ppo.value_clip,
                mode=ppo.loss_aggregation,
                normalizers=normalizers,
            )
            loss = loss + critic_loss
            stats.update({f"value/{name}": value for name, value in critic_stats.items()})
            stats["value/loss"] = critic_loss.detach()
        return loss, stats


def clip_grad_norms(models: dict[str, nn.Module], max_norm: float | None) -> dict[str, float]:
    """Clip each model's gradient norm on its own (`max_norm=None`: measure only); the norms before clipping, by
    the names given."""
    norms = {}
    for name, model in models.items():
        parameters = [p for p in model.parameters() if p.grad is not None]
        if parameters:
            limit = max_norm if max_norm is not None else math.inf
            norms[name] = float(torch.nn.utils.clip_grad_norm_(parameters, limit))
    return norms


def mean_over_ranks(values: list[float], device: torch.device) -> float:
    """The mean of this rank's `values`, averaged over the ranks (reduced on `device`, which NCCL needs)."""
    local = torch.tensor(sum(values) / max(len(values), 1), device=device)
    return float(all_reduce_sum(local)) / world_size()
