"""`peer`: our `DPOModule` (through a Lightning Trainer) against TRL's `DPOTrainer` on the same job.

Same tiny Llama policy, same reference (a different random init, so the first loss is not log 2), same pairs in
the same order, batch size, beta, learning rate, Adam betas, gradient clip, CPU or GPU in fp32. Reported:
samples/s over the steady-state steps (median time from one step's end to the next, warm-up steps left out, so
set-up and dataset preparation are not counted) and the first-step loss of both, which must agree to 1e-5.

Matching the tokenisation. TRL (1.16, non-conversational data) appends the EOS *text* to each completion,
tokenises `prompt + completion` as one string and takes the completion to start where that diverges from the
tokenised prompt; our data module tokenises the prompt and the response separately and appends the EOS *id*.
With the built-in task's word-level tokenizer (whitespace pre-tokeniser, no BOS) the two agree when TRL's
completions start with a space: TRL gets `" " + chosen` and `" " + rejected`. Neither side truncates (TRL
`max_length=None`, ours 64 tokens, more than any row). The benchmark checks that every pair's token ids are
identical on both sides before it trains, and feeds TRL the pairs in the order our loader draws them
(TRL's sequential sampler), so both first steps see the same batch.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset

from benchmarks.cost import llama
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import StepClock, alternating, bare_trainer, synchronize
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.modules import DPOModule, OptimConfig

SPEED_TARGET = 1.2  # our samples/s over TRL's
LOSS_TOLERANCE = 1e-5
BETA = 0.1
LR = 1e-4
BETAS = (0.9, 0.999)  # TRL's AdamW defaults, given to ours too
MAX_LENGTH = 64  # our prompt and response budgets: longer than any built-in row, so nothing is truncated


class Skipped(Exception):
    """The benchmark cannot run here; the message says why and what to install."""


@dataclass(frozen=True)
class Scale:
    arch: dict
    pairs: int
    batch: int
    steps: int  # per run
    warmup: int  # step intervals of each run left out of the median
    rounds: int  # runs of each trainer, alternating, so that a slow spell of a shared machine hits both alike


FULL = Scale(arch=llama(64, 2), pairs=512, batch=32, steps=50, warmup=5, rounds=3)
QUICK = Scale(arch=llama(32, 2), pairs=16, batch=4, steps=4, warmup=1, rounds=1)


@dataclass(frozen=True)
class Job:
    """What both trainers get: the policy and reference exports and the pairs (ours as a data module)."""

    policy_dir: str
    reference_dir: str
    pairs: Dataset
    data: RLHFDataModule

    def order(self) -> list[int]:
        """The pairs' indices in the order our loader draws them (TRL is fed them in this order)."""
        return [int(index) for batch in self.data.train_dataloader() for index in batch["index"]]


def run(quick: bool, device: torch.device) -> Report:
    if importlib.util.find_spec("trl") is None:
        raise Skipped("TRL is not installed: `pip install -e '.[bench]'` (or `make install`) brings it in")
    scale = QUICK if quick else FULL
    with TemporaryDirectory(prefix="dvpo-bench-peer-") as tmp:
        tmp = Path(tmp)
        job = prepare_job(scale, tmp)
        trainers = {
            "ours": partial(run_ours, job, scale, device),
            "trl": partial(run_trl, job, scale, device),
        }
        runs = {name: [] for name in trainers}
        for round_index in range(scale.rounds):
            for name in alternating(trainers, round_index):
                print(f"[peer] round {round_index + 1}/{scale.rounds}: {name}, {scale.steps} DPO steps")
                runs[name].append(trainers[name](tmp / f"{name}{round_index}"))
    return make_report(runs, scale)


def prepare_job(scale: Scale, tmp: Path) -> Job:
    """Export a random policy (init seed 0) and reference (seed 1) of `scale.arch`, and `scale.pairs` built-in pairs."""
    tokenizer = RLHFDataModule("builtin:topics").tokenizer
    policy_dir, reference_dir = (
        export_model(
            build_policy(ModelSpec(arch=dict(scale.arch), init_seed=seed), tokenizer),
            tokenizer,
            str(tmp / name),
        )
        for seed, name in enumerate(("policy", "reference"))
    )
    pairs = get_task("topics", 0).preference_dataset(scale.pairs)
    return Job(policy_dir, reference_dir, pairs, our_data(pairs, policy_dir, scale, tmp))


def our_data(pairs, tokenizer_dir: str, scale: Scale, tmp: Path) -> RLHFDataModule:
    """The pairs as a prompt/chosen/rejected JSON lines file, read by our data module (no validation split)."""
    path = tmp / "pairs.jsonl"
    with path.open("w") as handle:
        for row in pairs:
            handle.write(json.dumps({key: row[key] for key in ("prompt", "chosen", "rejected")}) + "\n")
    data = RLHFDataModule(
        str(path),
        tokenizer=tokenizer_dir,
        mode="pairs",
        batch_size=scale.batch,
        val_size=0,
        max_prompt_length=MAX_LENGTH,
        max_response_length=MAX_LENGTH,
        cache_dir=str(tmp / "cache"),
    )
    data.setup("fit")
    return data


def run_ours(job: Job, scale: Scale, device: torch.device, root: Path) -> dict:
    module = DPOModule(
        policy=ModelSpec(name_or_path=job.policy_dir),
        reference=ModelSpec(name_or_path=job.reference_dir),
        beta=BETA,
        optim=OptimConfig(lr=LR, betas=BETAS),
        tokenizer=job.data.tokenizer,
        export_dir=str(root / "model"),
    )
    clock = StepClock()
    trainer = bare_trainer(device, root, scale.steps, [clock], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=job.data)
    return {"first_loss": clock.first_loss, "step_seconds": clock.intervals}


def run_trl(job: Job, scale: Scale, device: torch.device, root: Path) -> dict:
    from transformers import TrainerCallback
    from trl import DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        """TRL's trainer, unchanged, that remembers the loss of its first step."""

        first_loss: float | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.first_loss is None and model.training:
                loss = result[0] if return_outputs else result
                self.first_loss = float(loss.detach())
            return result

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.ends.append(time.perf_counter())

    step_ends = StepEnds()
    trainer = trl_trainer(
        job,
        job.order(),
        scale,
        device,
        root,
        RecordingDPOTrainer,
        [step_ends],
        beta=BETA,
        loss_type=["sigmoid"],
    )
    trainer.train()
    intervals = [later - earlier for earlier, later in zip(step_ends.ends, step_ends.ends[1:])]
    return {"first_loss": trainer.first_loss, "step_seconds": intervals}


def trl_trainer(
    job: Job,
    order: list[int],
    scale: Scale,
    device: torch.device,
    root: Path,
    trainer_class: type | None = None,
    callbacks: list | None = None,
    **loss_options,
):
    """TRL's `DPOTrainer` (or `trainer_class`) on `job`'s pairs in `order`, with our training settings and
    `loss_options` (`beta`, `loss_type`, `loss_weights`, ...) for its `DPOConfig`; every pair's token ids are
    checked to be ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(root),
        per_device_train_batch_size=scale.batch,
        max_steps=scale.steps,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=None,
        train_sampling_strategy="sequential",
        bf16=False,
        fp16=False,
        use_cpu=device.type != "cuda",
        dataloader_pin_memory=False,
        report_to="none",
        save_strategy="no",
        logging_steps=scale.steps,
        disable_tqdm=True,
        seed=0,
        **loss_options,
    )
    trainer = (trainer_class or DPOTrainer)(
        model=AutoModelForCausalLM.from_pretrained(job.policy_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(job.reference_dir, dtype=torch.float32),
        args=args,
        train_dataset=trl_rows(job, order),
        processing_class=AutoTokenizer.from_pretrained(job.policy_dir),
        callbacks=callbacks or [],
    )
    check_same_tokens(job.data, order, trainer.train_dataset)
    return trainer


def trl_rows(job: Job, order: list[int]) -> Dataset:
    """`job`'s pairs in `order` as TRL reads them: it joins prompt and completion as text, so a space keeps the
    word-level tokens apart."""
    rows = [
        {
            "prompt": job.pairs[i]["prompt"],
            "chosen": " " + job.pairs[i]["chosen"],
            "rejected": " " + job.pairs[i]["rejected"],
        }
        for i in order
    ]
    return Dataset.from_list(rows)


def check_same_tokens(data: RLHFDataModule, order: list[int], trl_rows) -> None:
    """Every pair must reach both trainers as the same token ids; the first mismatch is an error naming it."""
    ours = {row["row"]: row for row in data.train_dataset}
    for position, (index, theirs) in enumerate(zip(order, trl_rows)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(ours[index][key]) != list(theirs[key]):
                raise AssertionError(
                    f"pair {index} (TRL row {position}): {key} differ, ours {ours[index][key]} vs TRL {theirs[key]}"
                )


def make_report(runs: dict[str, list[dict]], scale: Scale) -> Report:
    """Samples/s from the median step interval over every run's steady steps; first losses of the first runs."""
    rates = {
        name: scale.batch
        / statistics.median(interval for run in results for interval in run["step_seconds"][scale.warmup :])
        for name, results in runs.items()
    }
    first_losses = {name: results[0]["first_loss"] for name, results in runs.items()}
    speedup = rates["ours"] / rates["trl"]
    loss_gap = abs(first_losses["ours"] - first_losses["trl"])
    table = Table(
        f"DPO, batch {scale.batch} pairs, beta {BETA}: {scale.rounds} alternating runs of {scale.steps} steps "
        f"each (median step interval, {scale.warmup} warm-up steps of each run left out)",
        ["trainer", "samples (pairs)/s", "median step (ms)", "first-step loss"],
    )
    for name, label in (("ours", "dvpo_lightning DPOModule + Lightning"), ("trl", "trl.DPOTrainer")):
        table.rows.append(
            [
                label,
                f"{rates[name]:.1f}",
                f"{1000 * scale.batch / rates[name]:.1f}",
                f"{first_losses[name]:.7f}",
            ]
        )
    checks = Table(
        "Targets",
        ["quantity", "value", "target", "verdict"],
        [
            [
                "speed ours / TRL",
                f"{speedup:.2f}x",
                f">= {SPEED_TARGET}x",
                verdict(speedup, SPEED_TARGET, at_least=True),
            ],
            [
                "first-step loss gap",
                f"{loss_gap:.2e}",
                f"<= {LOSS_TOLERANCE:.0e}",
                verdict(loss_gap, LOSS_TOLERANCE),
            ],
        ],
    )
    notes = [
        f"Model: random Llama {scale.arch['hidden_size']} x {scale.arch['num_hidden_layers']} layers, policy init "
        "seed 0, reference init seed 1 (so the first loss is not log 2); fp32; AdamW lr "
        f"{LR}, betas {BETAS}, no weight decay, constant schedule, gradient clip 1.0.",
        f"Data: {scale.pairs} built-in pairs as prompt/chosen/rejected, fed to TRL in our loader's order "
        "(sequential sampler).",
        "Tokenisation matched: TRL appends the EOS text and tokenises prompt + completion together, ours tokenises "
        "them apart and appends the EOS id; with the word-level tokenizer (no BOS) TRL's completions get a leading "
        "space, and the token ids of every pair were checked identical before training. No truncation on either "
        "side.",
        "Speed: median wall time between consecutive step ends (data loading, forward, backward, optimiser step "
        "and each framework's own per-step work), set-up and dataset preparation excluded; TRL logs once "
        "(logging_steps = steps), ours has no logger.",
    ]
    raw = {
        "runs": runs,
        "samples_per_s": rates,
        "speedup": speedup,
        "first_losses": first_losses,
        "first_loss_gap": loss_gap,
    }
    return Report("peer", "peer: DPO against TRL's DPOTrainer", [checks, table], raw, notes)
