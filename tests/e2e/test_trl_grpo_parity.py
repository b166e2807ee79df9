"""Our policy losses and aggregations against TRL's `GRPOTrainer`: on one batch with identical log-probs, old
log-probs, reference log-probs and advantages, TRL's own loss code (`GRPOTrainer._compute_loss`, run on a stand-in
for the trainer that hands it those log-probs) and ours give the same loss and the same gradient, for each of its
`loss_type`s `grpo`, `bnpo`, `dr_grpo`, `dapo`, `cispo` and for GSPO (`importance_sampling_level="sequence"`).
Skipped where TRL is not installed (`pip install -e '.[bench]'`)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dvpo_lightning.algos import get_policy_loss, kl_loss, loss_normalizers

pytest.importorskip("trl")

B, T, MAX_COMPLETION_LENGTH = 4, 6, 8  # dr_grpo divides by the longest completion allowed, not by T
LENGTHS = [6, 2, 4, 1]
BETA = 0.04

# case -> (our policy loss, its options, our aggregation, TRL's GRPOConfig settings)
CASES = {
    **{
        loss_type: ("ppo", {"clip_eps_low": 0.2, "clip_eps_high": 0.28}, loss_type, {"loss_type": loss_type})
        for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
    },
    "cispo": ("cispo", {"max_weight": 1.05}, "dapo", {"loss_type": "cispo", "epsilon_high": 1.05}),
    "gspo": (
        "gspo",
        {"clip_eps_low": 0.03, "clip_eps_high": 0.04},  # wider than the paper's, so that some sequences clip
        "grpo",
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 0.03, "epsilon_high": 0.04},
    ),
}


def _batch(off_policy: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.arange(T) < torch.tensor(LENGTHS).unsqueeze(-1)  # [B, T], right-padded as TRL's completions
    logprobs = -torch.rand(B, T, generator=generator) * 3  # finite on padding too: TRL multiplies by the mask
    drift = 0.3 * torch.randn(B, T, generator=generator) if off_policy else torch.zeros(B, T)
    return {
        "logprobs": logprobs,
        "old_logprobs": logprobs + drift,
        "ref_logprobs": logprobs + 0.5 * torch.randn(B, T, generator=generator),
        "advantages": torch.tensor([1.2, -0.7, 0.4, -1.5]),  # one per sequence, as GRPO's
        "mask": mask,
    }


def trl_loss(batch: dict, logprobs: torch.Tensor, settings: dict) -> torch.Tensor:
    """TRL's `_compute_loss` on a stand-in trainer: one process, no gradient accumulation, one optimiser step per
    generation batch, no vLLM, no entropy terms; the model's log-probs are `logprobs`."""
    from trl import GRPOTrainer

    settings = {"epsilon": 0.2, "epsilon_high": 0.28, "importance_sampling_level": "token", **settings}
    identity = lambda tensor, **unused: tensor  # noqa: E731
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (
            logprobs,
            torch.zeros_like(logprobs),
            None,
        ),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=settings["importance_sampling_level"],
        beta=BETA,
        loss_type=settings["loss_type"],
        epsilon_low=settings["epsilon"],
        epsilon_high=settings["epsilon_high"],
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=SimpleNamespace(num_processes=1, reduce=identity, gather=identity, sync_gradients=True),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    mask = batch["mask"].long()
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": batch["advantages"],
        "old_per_token_logps": batch["old_logprobs"],
        "ref_per_token_logps": batch["ref_logprobs"],
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def our_loss(batch: dict, logprobs: torch.Tensor, name: str, options: dict, mode: str) -> torch.Tensor:
    """What `PPOUpdate.loss` adds up with the KL in the loss (k3), on one micro-batch."""
    mask = batch["mask"]
    normalizers = loss_normalizers(mask, max_response_length=MAX_COMPLETION_LENGTH)
    advantages = batch["advantages"].unsqueeze(-1).expand(B, T)
    policy, _ = get_policy_loss(name)(
        logprobs=logprobs,
        old_logprobs=batch["old_logprobs"],
        advantages=advantages,
        mask=mask,
        mode=mode,
        normalizers=normalizers,
        **options,
    )
    kl, _ = kl_loss(
        logprobs,
        batch["ref_logprobs"],
        mask,
        kl_coef=BETA,
        estimator="k3",
        mode=mode,
        normalizers=normalizers,
    )
    return policy + kl


@pytest.mark.parametrize("off_policy", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient_equal_trls_grpo_trainer(case, off_policy):
    name, options, mode, settings = CASES[case]
    batch = _batch(off_policy)
    theirs_logprobs = batch["logprobs"].clone().requires_grad_(True)
    ours_logprobs = batch["logprobs"].clone().requires_grad_(True)
    theirs = trl_loss(batch, theirs_logprobs, settings)
    ours = our_loss(batch, ours_logprobs, name, options, mode)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours_logprobs.grad, theirs_logprobs.grad, rtol=1e-5, atol=1e-7)


def test_the_later_step_clips():
    """The off-policy batch moves the ratios past every case's clip range, so the comparison covers clipping."""
    batch = _batch(off_policy=True)
    for name, options, mode, _ in CASES.values():
        _, stats = get_policy_loss(name)(
            logprobs=batch["logprobs"],
            old_logprobs=batch["old_logprobs"],
            advantages=batch["advantages"].unsqueeze(-1).expand(B, T),
            mask=batch["mask"],
            mode=mode,
            normalizers=loss_normalizers(batch["mask"], max_response_length=MAX_COMPLETION_LENGTH),
            **options,
        )
        assert 0 < stats["clip_fraction"] < 1, name
