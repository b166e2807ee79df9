"""Two real CPU ranks (gloo): whitening (of advantages, and of the GVM's values) and loss normalisers see every
rank's real tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dvpo_lightning.algos import aggregate_loss, get_advantage, loss_normalizers, masked_whiten
from tests.algos.test_layouts import layout_mask, spread

WORLD_SIZE = 2
RANK_ROWS = [slice(0, 3), slice(3, 5)]  # unequal shards: 3 rows on rank 0, 2 on rank 1


def _batch():
    """The whole batch `[5, 4]`, NaN on padding; rank r holds rows RANK_ROWS[r]."""
    mask = layout_mask([4, 1, 3, 2, 4], 4, "interior", seed=0)
    return spread(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), mask), mask


FINAL_VALUES = torch.arange(1.0, 6.0)  # [5], the GVM's complete-response values of the batch


def _whitened_gvm_advantages(values, mask, final_values):
    return get_advantage("gvm")(
        token_rewards=torch.zeros_like(values),
        values=values,
        mask=mask,
        gamma=1.0,
        lam=0.95,
        final_values=final_values,
        whiten_values=True,
    )[0]


def _rank_main(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        x, mask = _batch()
        rows = RANK_ROWS[rank]
        whitened = masked_whiten(x[rows], mask[rows], distributed=True)
        gvm_advantages = _whitened_gvm_advantages(x[rows], mask[rows], FINAL_VALUES[rows])
        normalizers = loss_normalizers(mask[rows], distributed=True)
        params = torch.where(mask, x, 0).requires_grad_(True)
        loss = aggregate_loss(params[rows] ** 2, mask[rows], "token-mean", normalizers)
        (grad,) = torch.autograd.grad(loss, params)
        dist.all_reduce(grad)  # what DDP does: average the ranks' gradients
        torch.save(
            {
                "whitened": whitened,
                "gvm_advantages": gvm_advantages,
                "counts": (
                    normalizers.num_tokens.item(),
                    normalizers.num_sequences.item(),
                    normalizers.world_size,
                ),
                "loss": loss.detach(),
                "grad": grad / WORLD_SIZE,
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_whitening_and_loss_normalizers_across_two_ranks(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD_SIZE)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    x, mask = _batch()

    whole_batch = masked_whiten(x, mask)
    gvm_whole_batch = _whitened_gvm_advantages(x, mask, FINAL_VALUES)
    for rank, rows in enumerate(RANK_ROWS):
        torch.testing.assert_close(results[rank]["whitened"], whole_batch[rows])
        torch.testing.assert_close(results[rank]["gvm_advantages"], gvm_whole_batch[rows])
        assert results[rank]["counts"] == (14.0, 5.0, 2)

    params = torch.where(mask, x, 0).requires_grad_(True)
    full = aggregate_loss(params**2, mask, "token-mean")
    (full_grad,) = torch.autograd.grad(full, params)
    torch.testing.assert_close(sum(result["loss"] for result in results) / WORLD_SIZE, full.detach())
    torch.testing.assert_close(results[0]["grad"], full_grad)
