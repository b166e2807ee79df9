"""The Global Value Model (GVM) of DVPO: a token-level value model pretrained offline on preference data.

Each pair gives two trajectories, chosen with terminal reward `+1` and rejected with `-1` (or, with
`terminal_reward="score"` / `"reward_model"`, the data's scores or a reward model's). The model's values on
the states a response visits are regressed onto TD(lambda) returns of that terminal reward computed from its
own (detached) values (`algos.td_lambda_returns`). The states are s_1..s_T (before each response token) and,
with `train_final_value`, the complete response, whose target is the terminal reward itself; DVPO's
default bootstrap (`final_value`) reads that final value as the return of a sampled response.

Beyond the paper, each off by default: a Bradley-Terry ranking term on the complete responses' values beside the
TD loss (`ranking_weight`, `algos.gvm_loss`), and several optimiser steps per batch on targets fixed at its start
(`inner_epochs`, the reference code's `vas_epochs`).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.regression import PearsonCorrCoef

from dvpo_lightning.algos import gvm_loss, loss_normalizers, masked_mean, td_lambda_returns
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.optim import OptimConfig, schedule_length, step_manually
from dvpo_lightning.rl import (
    Sequences,
    check_terminal_reward,
    final_values,
    pair_sequences,
    state_mask,
    state_values,
    terminal_rewards,
)


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
        inner_epochs: optimiser steps per batch, each regressing onto the TD targets computed once at the batch's
            start (the reference code's `vas_epochs`; it uses 2). Above 1 the module steps the optimiser itself
            (Lightning's manual optimisation): `trainer.max_steps` still counts optimiser steps, so a batch is drawn
            every `inner_epochs` steps, and gradients are clipped by `max_grad_norm` (leave
            `trainer.gradient_clip_val` unset, which Lightning refuses with manual optimisation).
        max_grad_norm: gradient-norm clip of the steps `inner_epochs` > 1 takes; None = no clip.
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
        inner_epochs: int = 1,
        max_grad_norm: float | None = None,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if inner_epochs < 1:
            raise ValueError(f"inner_epochs must be >= 1; got {inner_epochs}")
        if max_grad_norm is not None and inner_epochs == 1:
            raise ValueError(
                f"max_grad_norm={max_grad_norm} clips the steps of inner_epochs > 1; with one step per batch Lightning "
                "clips: set trainer.gradient_clip_val instead"
            )
        check_terminal_reward(terminal_reward, reward_model)
        self.model_spec = model
        self.reward_model_spec = reward_model
        self.gamma, self.lam = gamma, lam
        self.terminal_reward = terminal_reward
        self.preference_reward = preference_reward
        self.train_final_value = train_final_value
        self.ranking_weight = ranking_weight
        self.inner_epochs = inner_epochs
        self.max_grad_norm = max_grad_norm
        self.automatic_optimization = inner_epochs == 1
        self.optim = optim or OptimConfig(lr=1e-4)
        self.val_loss = MeanMetric()
        self.val_accuracy_mean_value = MeanMetric()
        self.val_accuracy_final_value = MeanMetric()
        self.val_score_pearson = PearsonCorrCoef()
        self.save_hyperparameters(ignore=["tokenizer"])

    def export_info(self) -> dict:
        """Also how the values were trained, so DVPO can refuse a GVM whose values it would misread."""
        training = {
            "terminal_reward": self.terminal_reward,
            "gamma": self.gamma,
            "lam": self.lam,
            "train_final_value": self.train_final_value,
            "ranking_weight": self.ranking_weight,
            "inner_epochs": self.inner_epochs,
        }
        return {**super().export_info(), "value_training": training}

    def exported_model_spec(self) -> ModelSpec:
        return self.model_spec

    def build_models(self) -> None:
        self.value_model = build_value_model(self.model_spec, self.tokenizer, role="value model")
        self.reward_model = (
            build_value_model(self.reward_model_spec, self.tokenizer, role="reward model")
            if self.reward_model_spec is not None
            else None
        )

    def trained_states(self, sequences: Sequences) -> torch.Tensor:
        """Mask `[2B, R + 1]` of the states the loss fits: s_1..s_T, and the complete response with `train_final_value`."""
        return state_mask(sequences.response_mask, include_final=self.train_final_value)

    def targets(self, batch: dict, sequences: Sequences, values: torch.Tensor) -> torch.Tensor:
        """TD(lambda) targets `[2B, R + 1]` from the values `[2B, R + 1]` (detached) and the terminal rewards."""
        mask = self.trained_states(sequences)
        rewards = terminal_rewards(
            batch, sequences, self.terminal_reward, self.preference_reward, self.reward_model
        )
        return td_lambda_returns(rewards, values.detach(), mask, self.gamma, self.lam)

    def loss(
        self, sequences: Sequences, values: torch.Tensor, targets: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = self.trained_states(sequences)
        # In training, the mean over every rank's states, so that data-parallel gradients are the global batch's.
        normalizers = loss_normalizers(mask, distributed=True) if training else None
        final = final_values(values, sequences.response_mask)  # [2B]
        return gvm_loss(
            values, targets, mask, final, ranking_weight=self.ranking_weight, normalizers=normalizers
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        sequences = pair_sequences(batch)
        if self.automatic_optimization:
            values = state_values(self.value_model, sequences)  # [2B, R + 1]
            loss, stats = self.loss(sequences, values, self.targets(batch, sequences, values), training=True)
        else:
            loss, stats = self.inner_epoch_steps(batch, sequences)
        size = batch["chosen_input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        if self.ranking_weight:
            for name in ("td_loss", "ranking_loss", "ranking_accuracy"):
                self.log(f"train/{name}", stats[name], batch_size=size, sync_dist=True)
        return loss if self.automatic_optimization else None

    def inner_epoch_steps(self, batch: dict, sequences: Sequences) -> tuple[torch.Tensor, dict]:
        """`inner_epochs` optimiser steps on the batch, towards targets fixed before the first; returns the first
        step's loss and stats (the loss before this batch's updates, as in automatic optimisation)."""
        with torch.no_grad():
            targets = self.targets(batch, sequences, state_values(self.value_model, sequences))
        steps = []
        for _ in range(self.inner_epochs):
            loss, stats = self.loss(
                sequences, state_values(self.value_model, sequences), targets, training=True
            )
            self.manual_backward(loss)
            step_manually(self, self.max_grad_norm)
            steps.append((loss.detach(), stats))
            if 0 < self.trainer.max_steps <= self.global_step:
                break  # the budget ends inside this batch's steps
        return steps[0]

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
