"""Supervised fine-tuning: the causal-LM loss on response tokens only (the prompt is context, not target)."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from dvpo_lightning.algos import aggregate_loss, loss_normalizers
from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.rl import SamplingConfig, policy_logprobs, sft_sequences


class SFTModule(PolicyModule):
    """Fine-tune a policy on demonstrations (the chosen responses of pair data, or an SFT set).

    Logs `train/loss` (mean negative log-likelihood per response token), `val/loss` and `val/perplexity`
    (over all validation tokens), and the generation metrics of `PolicyModule`. Exports the policy.

    Args:
        policy: the model to fine-tune.
        optim: optimiser and schedule.
        eval_sampling: how to answer validation prompts for the gold-reward evaluation; None skips it.
        **kwargs: `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "sft"
    frozen_models = ()

    def __init__(
        self,
        policy: ModelSpec,
        optim: OptimConfig | None = None,
        eval_sampling: SamplingConfig | None = None,
        **kwargs,
    ):
        # SFT keeps no reference policy: its generation metrics carry no KL.
        super().__init__(
            policy=policy,
            reference=None,
            reference_as_disabled_adapter=False,
            eval_sampling=eval_sampling,
            **kwargs,
        )
        self.optim = optim or OptimConfig(lr=1e-4)
        self.val_nll = MeanMetric()
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        # SFT keeps no reference policy: its generation metrics carry no KL.
        self.policy = build_policy(self.policy_spec, self.tokenizer, role="policy")
        self.reference = None

    def _token_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        sequences = sft_sequences(batch)
        logprobs, _ = policy_logprobs(self.policy, sequences)
        return -logprobs, sequences.response_mask

    def training_step(self, batch: dict, batch_idx: int) -> dict:
        nll, mask = self._token_nll(batch)
        # The mean over every rank's tokens, so that data-parallel gradients are those of the global batch.
        loss = aggregate_loss(nll, mask, "token-mean", normalizers=loss_normalizers(mask, distributed=True))
        self.log("train/loss", loss, prog_bar=True, batch_size=mask.shape[0], sync_dist=True)
        return {"loss": loss, "num_tokens": mask.sum() + batch["prompt_attention_mask"].sum()}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        nll, mask = self._token_nll(batch)
        self.val_nll.update(nll[mask])  # every validation token counts once, whatever the batching
        self.evaluate_generations(batch)

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count:
            nll = self.val_nll.compute()
            self.log("val/loss", nll)
            self.log("val/perplexity", torch.exp(nll))
        self.val_nll.reset()

    def configure_optimizers(self):
        return self.optimizer_for(self.policy, self.optim, self.trainer.estimated_stepping_batches)
