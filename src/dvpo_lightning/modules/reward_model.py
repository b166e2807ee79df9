"""Bradley–Terry reward model: a sequence score at the last real token, trained so chosen beats rejected."""

from __future__ import annotations

import torch
from torchmetrics.classification import BinaryAccuracy
from torchmetrics.regression import PearsonCorrCoef

from dvpo_lightning.algos import bradley_terry_loss
from dvpo_lightning.models import ModelSpec, build_value_model
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.rl import Sequences, final_values, pair_sequences, state_values


class RewardModelModule(RLHFModule):
    """Train a reward model (backbone + scalar head) on preference pairs.

    Logs `train/loss`, `train/accuracy`, `val/loss`, `val/accuracy` (pairwise: chosen scored above rejected),
    the mean margin, and where the data carries scores (the gold reward on the built-in task) the Pearson
    correlation of the model's scores with them (`val/score_pearson`). Exports the reward model.

    Args:
        model: the reward model; a causal-LM checkpoint (e.g. the SFT export) gets a fresh zero head.
        margin: optional fixed margin in the Bradley–Terry loss.
        optim: optimiser and schedule.
        **kwargs: `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "pairs"
    exported_model = "reward_model"

    def __init__(
        self,
        model: ModelSpec,
        margin: float | None = None,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model_spec = model
        self.margin = margin
        self.optim = optim or OptimConfig(lr=1e-4)
        self.val_accuracy = BinaryAccuracy()
        self.val_score_pearson = PearsonCorrCoef()
        self.save_hyperparameters(ignore=["tokenizer"])

    def exported_model_spec(self) -> ModelSpec:
        return self.model_spec

    def build_models(self) -> None:
        self.reward_model = build_value_model(self.model_spec, self.tokenizer, role="reward model")

    def pair_scores(self, sequences: Sequences) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[B]` of the chosen and of the rejected responses (`pair_sequences` of a batch)."""
        scores = final_values(state_values(self.reward_model, sequences), sequences.response_mask)
        return scores.chunk(2)

    def _step(self, batch: dict, prefix: str) -> torch.Tensor:
        sequences = pair_sequences(batch)
        chosen, rejected = self.pair_scores(sequences)
        losses, accuracies = bradley_terry_loss(chosen, rejected, margin=self.margin)
        loss = losses.mean()
        size = chosen.shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=size, sync_dist=prefix == "val")
        self.log(f"{prefix}/margin", (chosen - rejected).mean(), batch_size=size, sync_dist=prefix == "val")
        if prefix == "train":
            self.log("train/accuracy", accuracies.mean(), batch_size=size)
        else:
            # Decisions, not margins: torchmetrics would read margins in [0, 1] as probabilities.
            self.val_accuracy.update((chosen > rejected).long(), torch.ones_like(chosen, dtype=torch.long))
            self.log("val/accuracy", self.val_accuracy, batch_size=size)
            self.remember_scored_pairs(sequences, chosen, rejected)
            if "chosen_score" in batch:
                self.val_score_pearson.update(
                    torch.cat([chosen, rejected]), torch.cat([batch["chosen_score"], batch["rejected_score"]])
                )
                self.log("val/score_pearson", self.val_score_pearson, batch_size=size)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        return self.optimizer_for(self.reward_model, self.optim, self.trainer.estimated_stepping_batches)
