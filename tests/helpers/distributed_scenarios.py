"""Training scenarios that `tests/e2e/test_distributed.py` runs on 1 process and on 2 (torchrun, gloo, CPU).

    python tests/helpers/distributed_scenarios.py --root R --sft S --gvm G gvm-single dvpo-single dpo-single
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/distributed_scenarios.py \
        --root R --sft S --gvm G gvm-ddp gvm-fsdp2 dvpo-ddp dvpo-fsdp2 dpo-fsdp2 gvm-fsdp2-resume

Every run sees the same global batches: `GLOBAL_BATCH` rows per step, split over the ranks by an unshuffled
`DistributedSampler`, so 2 ranks and 1 rank must end with the same weights. Each scenario exports its trained
model to `R/<scenario>/model`; rank 0 writes `R/<scenario>/result.json`.

The `-room` scenarios run one DVPO iteration on rows 0-3 where row 1 (rank 1's first) has no room for a
response: rank 1 keeps row 3 and rank 0 balances to row 0, so `dvpo-single-room` trains on rows 0 and 3.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch.utils.data import DistributedSampler

from dvpo_lightning.checkpoint_io import link_last_checkpoint
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.collate import Collator
from dvpo_lightning.data.resumable import ResumableDataLoader
from dvpo_lightning.models import ModelSpec
from dvpo_lightning.modules import DPOModule, DVPOModule, GVMModule, OptimConfig, PPOConfig, SamplingConfig

GLOBAL_BATCH = 4
STEPS = 3
TIMEOUT = timedelta(seconds=240)  # a hung collective fails the test instead of waiting 30 minutes


def strategy(name: str, world: int):
    if name == "ddp":
        return DDPStrategy(process_group_backend="gloo", timeout=TIMEOUT)
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1, timeout=TIMEOUT)
    return "auto"


def loader(data: RLHFDataModule, world: int, rank: int) -> ResumableDataLoader:
    sampler = DistributedSampler(data.train_dataset, num_replicas=world, rank=rank, shuffle=False)
    return ResumableDataLoader(
        data.train_dataset,
        batch_size=GLOBAL_BATCH // world,
        sampler=sampler,
        collate_fn=Collator(data.mode, data.tokenizer.pad_token_id),
    )


def build(algorithm: str, args, data: RLHFDataModule, export_dir: Path):
    common = {"tokenizer": data.tokenizer, "export_dir": str(export_dir)}
    if algorithm == "gvm":
        return GVMModule(
            model=ModelSpec(name_or_path=args.sft), optim=OptimConfig(optimizer="sgd", lr=0.5), **common
        )
    if algorithm == "dpo":  # each pair's prompt read once for both responses, under every strategy
        return DPOModule(
            policy=ModelSpec(name_or_path=args.sft),
            reference=ModelSpec(name_or_path=args.sft),
            optim=OptimConfig(optimizer="sgd", lr=0.5),
            **common,
        )
    return DVPOModule(
        policy=ModelSpec(name_or_path=args.sft),
        value_model=ModelSpec(name_or_path=args.gvm),
        sampling=SamplingConfig(max_new_tokens=6, do_sample=False),  # greedy: the same rollouts on any split
        ppo=PPOConfig(ppo_epochs=2),
        optim=OptimConfig(optimizer="sgd", lr=0.5),
        **common,
    )


def without_room(data: RLHFDataModule, world: int, policy: str) -> None:
    """Keep rows 0-3 with row 1 as long as the policy's context, or, on one process, the rows 0 and 3 that 2
    processes keep."""
    if world == 1:
        data.train_dataset = data.train_dataset.select([0, 3])
        return
    context = json.loads((Path(policy) / "config.json").read_text())["max_position_embeddings"]

    def lengthen(row: dict, index: int) -> dict:
        return {"prompt_ids": (row["prompt_ids"] * context)[:context] if index == 1 else row["prompt_ids"]}

    data.train_dataset = data.train_dataset.select([0, 1, 2, 3]).map(lengthen, with_indices=True)


def run(scenario: str, args, world: int, rank: int) -> None:
    algorithm, strategy_name, *variant = scenario.split("-")
    resume = variant == ["resume"]
    out = Path(args.root) / scenario
    data = RLHFDataModule(
        "builtin:topics",
        builtin_size=40,
        mode="pairs" if algorithm in ("gvm", "dpo") else "prompts",
        cache_dir=args.cache,
    )
    data.setup("fit")
    if variant == ["room"]:
        without_room(data, world, args.sft)

    def fit(max_steps: int, ckpt_path: str | None = None) -> pl.Trainer:
        pl.seed_everything(0)
        module = build(algorithm, args, data, out / "model")
        checkpoints = ModelCheckpoint(
            dirpath=out / "checkpoints", every_n_train_steps=1, save_last=True, save_top_k=-1
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=world,
            strategy=strategy(strategy_name, world),
            max_steps=max_steps,
            gradient_clip_val=0.5 if algorithm == "gvm" else None,
            use_distributed_sampler=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            callbacks=[checkpoints] if resume else [],
            enable_checkpointing=bool(resume),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        link_last_checkpoint(trainer)  # as the `dvpo` CLI does
        trainer.fit(module, train_dataloaders=loader(data, world, rank), ckpt_path=ckpt_path)
        return trainer

    if resume:
        fit(max_steps=2)
        trainer = fit(max_steps=STEPS, ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    else:
        trainer = fit(max_steps=2 if variant == ["room"] else STEPS)  # "room": one iteration, 2 PPO epochs
    logged = {name: float(value) for name, value in trainer.callback_metrics.items() if "/" in name}
    if rank == 0:
        (out / "result.json").write_text(
            json.dumps({"global_step": trainer.global_step, "world_size": world, "logged": logged})
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--gvm", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("scenarios", nargs="+")
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    for scenario in args.scenarios:
        run(scenario, args, world, rank)


if __name__ == "__main__":
    main()
