"""KTO: offline training on unpaired feedback, each response labelled desirable or undesirable."""

from __future__ import annotations

import dataclasses

import torch

from dvpo_lightning.algos import check_kto_options, kto_loss, kto_reference_point, masked_sum
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import OfflinePolicyModule
from dvpo_lightning.rl import Sequences, pair_sequences, policy_logprobs


class KTOModule(OfflinePolicyModule):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306) as TRL's `KTOTrainer` computes it (`algos.kto_loss`), on
    `kto` data (prompt, completion, boolean label) or on pair data, each pair one desirable and one undesirable
    response; exports the policy.

    KTO's reference point, an estimate of `KL(pi || pi_ref)`, comes from mismatched pairs within the batch: row `i`'s
    prompt with row `i - 1`'s response (TRL's cycling), read in the same forward as the matched rows. So the data's
    batch sizes must be at least 2; a last batch of one row pairs its prompt with its own response, as in TRL.

    Logs TRL's metrics under `train/` and `val/`: `loss`, `kl` (the reference point), `rewards/chosen`,
    `rewards/rejected` (beta times the log-ratio to the reference of the desirable and the undesirable responses),
    `rewards/margins`, `logps/chosen`, `logps/rejected`, each where the batch has such responses; and the generation
    metrics of `PolicyModule`.

    Args:
        beta: KTO's beta (TRL's default 0.1).
        desirable_weight: weight of the desirable responses' losses (`lambda_D`, default 1).
        undesirable_weight: weight of the undesirable responses' losses (`lambda_U`, default 1); the paper
            recommends `desirable_weight * n_desirable / (undesirable_weight * n_undesirable)` in [1, 4/3].
        share_prompts: read each prompt once with a KV cache for its matched and its mismatched response (as
            `DPOModule`'s option: the same numbers up to float rounding).
        optim: optimiser and schedule.
        **kwargs: `policy`, `reference`, `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`),
            `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).
    """

    data_mode = "unpaired"

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        share_prompts: bool = False,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_kto_options(beta, desirable_weight, undesirable_weight)
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight
        self.share_prompts = share_prompts
        self.optim = optim or OptimConfig(lr=1e-6)
        self.save_hyperparameters(ignore=["tokenizer"])

    def build_models(self) -> None:
        self.build_policy_and_reference()

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        for option in ("batch_size", "eval_batch_size"):
            size = getattr(datamodule, option, None)
            if size is not None and size < 2:
                raise ValueError(
                    f"data.{option}={size}: KTO estimates its reference point from each prompt paired with another "
                    "row's response in the batch, so batches need at least 2 rows"
                )

    def matched_and_mismatched(self, batch: dict) -> Sequences:
        """`[2B]` rows: each prompt with its own response (`:B`), then with the previous row's response (`B:`)."""
        responses = {
            "chosen_input_ids": batch["response_input_ids"],
            "chosen_mask": batch["response_mask"],
            "rejected_input_ids": batch["response_input_ids"].roll(1, dims=0),
            "rejected_mask": batch["response_mask"].roll(1, dims=0),
        }
        sequences = pair_sequences({**batch, **responses})
        return sequences if self.share_prompts else dataclasses.replace(sequences, prompt_of_row=None)

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        sequences = self.matched_and_mismatched(batch)
        mask = sequences.response_mask  # [2B, R]
        logprobs, _ = policy_logprobs(self.policy, sequences)
        policy_logps, kl_policy_logps = masked_sum(logprobs, mask, dim=-1).chunk(2)  # [B] each
        ref_logps, kl_ref_logps = masked_sum(self.reference_logprobs(sequences), mask, dim=-1).chunk(2)
        reference_point = kto_reference_point(kl_policy_logps, kl_ref_logps, distributed=True)
        desirable = batch["label"]  # [B] bool
        losses = kto_loss(
            policy_logps,
            ref_logps,
            desirable,
            reference_point,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        loss = losses.mean()
        rewards = self.beta * (policy_logps - ref_logps).detach()  # [B]
        size = len(desirable)
        metrics = {
            "loss": (loss, size),
            "kl": (reference_point, size),
        }  # name -> (batch value, rows it covers)
        for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
            count = int(rows.sum())
            if count:  # an epoch's mean weighs each batch by its rows of that label
                metrics[f"rewards/{name}"] = (rewards[rows].mean(), count)
                metrics[f"logps/{name}"] = (policy_logps.detach()[rows].mean(), count)
        if 0 < int(desirable.sum()) < size:
            metrics["rewards/margins"] = (metrics["rewards/chosen"][0] - metrics["rewards/rejected"][0], size)
        for name, (value, rows) in metrics.items():
            self.log(
                f"{split}/{name}", value, batch_size=rows, prog_bar=name == "loss", sync_dist=split == "val"
            )
        return loss
