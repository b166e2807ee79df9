"""`cost`: what DVPO saves over PPO — peak memory and time per RL iteration on the same models, batch and lengths.

Both algorithms run the engine's own modules (`PPOModule`, `DVPOModule`) through a Lightning Trainer on random
tiny Llama models of two sizes, exported once (policy, reward model, GVM) so that both load them by path. The
settings are identical: rollout batch, response length (min_new_tokens = max_new_tokens, so every response has
the same length), PPO epochs and mini-batch. PPO trains actor and critic and runs the reward model and the
reference; DVPO trains the actor only and runs the reference and the GVM.

Every configuration runs in fresh processes (forked from a server that only imported the libraries), PPO and
DVPO taking turns. Memory: on the CPU the baseline is the resident memory after the imports and the data, before
any model is built, and the peak is the kernel's high-water mark (VmHWM) at the end of training; on a GPU it is
`torch.cuda.max_memory_allocated` with the models built inside the measurement; the median over the processes.
Time: the median wall time of an RL iteration, over every process's iterations after its warm-up one. Each stage's
model FLOP/s is reported as a fraction of the machine's measured matmul peak (`benchmarks.flops`).
"""

from __future__ import annotations

import multiprocessing
import statistics
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import lightning.pytorch as pl
import torch

from benchmarks.flops import LinearWork, describe_peak, fraction_of_peak, matmul_peak, percent
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import StepClock, alternating, bare_trainer
from dvpo_lightning.callbacks.memory_probes import make_probe
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, export_model, value_head
from dvpo_lightning.modules import DVPOModule, OptimConfig, PPOModule
from dvpo_lightning.rl import PPOConfig, SamplingConfig

MEMORY_TARGET = 0.62  # DVPO / PPO; the paper measured 0.66 at 3B
TIME_TARGET = 0.60  # the paper measured 0.57 at 3B
UPDATE_PEAK_TARGET = 0.5  # DVPO's update phase at the largest size, as a fraction of the measured matmul peak
ALGORITHMS = ("ppo", "dvpo")
STAGES = ("generate", "score", "update")  # the parts of an RL iteration
# Bytes per parameter of the model states: fp32 weights, and for a trained model also its gradient and
# Adam's two moments.
FROZEN_BYTES, TRAINED_BYTES = 4, 16
BUILTIN_SIZE = 2000  # enough prompts for every rollout of the run
WARMUP = 1  # iterations of each process left out of the time


def llama(hidden: int, layers: int) -> dict:
    """A Llama architecture of the given width and depth (64-wide heads, 4x MLP)."""
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 1),
        "num_key_value_heads": max(hidden // 64, 1),
        "max_position_embeddings": 128,  # room for the prompt and response budgets of every benchmark
    }


@dataclass(frozen=True)
class Scale:
    sizes: dict[str, dict]  # name -> architecture
    rollout_batch: int
    new_tokens: int
    ppo_epochs: int
    mini_batch: int
    iterations: int  # per process; the first is a warm-up
    rounds: int  # processes per configuration, PPO and DVPO taking turns

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * -(-self.rollout_batch // self.mini_batch)


FULL = Scale(
    sizes={"h256-l4": llama(256, 4), "h512-l8": llama(512, 8)},
    rollout_batch=32,
    new_tokens=16,
    ppo_epochs=4,
    mini_batch=16,
    iterations=5,
    rounds=2,
)
QUICK = Scale(
    sizes={"h32-l2": llama(32, 2), "h64-l2": llama(64, 2)},
    rollout_batch=4,
    new_tokens=4,
    ppo_epochs=1,
    mini_batch=2,
    iterations=2,
    rounds=1,
)


@dataclass(frozen=True)
class Exports:
    """The models of one size, exported with the run's tokenizer, and their parameter counts."""

    policy: str
    reward_model: str
    gvm: str
    policy_parameters: int
    value_parameters: int
    policy_work: LinearWork
    value_work: LinearWork


@dataclass(frozen=True)
class Job:
    """One configuration, measured in its own process."""

    algorithm: str
    size: str
    exports: Exports
    scale: Scale
    device: str
    threads: int  # torch CPU threads of the process


def run(quick: bool, device: torch.device) -> Report:
    scale = QUICK if quick else FULL
    peak = matmul_peak(device, quick=quick)
    results = []
    with TemporaryDirectory(prefix="dvpo-bench-cost-") as tmp:
        tokenizer = RLHFDataModule("builtin:topics").tokenizer
        for size, arch in scale.sizes.items():
            exports = export_models(Path(tmp) / size, arch, tokenizer)
            processes = {algorithm: [] for algorithm in ALGORITHMS}
            for round_index in range(scale.rounds):
                for algorithm in alternating(ALGORITHMS, round_index):
                    print(
                        f"[cost] {size} {algorithm}, round {round_index + 1}/{scale.rounds}: a fresh process"
                    )
                    job = Job(algorithm, size, exports, scale, str(device), torch.get_num_threads())
                    processes[algorithm].append(measure_in_fresh_process(job))
            results += [
                combine(size, algorithm, runs, exports, scale, peak) for algorithm, runs in processes.items()
            ]
    return make_report(results, scale, device, peak)


def combine(size: str, algorithm: str, runs: list[dict], exports: Exports, scale: Scale, peak: float) -> dict:
    """One configuration's numbers over its processes: the median peak, and the median of every iteration
    after each process's warm-up one."""
    steady = [run["iteration_seconds"][WARMUP:] for run in runs]
    stage_seconds = {
        stage: statistics.median(seconds[stage] for run in runs for seconds in run["stage_seconds"][WARMUP:])
        for stage in STAGES
    }
    tokens = statistics.median(tokens for run in runs for tokens in run["tokens"][WARMUP:])
    flops = stage_flops(algorithm, exports, scale, tokens)
    return {
        "size": size,
        "algorithm": algorithm,
        "peak_gb": statistics.median(run["peak_gb"] for run in runs),
        "iteration_seconds": statistics.median(seconds for run in steady for seconds in run),
        "stage_seconds": stage_seconds,
        "stage_flops": flops,
        "fraction_of_matmul_peak": {
            stage: fraction_of_peak(flops[stage], stage_seconds[stage], peak) for stage in STAGES
        },
        "policy_parameters": exports.policy_parameters,
        "value_parameters": exports.value_parameters,
        "floor_gb": model_state_floor_gb(exports, algorithm),
        "processes": runs,
    }


def stage_flops(algorithm: str, exports: Exports, scale: Scale, tokens: float) -> dict[str, float]:
    """Model FLOPs of each stage of an iteration over `tokens` real prompt and response tokens: generation runs the
    policy; scoring the policy and the reference, and the GVM (DVPO) or the reward model and the critic (PPO);
    every epoch of the update trains the policy, and the critic (PPO)."""
    policy, value = exports.policy_work, exports.value_work
    responses = scale.rollout_batch * scale.new_tokens  # the tokens whose logits are used
    value_models = 2 if algorithm == "ppo" else 1
    update = policy.training(tokens, responses) + (value.training(tokens) if algorithm == "ppo" else 0)
    return {
        "generate": policy.forward(tokens, responses),
        "score": 2 * policy.forward(tokens, responses) + value_models * value.forward(tokens),
        "update": scale.ppo_epochs * update,
    }


def export_models(directory: Path, arch: dict, tokenizer) -> Exports:
    """Random policy, reward model and GVM of architecture `arch` (distinct seeds, random value heads)."""
    policy = build_policy(ModelSpec(arch=dict(arch), init_seed=0), tokenizer)
    paths = {"policy": export_model(policy, tokenizer, str(directory / "policy"))}
    for seed, name in enumerate(("reward_model", "gvm"), start=1):
        model = build_value_model(ModelSpec(arch=dict(arch), init_seed=seed), tokenizer)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            value_head(model).weight.normal_(std=0.02)  # a zero head would score every response 0
        paths[name] = export_model(model, tokenizer, str(directory / name))
    return Exports(
        **paths,
        policy_parameters=sum(p.numel() for p in policy.parameters()),
        value_parameters=sum(p.numel() for p in model.parameters()),
        policy_work=LinearWork.of(policy),
        value_work=LinearWork.of(model),
    )


def measure_in_fresh_process(job: Job) -> dict:
    """Run `measure(job)` in a new process forked from a server that has only imported this module."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with context.Pool(processes=1, maxtasksperchild=1) as pool:
        return pool.apply(measure, (job,))


def build_module(job: Job, tokenizer) -> pl.LightningModule:
    scale = job.scale
    common = dict(
        policy=ModelSpec(name_or_path=job.exports.policy),
        sampling=SamplingConfig(max_new_tokens=scale.new_tokens, min_new_tokens=scale.new_tokens),
        ppo=PPOConfig(ppo_epochs=scale.ppo_epochs, mini_batch_size=scale.mini_batch, kl_coef=0.05),
        optim=OptimConfig(lr=1e-6),
        tokenizer=tokenizer,
    )
    if job.algorithm == "ppo":
        return PPOModule(reward_model=ModelSpec(name_or_path=job.exports.reward_model), **common)
    return DVPOModule(value_model=ModelSpec(name_or_path=job.exports.gvm), **common)


class PeakAtTrainEnd(pl.Callback):
    """Reads the memory probe when training ends, before the model export of `on_fit_end`."""

    def __init__(self, probe) -> None:
        self.probe = probe
        self.peak: dict[str, float] = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.peak = self.probe.peak()


def measure(job: Job) -> dict:
    """Peak memory and iteration times of one configuration (runs in the fresh process)."""
    device = torch.device(job.device)
    torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    data = RLHFDataModule(
        "builtin:topics",
        tokenizer=job.exports.policy,
        mode="prompts",
        batch_size=job.scale.rollout_batch,
        builtin_size=BUILTIN_SIZE,
    )
    data.setup("fit")
    probe = make_probe(device)
    probe.start()  # the baseline: libraries and data loaded, no model built yet
    clock, peak = StepClock(), PeakAtTrainEnd(probe)
    with TemporaryDirectory(prefix="dvpo-bench-cost-run-") as root:
        module = build_module(job, data.tokenizer)
        module.export_dir = str(Path(root) / "model")
        steps = job.scale.iterations * job.scale.steps_per_iteration
        trainer = bare_trainer(device, Path(root), steps, [clock, peak])
        trainer.fit(module, datamodule=data)
    probe.stop()
    # CPU: peak_rss_above_baseline_gb; CUDA: max_memory_allocated_gb (then also the reserved memory).
    metric = next(iter(peak.peak))
    return {
        "peak_gb": peak.peak[metric],
        "peak_metric": metric,
        "iteration_seconds": clock.durations,
        "stage_seconds": clock.stages,
        "tokens": clock.tokens,
        "torch_threads": torch.get_num_threads(),
    }


def model_state_floor_gb(exports: Exports, algorithm: str) -> float:
    """Analytic bytes of the model states alone: PPO trains actor and critic, DVPO the actor only."""
    policy, value = exports.policy_parameters, exports.value_parameters
    if algorithm == "ppo":  # actor + critic trained; reference + reward model frozen
        total = TRAINED_BYTES * (policy + value) + FROZEN_BYTES * (policy + value)
    else:  # actor trained; reference + GVM frozen
        total = TRAINED_BYTES * policy + FROZEN_BYTES * (policy + value)
    return total / 2**30


def make_report(results: list[dict], scale: Scale, device: torch.device, peak: float) -> Report:
    by_key = {(result["size"], result["algorithm"]): result for result in results}
    measured = Table(
        "Per configuration (median over iterations after a warm-up one)",
        [
            "model",
            "algorithm",
            "peak memory above baseline (GiB)",
            "model-state floor (GiB)",
            "time per RL iteration (s)",
            "generate / score / update (s)",
            "% of matmul peak (generate / score / update)",
        ],
    )
    ratios = Table(
        "DVPO / PPO",
        [
            "model",
            "parameters (policy)",
            "memory ratio",
            f"target <= {MEMORY_TARGET}",
            "time ratio",
            f"target <= {TIME_TARGET}",
            "model-state floor ratio",
            "DVPO update, % of matmul peak",
        ],
    )
    summary = {}
    for size in scale.sizes:
        for algorithm in ALGORITHMS:
            result = by_key[size, algorithm]
            seconds = [result["stage_seconds"][stage] for stage in STAGES]
            measured.rows.append(
                [
                    size,
                    algorithm.upper(),
                    f"{result['peak_gb']:.3f}",
                    f"{result['floor_gb']:.3f}",
                    f"{result['iteration_seconds']:.2f}",
                    " / ".join(f"{value:.2f}" for value in seconds),
                    " / ".join(percent(result["fraction_of_matmul_peak"][stage]) for stage in STAGES),
                ]
            )
        ppo, dvpo = by_key[size, "ppo"], by_key[size, "dvpo"]
        memory_ratio = dvpo["peak_gb"] / ppo["peak_gb"]
        time_ratio = dvpo["iteration_seconds"] / ppo["iteration_seconds"]
        ratios.rows.append(
            [
                size,
                f"{ppo['policy_parameters'] / 1e6:.2f} M",
                f"{memory_ratio:.2f}",
                verdict(memory_ratio, MEMORY_TARGET, quick=scale is QUICK),
                f"{time_ratio:.2f}",
                verdict(time_ratio, TIME_TARGET, quick=scale is QUICK),
                f"{dvpo['floor_gb'] / ppo['floor_gb']:.2f}",
                percent(dvpo["fraction_of_matmul_peak"]["update"]),
            ]
        )
        summary[size] = {"memory_ratio": memory_ratio, "time_ratio": time_ratio}
    largest = list(scale.sizes)[-1]
    update_fraction = by_key[largest, "dvpo"]["fraction_of_matmul_peak"]["update"]
    targets = Table(
        "Targets beside the ratios",
        ["quantity", "value", "target", "verdict"],
        [
            [
                f"DVPO update phase at {largest}, fraction of the matmul peak",
                percent(update_fraction),
                f">= {percent(UPDATE_PEAK_TARGET)}",
                verdict(update_fraction, UPDATE_PEAK_TARGET, at_least=True, quick=scale is QUICK),
            ]
        ],
    )
    notes = [
        f"Settings (both algorithms): rollout batch {scale.rollout_batch}, {scale.new_tokens} new tokens "
        f"(min_new_tokens = max_new_tokens), {scale.ppo_epochs} PPO epochs, mini-batch {scale.mini_batch} "
        f"({scale.steps_per_iteration} optimiser steps per iteration); {scale.rounds} process(es) per configuration, "
        f"PPO and DVPO taking turns, {scale.iterations} iterations each, the first a warm-up; "
        "fp32, AdamW.",
        "Memory: "
        + (
            "torch.cuda.max_memory_allocated, models built inside the measurement."
            if device.type == "cuda"
            else "VmHWM at the end of training minus the resident memory after imports and data, before any "
            "model is built, in a fresh process forked from a server that only imported the libraries; the "
            "median over the processes of a configuration."
        ),
        "Model-state floor: fp32 weights (4 B/parameter) of every model, plus gradient and two Adam moments "
        "(12 B/parameter more) of each trained one: PPO trains actor and critic, DVPO only the actor.",
        "Stage FLOPs: generate runs the policy over the iteration's real prompt and response tokens; score runs the "
        "policy and the reference, and the GVM (DVPO) or the reward model and the critic (PPO); the update trains "
        "the policy (and PPO's critic) once per PPO epoch.",
        describe_peak(peak, device),
    ]
    raw = {"runs": results, "ratios": summary, "matmul_peak_flops": peak}
    return Report("cost", "cost: DVPO vs PPO, memory and time", [ratios, targets, measured], raw, notes)
