"""Offline preference optimisation: DPO and its family (IPO, RPO, ...), and reference-free SimPO and ORPO."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info

from dvpo_lightning.algos import PreferenceLosses, PreferenceObjective, masked_sum
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import OfflinePolicyModule
from dvpo_lightning.rl import Sequences, pair_sequences, policy_logprobs


class DPOModule(OfflinePolicyModule):
    """Offline training of the policy on preference pairs with any loss of `algos.PREFERENCE_LOSSES` (TRL's names),
    or a weighted sum of several; exports the policy (the DPO model RTO uses).

    Losses that read the reference (DPO and its family) build a frozen reference policy; with only reference-free
    losses (`simpo`, `orpo`, `nll`) no reference model is built at all. The formulas, with their papers, are in
    `algos.preference_losses` and docs/algorithms.md.

    Logs TRL's metrics: `rewards/chosen`, `rewards/rejected` (the implicit rewards: beta times the log-ratio to the
    reference, or for reference-free losses beta times the per-token mean log-prob), `rewards/accuracies`,
    `rewards/margins`, `logps/chosen`, `logps/rejected`, with several losses each one's unweighted `loss/<name>`,
    under `train/` and `val/`, and the generation metrics of `PolicyModule` (gold reward on the built-in task, KL
    to the reference where there is one).

    Args:
        beta: the losses' temperature (DPO's beta; IPO's tau; SimPO's beta, about 2; ORPO's lambda, about 0.1).
        loss_type: a loss name, or a list of them summed with `loss_weights`: sigmoid (DPO), sigmoid_norm, hinge,
            ipo, robust, exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
            discopop, nll (NLL of the chosen responses: `[sigmoid, nll]` is RPO), simpo, orpo.
        loss_weights: one weight per `loss_type` entry (default 1 each), e.g. `[1.0, 0.5]` for RPO's alpha 0.5.
        label_smoothing: assumed label-flip rate of sigmoid (conservative DPO, default 0), robust (default
            0.1), exo_pair (default 1e-3), aot, aot_unpaired and simpo (default 0).
        ipo_normalization: "sum" (default: log-ratios summed over the response, as in the IPO paper and
            OpenRLHF) or "token_mean" (each divided by its response length, as TRL's `ipo`).
        discopop_tau: DiscoPOP's temperature (default 0.05).
        simpo_gamma: SimPO's target margin gamma (default 0.5).
        precompute_reference: compute the reference's log-probs of every training and validation pair once,
            before training, and free the reference model (the generation metrics then carry no KL).
        share_prompts: read a pair's prompt once with a KV cache for both of its responses (about a third less work
            per step on HH-RLHF). Off by default: the same numbers up to float rounding, but not bit for bit, so a
            run keeps the figures it had.
        optim: optimiser and schedule.
        **kwargs: `policy`, `reference`, `reference_as_disabled_adapter`, `eval_sampling` (see `PolicyModule`),
            `tokenizer`, `export_dir`, `fsdp` (see `RLHFModule`).

    Options left None take each loss's default; an option that no chosen loss reads is an error, unless its value
    changes no loss (label_smoothing 0, which older checkpoints stored).
    """

    data_mode = "pairs"

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float | None = None,
        ipo_normalization: str | None = None,
        discopop_tau: float | None = None,
        simpo_gamma: float | None = None,
        precompute_reference: bool = False,
        share_prompts: bool = False,
        optim: OptimConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.objective = PreferenceObjective(
            loss_type,
            loss_weights,
            beta=beta,
            label_smoothing=label_smoothing,
            ipo_normalization=ipo_normalization,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
        )
        if not self.objective.needs_reference:
            self._refuse_reference_options(loss_type, precompute_reference)
        self.precompute_reference = precompute_reference
        self.share_prompts = share_prompts
        self.optim = optim or OptimConfig(lr=1e-6)
        self._reference_cache: dict[str, dict[int, torch.Tensor]] = {}
        self.save_hyperparameters(ignore=["tokenizer"])

    def _refuse_reference_options(self, loss_type: str | Sequence[str], precompute_reference: bool) -> None:
        if self.reference_spec is not None:
            raise ValueError(
                f"loss_type {loss_type} uses no reference model, so `reference` would be loaded for nothing: "
                "remove it, or choose a loss that reads the reference"
            )
        if precompute_reference:
            raise ValueError(
                f"loss_type {loss_type} uses no reference model, so precompute_reference=true has nothing to "
                "compute: set it to false"
            )

    def build_models(self) -> None:
        self.build_policy_and_reference(with_reference=self.objective.needs_reference)

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
                logps = self._reference_sequence_logps(self.pairs(batch))  # [2B]
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
    def pairs(self, batch: dict) -> Sequences:
        """The batch's chosen and rejected responses as one `[2B]` batch, sharing their prompts if asked."""
        sequences = pair_sequences(batch)
        return sequences if self.share_prompts else dataclasses.replace(sequences, prompt_of_row=None)

    def pair_losses(self, batch: dict, split: str) -> tuple[PreferenceLosses, torch.Tensor, torch.Tensor]:
        """The objective on a batch of pairs (its `losses` `[B]`, one per pair), and the policy's sequence log-probs
        of the chosen and of the rejected responses `[B]` each."""
        sequences = self.pairs(batch)
        logprobs, _ = policy_logprobs(self.policy, sequences)
        mask = sequences.response_mask  # [2B, R]
        policy_chosen, policy_rejected = masked_sum(logprobs, mask, dim=-1).chunk(2)
        chosen_lengths, rejected_lengths = mask.sum(-1).chunk(2)
        reference = {}
        if self.objective.needs_reference:
            ref_chosen, ref_rejected = self.reference_pair_logps(batch, sequences, split).chunk(2)
            reference = {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        result = self.objective(
            policy_chosen,
            policy_rejected,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            **reference,
        )
        return result, policy_chosen, policy_rejected

    def _step(self, batch: dict, split: str) -> torch.Tensor:
        result, policy_chosen, policy_rejected = self.pair_losses(batch, split)
        loss = result.losses.mean()
        chosen_rewards, rejected_rewards = result.chosen_rewards, result.rejected_rewards
        metrics = {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        if len(result.terms) > 1:
            metrics.update({f"loss/{name}": value for name, value in result.terms.items()})
        size = policy_chosen.shape[0]
        for name, value in metrics.items():
            self.log(
                f"{split}/{name}", value, batch_size=size, prog_bar=name == "loss", sync_dist=split == "val"
            )
        return loss
