"""The Global Value Model (GVM) of DVPO: a token-level value model pretrained offline on preference data.

Each pair gives two trajectories, chosen with terminal reward `+1` and rejected with `-1` (or, with
`terminal_reward="score"` / `"reward_model"`, the data's scores or a reward model's). The model's values on
the states a response visits are regressed onto TD(lambda) returns of that terminal reward computed from its
own (detached) values (`algos.td_lambda_returns`). The states are s_1..s_T (before each response token) and,
with `train_final_value`, the complete response, whose target is the terminal reward itself; DVPO's
default bootstrap (`final_value`) reads that final value as the return of a sampled response.
"""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric
from torchmetrics.regression import PearsonCorrCoef

from dvpo_lightning.algos import loss_normalizers, masked_mean, td_lambda_returns, value_loss
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.rl import Sequences, final_values, pair_sequences, state_mask, state_values

TERMINAL_REWARDS = ("preference", "score", "reward_model")


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
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if terminal_reward not in TERMINAL_REWARDS:
            raise ValueError(f"terminal_reward must be one of {TERMINAL_REWARDS}; got {terminal_reward!r}")
        if (terminal_reward == "reward_model") != (reward_model is not None):
            raise ValueError(
                "terminal_reward='reward_model' and `reward_model` go together: give the reward model's path "
                f"with it, and only with it (got terminal_reward={terminal_reward!r}, reward_model={reward_model})"
            )
        self.model_spec = model
        self.reward_model_spec = reward_model
        self.gamma, self.lam = gamma, lam
        self.terminal_reward = terminal_reward
        self.preference_reward = preference_reward
        self.train_final_value = train_final_value
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

    def terminal_rewards(self, batch: dict, sequences: Sequences) -> torch.Tensor:
        """Terminal reward `[2B]` of each trajectory: chosen rows first, then rejected."""
        if self.terminal_reward == "preference":
            size = batch["chosen_input_ids"].shape[0]
            sign = torch.cat([torch.ones(size), -torch.ones(size)]).to(self.device)
            return self.preference_reward * sign
        if self.terminal_reward == "score":
            if "chosen_score" not in batch:
                raise ValueError(
                    "terminal_reward='score' needs `chosen_score` and `rejected_score` columns in the data; "
                    "this dataset has none (use terminal_reward='preference' or a reward model)"
                )
            return torch.cat([batch["chosen_score"], batch["rejected_score"]]).float()
        with torch.no_grad():
            return final_values(state_values(self.reward_model, sequences), sequences.response_mask)

    def _values_and_loss(self, batch: dict, training: bool) -> tuple[torch.Tensor, torch.Tensor, Sequences]:
        sequences = pair_sequences(batch)
        values = state_values(self.value_model, sequences)  # [2B, R + 1]
        mask = state_mask(sequences.response_mask, include_final=self.train_final_value)
        targets = td_lambda_returns(
            self.terminal_rewards(batch, sequences), values.detach(), mask, self.gamma, self.lam
        )
        # In training, the mean over every rank's states, so that data-parallel gradients are the global batch's.
        normalizers = loss_normalizers(mask, distributed=True) if training else None
        loss, _ = value_loss(values, targets, mask, normalizers=normalizers)
        return values, loss, sequences

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        values, loss, sequences = self._values_and_loss(batch, training=True)
        self.log(
            "train/loss", loss, prog_bar=True, batch_size=batch["chosen_input_ids"].shape[0], sync_dist=True
        )
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        values, loss, sequences = self._values_and_loss(batch, training=False)
        mask = sequences.response_mask
        mean_value = masked_mean(values, state_mask(mask, include_final=False), dim=-1)  # [2B]
        final_value = final_values(values, mask)  # [2B]
        self.val_loss.update(loss, weight=mask.shape[0])
        for metric, value in (
            (self.val_accuracy_mean_value, mean_value),
            (self.val_accuracy_final_value, final_value),
        ):
            chosen, rejected = value.chunk(2)
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
        return self.optimizer_for(self.value_model, self.optim, self.trainer.estimated_stepping_batches)
