"""Direct Preference Optimization: the policy learns from pairs through its log-ratio to a frozen reference."""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_info

from dvpo_lightning.algos import dpo_loss, masked_sum
from dvpo_lightning.algos.losses import DPO_LOSS_TYPES
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.rl import Sequences, pair_sequences, policy_logprobs


class DPOModule(PolicyModule):
    """Offline DPO on preference pairs; exports the policy (the DPO model RTO uses).

    Logs TRL's metrics: `rewards/chosen`, `rewards/rejected` (beta times the log-ratio to the reference),
    `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`, under `train/` and `val/`,
    and the generation metrics of `PolicyModule` (gold reward on the built-in task, KL to the reference).

    Args:
        beta: strength of the KL regularisation (DPO's beta).
        loss_type: "sigmoid" (DPO) or "ipo".
        label_smoothing: conservative DPO's assumed label-noise rate (sigmoid loss only).
        precompute_reference: compute the reference's log-probs of every training and validation pair once,
            before training, and free the reference model (the generation metrics then carry no KL).
        optim: optimiser and schedule.
        **kwargs: `policy`, `reference`, `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`),
            `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "pairs"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        precompute_reference: bool = False,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}; got {loss_type!r}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.precompute_reference = precompute_reference
        self.optim = optim or OptimConfig(lr=1e-6)
        self._reference_cache: dict[str, dict[int, torch.Tensor]] = {}
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()

    # -------------------------------------------------------------------------------- reference log-probs
    def on_fit_start(self) -> None:
        if not self.precompute_reference:
            return
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise ValueError(
                "precompute_reference=true reads every training and validation pair before training, so it needs a "
                "data module: pass `datamodule=` to `Trainer.fit` (the CLI does), or set precompute_reference=false"
            )
        for split, loader in (("train", datamodule.train_dataloader()), ("val", datamodule.val_dataloader())):
            cache = self._reference_cache.setdefault(split, {})
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch)
                logps = self._reference_sequence_logps(pair_sequences(batch))  # [2B]
                for index, pair in zip(batch["index"].tolist(), torch.stack(logps.chunk(2), dim=-1).cpu()):
                    cache[index] = pair
        rank_zero_info(
            f"Precomputed reference log-probs of {sum(map(len, self._reference_cache.values()))} pairs; "
            "the reference model is freed"
        )
        self.reference, self.reference_as_disabled_adapter = None, False

    def _reference_sequence_logps(self, sequences: Sequences) -> torch.Tensor:
        return masked_sum(self.reference_logprobs(sequences), sequences.response_mask, dim=-1)

    def reference_pair_logps(self, batch: dict, sequences: Sequences, split: str) -> torch.Tensor:
        """Reference sequence log-probs `[2B]` (chosen rows first), from the cache when precomputed."""
        cache = self._reference_cache.get(split)
        if cache is None:
            return self._reference_sequence_logps(sequences)
        pairs = torch.stack([cache[index] for index in batch["index"].tolist()]).to(self.device)  # [B, 2]
        return torch.cat([pairs[:, 0], pairs[:, 1]])

    # --------------------------------------------------------------------------------------------- steps
    def _step(self, batch: dict, split: str) -> torch.Tensor:
        sequences = pair_sequences(batch)
        logprobs, _ = policy_logprobs(self.policy, sequences)
        policy_chosen, policy_rejected = masked_sum(logprobs, sequences.response_mask, dim=-1).chunk(2)
        ref_chosen, ref_rejected = self.reference_pair_logps(batch, sequences, split).chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            self.beta,
            self.loss_type,
            self.label_smoothing,
        )
        loss = losses.mean()
        metrics = {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        size = policy_chosen.shape[0]
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}", value, batch_size=size, prog_bar=name == "loss", sync_dist=split == "val"
            )
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")
        self.evaluate_generations(batch)

    def configure_optimizers(self):
        return self.optimizer_for(self.policy, self.optim, self.trainer.estimated_stepping_batches)
