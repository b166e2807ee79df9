"""The Global Value Model (GVM) of DVPO: a token-level value model pretrained offline on preference data.

Each pair gives two trajectories with a terminal reward (`terminal_reward`: +/-1 by preference, the data's scores or
a reward model's); the values of the states s_1..s_T (before each response token) and, with `train_final_value`, of
the complete response (which DVPO's default bootstrap reads) are regressed onto TD(lambda) returns of it computed
from the model's own detached values (`algos.td_lambda_returns`). Beyond the paper, each off by default: the loss
terms of `LOSS_WEIGHTS` (`algos.gvm_loss`: a Bradley-Terry ranking term, TCRM's per-prefix consistency terms) and
several optimiser steps per batch on targets fixed at its start (`inner_epochs`, the reference code's `vas_epochs`),
and values read as the running sum of learned token rewards (`value_form="earned"`).
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.regression import PearsonCorrCoef

from dvpo_lightning.algos import gvm_loss, loss_normalizers, masked_mean, td_lambda_returns
from dvpo_lightning.models import VALUE_FORMS, ModelSpec, build_value_model
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

#: the weights of the loss's terms beyond the paper's
LOSS_WEIGHTS = ("ranking_weight", "final_consistency_weight", "td_consistency_weight")
#: the export's record of how the values were trained, which DVPO reads
VALUE_TRAINING = (
    "value_form",
    "terminal_reward",
    "gamma",
    "lam",
    "train_final_value",
    *LOSS_WEIGHTS,
    "inner_epochs",
)
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
        value_form: "return" (the paper's: each state's output is its value, fitted to the TD(lambda) targets) or
            "earned" (each response token's output is that token's reward and a state's value their sum so far, as
            the gold values' are: only the complete response's value, the sum, is fitted to the terminal reward, so
            the tokens share its credit by least squares; `lam` has nothing to bootstrap). Saved with the export,
            which every reader of the GVM then reads the same way (`models.value_form`).
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
        check_value_form(value_form, train_final_value, final_consistency_weight, td_consistency_weight)
        self.model_spec = model
        self.reward_model_spec = reward_model
        self.gamma, self.lam, self.terminal_reward = gamma, lam, terminal_reward
        self.preference_reward = preference_reward
        self.train_final_value = train_final_value
        self.ranking_weight = ranking_weight
        self.final_consistency_weight = final_consistency_weight
        self.td_consistency_weight = td_consistency_weight
        self.inner_epochs = inner_epochs
        self.value_form = value_form
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
        training = {option: getattr(self, option) for option in VALUE_TRAINING}
        return {**super().export_info(), "value_training": training}

    def exported_model_spec(self) -> ModelSpec:
        return self.model_spec

    def build_models(self) -> None:
        self.value_model = build_value_model(self.model_spec, self.tokenizer, role="value model")
        trained_form = getattr(self.value_model.config, "dvpo_value_form", self.value_form)
        if trained_form != self.value_form:
            raise ValueError(
                f"GVMModule option value_form={self.value_form!r}, but the value model at "
                f"{self.model_spec.name_or_path!r} was trained with value_form={trained_form!r}: its outputs mean "
                "something else; continue it with the same value_form"
            )
        self.value_model.config.dvpo_value_form = self.value_form  # saved with the export: how to read it
        self.reward_model = (
            build_value_model(self.reward_model_spec, self.tokenizer, role="reward model")
            if self.reward_model_spec is not None
            else None
        )

    def trained_states(self, sequences: Sequences) -> torch.Tensor:
        """Mask `[2B, R + 1]` of the states the loss fits: s_1..s_T, and the complete response with `train_final_value`;
        with value_form "earned", the complete response only (its states' values are partial sums of its value)."""
        mask = sequences.response_mask
        if self.value_form == "earned":
            return state_mask(mask, include_final=True) & ~state_mask(mask, include_final=False)
        return state_mask(mask, include_final=self.train_final_value)

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


def check_value_form(
    value_form: str, train_final_value: bool, final_consistency_weight: float, td_consistency_weight: float
) -> None:
    """Refuse an unknown `value_form`, or options that fit the states an "earned" GVM does not fit itself."""
    if value_form not in VALUE_FORMS:
        raise ValueError(f"GVMModule option value_form must be one of {VALUE_FORMS}; got {value_form!r}")
    if value_form != "earned":
        return
    if not train_final_value:
        raise ValueError(
            "GVMModule option value_form='earned' fits only the complete response's value: it needs "
            "train_final_value: true"
        )
    for name, weight in (
        ("final_consistency_weight", final_consistency_weight),
        ("td_consistency_weight", td_consistency_weight),
    ):
        if weight:
            raise ValueError(
                f"GVMModule option {name}={weight} fits each state's value to another's, but with "
                "value_form='earned' a state's value is the reward earned so far, not a prediction of the final "
                f"one: set {name}: 0"
            )
