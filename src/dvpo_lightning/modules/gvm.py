"""The Global Value Model (GVM) of DVPO: a token-level value model pretrained offline on preference data.

Each pair gives two trajectories with a terminal reward (`terminal_reward`); the values of the states s_1..s_T and,
with `train_final_value`, of the complete response are regressed onto TD(lambda) returns of it computed from the
model's own detached values (`algos.td_lambda_returns`). Beyond the paper, each off by default: the loss terms of
`LOSS_WEIGHTS` (`algos.gvm_loss`), several optimiser steps per batch on fixed targets (`inner_epochs`, the reference
code's `vas_epochs`), values read as running sums of learned token rewards (`value_form="earned"`) and, with those,
the sum fitted over random subsets of the tokens (`reward_subset_probability`).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.regression import PearsonCorrCoef

from dvpo_lightning.algos import gvm_loss, loss_normalizers, masked_mean, td_lambda_returns
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.optim import OptimConfig, check_inner_epochs, schedule_length, steps_on_one_batch
from dvpo_lightning.rl import (
    Sequences,
    check_reward_subset,
    check_terminal_reward,
    check_trained_value_form,
    check_value_form,
    final_values,
    fitted_states,
    pair_sequences,
    state_mask,
    state_values,
    subset_fitted_values,
    terminal_rewards,
)

#: the weights of the loss's terms beyond the paper's
LOSS_WEIGHTS = ("ranking_weight", "final_consistency_weight", "td_consistency_weight")
TARGET_OPTIONS = ("terminal_reward", "gamma", "lam", "train_final_value", "inner_epochs")
#: the export's record of how the values were trained, which DVPO reads
VALUE_TRAINING = ("value_form", "reward_subset_probability", *TARGET_OPTIONS, *LOSS_WEIGHTS)
PAPER_STATS = {"values_mean", "abs_error_mean", "td_loss"}  # the stats of the paper's loss


class GVMModule(RLHFModule):
    """Pretrain the Global Value Model on preference pairs.

    Logs `train/loss`, `val/loss`; whether it learned: `val/accuracy_mean_value` (pairwise accuracy of the
    mean value over the response's states) and `val/accuracy_final_value` (of the complete response's value);
    where the data carries scores (the gold reward on the built-in task) their Pearson correlation with the
    final value (`val/score_pearson`). Exports the GVM.

    Args:
        model: the value model; a causal-LM checkpoint (e.g. the SFT export) gets a fresh zero head.
        gamma: discount of the TD(lambda) targets.
        lam: lambda of the TD(lambda) targets (1 = Monte-Carlo: the terminal reward at every state).
        terminal_reward: "preference" (+/- `preference_reward` for chosen / rejected), "score" (the data's
            `chosen_score` / `rejected_score` columns) or "reward_model" (the score of `reward_model`).
        preference_reward: magnitude of the preference terminal reward.
        reward_model: the frozen reward model scoring responses when terminal_reward="reward_model".
        train_final_value: also fit the complete response's value to the terminal reward (needed by DVPO's
            default `bootstrap="final_value"`; false reproduces the reference code, which fits s_1..s_T only).
        ranking_weight: weight of a Bradley-Terry ranking term on the complete responses' values (chosen above
            rejected) added to the TD loss; 0 (default) is the paper's loss.
        final_consistency_weight: weight of TCRM's term fitting every state's value to the last state's (detached).
        td_consistency_weight: weight of TCRM's term fitting every state's value to the next state's (detached).
        inner_epochs: optimiser steps per batch, each towards the TD targets computed at the batch's start (the
            reference code's `vas_epochs`: 2). Above 1 the module steps the optimiser itself: `trainer.max_steps`
            counts optimiser steps, and `max_grad_norm` clips (Lightning refuses `trainer.gradient_clip_val` then).
        max_grad_norm: gradient-norm clip of the steps `inner_epochs` > 1 takes; None = no clip.
        value_form: "return" (the paper's: each output is a state's value) or "earned" (each response token's output
            is its reward, a state's value their sum so far; only the complete response's value is fitted). Saved
            with the export, which every reader then reads the same way (`models.value_form`).
        reward_subset_probability: earned form only: below 1, training fits the prompt's value plus a random subset's
            token rewards (each token in it with this probability), divided by it: randomized return decomposition
            (`algos.subset_return_values`), which spreads the credit over the tokens; 1 (default) fits their sum.
        optim: optimiser and schedule.
        **kwargs: `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "pairs"
    exported_model = "value_model"
    frozen_models = ("reward_model",)

    def __init__(
        self,
        model: ModelSpec,
        gamma: float = 1.0,
        lam: float = 0.95,
        terminal_reward: str = "preference",
        preference_reward: float = 1.0,
        reward_model: ModelSpec | None = None,
        train_final_value: bool = True,
        ranking_weight: float = 0.0,
        final_consistency_weight: float = 0.0,
        td_consistency_weight: float = 0.0,
        inner_epochs: int = 1,
        max_grad_norm: float | None = None,
        value_form: str = "return",
        reward_subset_probability: float = 1.0,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_inner_epochs(inner_epochs, max_grad_norm)
        check_terminal_reward(terminal_reward, reward_model)
        check_value_form(value_form, train_final_value, final_consistency_weight, td_consistency_weight)
        check_reward_subset(reward_subset_probability, value_form)
        self.model_spec = model
        self.reward_model_spec = reward_model
        self.gamma, self.lam, self.terminal_reward = gamma, lam, terminal_reward
        self.preference_reward = preference_reward
        self.train_final_value = train_final_value
        self.ranking_weight, self.td_consistency_weight = ranking_weight, td_consistency_weight
        self.final_consistency_weight = final_consistency_weight
        self.inner_epochs, self.max_grad_norm, self.value_form = inner_epochs, max_grad_norm, value_form
        self.reward_subset_probability = reward_subset_probability
        self.automatic_optimization = inner_epochs == 1
        self.optim = optim or OptimConfig(lr=1e-4)
        self.val_loss = MeanMetric()
        self.val_accuracy_mean_value = MeanMetric()
        self.val_accuracy_final_value = MeanMetric()
        self.val_score_pearson = PearsonCorrCoef()
        self.save_hyperparameters(ignore=["tokenizer"])

    def export_info(self) -> dict:
        """Also how the values were trained, so DVPO can refuse a GVM whose values it would misread."""
        training = {option: getattr(self, option) for option in VALUE_TRAINING}
        return {**super().export_info(), "value_training": training}

    def exported_model_spec(self) -> ModelSpec:
        return self.model_spec

    def build_models(self) -> None:
        self.value_model = build_value_model(self.model_spec, self.tokenizer, role="value model")
        check_trained_value_form(self.value_model, self.value_form, self.model_spec.name_or_path)
        self.value_model.config.dvpo_value_form = self.value_form  # saved with the export: how to read it
        self.reward_model = (
            build_value_model(self.reward_model_spec, self.tokenizer, role="reward model")
            if self.reward_model_spec is not None
            else None
        )

    def targets(self, batch: dict, sequences: Sequences, values: torch.Tensor) -> torch.Tensor:
        """TD(lambda) targets `[2B, R + 1]` from the values `[2B, R + 1]` (detached) and the terminal rewards."""
        mask = fitted_states(sequences.response_mask, self.value_form, self.train_final_value)
        rewards = terminal_rewards(
            batch, sequences, self.terminal_reward, self.preference_reward, self.reward_model
        )
        return td_lambda_returns(rewards, values.detach(), mask, self.gamma, self.lam)

    def loss(
        self, sequences: Sequences, values: torch.Tensor, targets: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = fitted_states(sequences.response_mask, self.value_form, self.train_final_value)
        if training:  # an earned GVM may fit its sum over a random subset of the tokens
            values = subset_fitted_values(values, sequences.response_mask, self.reward_subset_probability)
        # In training, the mean over every rank's states, so that data-parallel gradients are the global batch's.
        normalizers = loss_normalizers(mask, distributed=True) if training else None
        final = final_values(values, sequences.response_mask)  # [2B]
        weights = {name: getattr(self, name) for name in LOSS_WEIGHTS}
        return gvm_loss(values, targets, mask, final, **weights, normalizers=normalizers)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        sequences = pair_sequences(batch)
        if self.automatic_optimization:
            values = state_values(self.value_model, sequences)  # [2B, R + 1]
            loss, stats = self.loss(sequences, values, self.targets(batch, sequences, values), training=True)
        else:
            loss, stats = self.inner_epoch_steps(batch, sequences)
        size = batch["chosen_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        if stats.keys() - PAPER_STATS:  # the loss has terms beyond the paper's: log them and the TD term
            for name in sorted(stats.keys() - PAPER_STATS | {"td_loss"}):
                self.log(f"train/{name}", stats[name], batch_size=size, sync_dist=True)
        return loss if self.automatic_optimization else None

    def inner_epoch_steps(self, batch: dict, sequences: Sequences) -> tuple[torch.Tensor, dict]:
        """`inner_epochs` optimiser steps on the batch, towards targets fixed before the first."""
        with torch.no_grad():
            targets = self.targets(batch, sequences, state_values(self.value_model, sequences))

        def step_loss():  # each step's own values, towards the fixed targets
            return self.loss(sequences, state_values(self.value_model, sequences), targets, training=True)

        return steps_on_one_batch(self, self.inner_epochs, self.max_grad_norm, step_loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        sequences = pair_sequences(batch)
        values = state_values(self.value_model, sequences)  # [2B, R + 1]
        loss, _ = self.loss(sequences, values, self.targets(batch, sequences, values), training=False)
        mask = sequences.response_mask
        mean_value = masked_mean(values, state_mask(mask, include_final=False), dim=-1)  # [2B]
        final_value = final_values(values, mask)  # [2B]
        self.val_loss.update(loss, weight=mask.shape[0])
        for metric, (chosen, rejected) in (
            (self.val_accuracy_mean_value, mean_value.chunk(2)),
            (self.val_accuracy_final_value, final_value.chunk(2)),
        ):
            metric.update((chosen > rejected).float())
        self.log("val/loss", self.val_loss)
        self.log("val/accuracy_mean_value", self.val_accuracy_mean_value)
        self.log("val/accuracy_final_value", self.val_accuracy_final_value)
        self.remember_scored_pairs(sequences, *final_value.chunk(2))
        if "chosen_score" in batch:
            self.val_score_pearson.update(
                final_value, torch.cat([batch["chosen_score"], batch["rejected_score"]])
            )
            self.log("val/score_pearson", self.val_score_pearson)

    def configure_optimizers(self):
        # Each batch takes `inner_epochs` optimiser steps.
        steps = schedule_length(self.trainer, lambda: self.inner_epochs)
        return self.optimizer_for(self.value_model, self.optim, steps)
