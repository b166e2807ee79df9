"""`make gpu-check`: every stage at Llama-3.2-1B's shape on one GPU in a few minutes, and what each costs.

    python -m benchmarks.gpu_check                  # CUDA; report in benchmarks/results/gpu.{md,json}
    python -m benchmarks.gpu_check --devices 8      # also every stage under FSDP2 sharded over 8 GPUs
    python -m benchmarks.gpu_check --device cpu     # the dry run at toy size, into outputs/gpu-check
    python -m benchmarks.gpu_check --only dvpo,ppo --variants single,fsdp2

Every stage runs through the `dvpo` CLI (`run_cli`) as a user runs it: its own config (`configs/<stage>.yaml`),
a strategy config where one is used (`configs/strategy/`), and an override file written for the run (models,
budgets, precision), layered with `--config`. The stages feed each other as the README's pipeline does: SFT
trains a randomly initialised model of Llama-3.2-1B's published shape (the built-in task's word-level tokenizer
padded with filler words to its 128,256 ids), RM, GVM and DPO start from the SFT export, PPO, DVPO and RTO
from theirs.

Runs (`stage/variant`):

- single: every stage without a strategy, bf16 mixed precision (fp32 master weights; frozen models in bf16);
- fsdp2: every stage under `ModelParallelStrategy` (FSDP2) on one rank, computing in bf16 (`fsdp.param_dtype`);
- dvpo/no-gc: DVPO with gradient checkpointing off (on everywhere else);
- dvpo/lora: DVPO with a LoRA policy whose disabled adapter is the reference;
- dvpo/fsdp1: DVPO under `FSDPStrategy` (FSDP1), bf16 mixed precision, frozen models in fp32 (FSDP1 flattens a
  unit's parameters into one tensor, which needs one dtype);
- fsdp2xN with `--devices N` (N > 1): every stage under FSDP2 sharded over N GPUs, all in one `torchrun`.

Each run reports its peak memory per step (`PeakMemoryMonitor`), its time per step or RL iteration and, on-policy,
the generate / score / update split, and its model-state floor (see `gpu_report`); DVPO and PPO are compared
under each strategy. A run that fails is reported with its error and the runs that need its export are reported
as not run; the report is rewritten after every run, so a run killed half-way leaves what was done. The exit
status is 1 when any run failed or did not run, with one line naming each.

On a CPU (`--device cpu`) the same runs happen at toy size in fp32 (bf16 matmuls are not dependable on CPUs),
FSDP2 runs on gloo, and dvpo/fsdp1 is skipped: Lightning runs FSDP1 on CUDA only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import torch
import transformers

from benchmarks.gpu_plan import (
    CPU_SCALE,
    GPU_SCALE,
    PROVIDERS,
    STAGES,
    VARIANTS,
    Run,
    Scale,
    config_files,
    export_dir,
    plan,
    write_tokenizer,
)
from benchmarks.gpu_report import cuda_allocated_gb, make_report, measure, unfinished
from benchmarks.report import DEFAULT_OUTPUT, write_report
from benchmarks.timing import DEVICES, resolve_device
from dvpo_lightning.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
CPU_OUTPUT = REPO / "outputs" / "gpu-check"  # the dry run's report never lands in benchmarks/results
GPU_DEADLINE_S = 420  # leaves a minute of the 8 for the installation
LIBRARIES = ("torch", "lightning", "transformers", "peft", "datasets", "tokenizers")


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def one_line(error: BaseException) -> str:
    if isinstance(error, SystemExit):  # the CLI refused the configuration; its message went to stderr
        return f"the dvpo CLI exited with status {error.code} (its message is printed above this run's line)"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def execute(run: Run, scale: Scale, work: Path, cuda: bool) -> dict:
    """Run `run` in this process; its record (status "ok", "failed" or "not run", and its figures)."""
    stage = STAGES[run.stage]
    missing = [need for need in stage.needs if not (export_dir(work, need) / "config.json").exists()]
    if missing:
        return run.record(cuda, status="not run", error=f"needs the export of {', '.join(missing)}/single")
    record = run.record(cuda)
    files = config_files(run, scale, work, cuda)
    record["command"] = "dvpo fit " + " ".join(f"--config {shlex.quote(str(path))}" for path in files)
    record["allocated_at_start_gb"] = cuda_allocated_gb(cuda)
    start = time.perf_counter()
    cli = None
    try:
        cli = run_cli(["fit", *(arg for path in files for arg in ("--config", str(path)))])
        record.update(measure(cli.trainer, cli.model, cuda), status="ok")
    except (Exception, SystemExit) as error:
        record.update(status="failed", error=one_line(error), traceback=traceback.format_exc()[-6000:])
    finally:
        del cli
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    record["wall_seconds"] = time.perf_counter() - start
    if is_rank_zero() and not (run.variant == "single" and run.stage in PROVIDERS):
        shutil.rmtree(work / run.folder / "model", ignore_errors=True)  # 5 GB at 1B; no later run loads it
    return record


def print_record(record: dict) -> None:
    line = f"[gpu-check] {record['run']}: {record['status']}"
    if record["status"] == "ok":
        line += f", peak {record['peak_gb']:.3f} GiB, {record['step_seconds_median']:.2f} s per step"
    elif "error" in record:
        line += f": {record['error']}"
    if "wall_seconds" in record:
        line += f" ({record['wall_seconds']:.0f} s)"
    print(line, flush=True)


def run_all(runs: list[Run], scale: Scale, work: Path, cuda: bool, deadline: float, save) -> list[dict]:
    """Execute `runs` in order, each after the last, calling `save(records)` after each."""
    records = []
    for run in runs:
        if run.variant == "fsdp1" and not cuda:
            record = run.record(
                cuda, status="skipped", error="Lightning runs FSDP1 (FSDPStrategy) on CUDA only"
            )
        elif time.monotonic() > deadline:
            record = run.record(cuda, status="not run", error="the check's --deadline-s had passed")
        else:
            record = execute(run, scale, work, cuda)
        records.append(record)
        if is_rank_zero():
            print_record(record)
            save(records)
    return records


def run_sharded(
    args: argparse.Namespace, stages: list[str], work: Path, cuda: bool, deadline: float
) -> list[dict]:
    """Every stage under FSDP2 over `--devices` processes: one torchrun of this script's sharded worker."""
    runs = [Run(name, "fsdp2", args.devices) for name in STAGES if name in stages]
    if time.monotonic() > deadline:
        return [
            run.record(cuda, status="not run", error="the check's --deadline-s had passed") for run in runs
        ]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.devices}",
    ]
    worker = ["-m", "benchmarks.gpu_check", "--sharded-worker", "--device", args.device]
    worker += ["--devices", str(args.devices), "--workdir", str(work), "--only", ",".join(stages)]
    command = [*torchrun, *worker, "--threads", str(args.threads)]
    print(f"[gpu-check] FSDP2 over {args.devices} processes: {shlex.join(command)}", flush=True)
    try:
        done = subprocess.run(command, cwd=REPO, timeout=max(deadline - time.monotonic(), 60))
        outcome = f"exit status {done.returncode}"
    except subprocess.TimeoutExpired:
        outcome = "killed at the --deadline-s"
    results = work / "sharded.json"
    records = json.loads(results.read_text()) if results.exists() else []
    finished = {record["run"] for record in records}
    for run in runs:
        if run.name not in finished:
            error = f"the sharded torchrun ended ({outcome}) before this run"
            records.append(run.record(cuda, status="failed", error=error))
            print_record(records[-1])
    return records


def sharded_worker(args: argparse.Namespace, scale: Scale, cuda: bool) -> int:
    """One rank of `run_sharded`: rank zero writes the records to `<workdir>/sharded.json` after every run."""
    work = Path(args.workdir)
    runs = [Run(name, "fsdp2", args.devices) for name in STAGES if name in args.only]
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))

    def save(records: list[dict]) -> None:
        (work / "sharded.json").write_text(json.dumps(records, indent=2, default=str))

    run_all(runs, scale, work, cuda, float("inf"), save)
    return 0


def context(args: argparse.Namespace, scale: Scale, cuda: bool) -> dict:
    size = "Llama-3.2-1B's shape" if cuda else "toy size (the CPU dry run)"
    return {
        "title": f"gpu-check: every stage at {size}",
        "device": args.device,
        "devices": args.devices,
        "scale": asdict(scale),
        "versions": {"cuda": torch.version.cuda, **{name: installed(name) for name in LIBRARIES}},
    }


def installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # e.g. peft without the extra: only the LoRA run needs it
        return "not installed"


def notes(scale: Scale, cuda: bool) -> list[str]:
    lines = [
        f"Models: a random Llama of {json.dumps(scale.arch)}, vocabulary {scale.vocab_size or 'of the task'}; "
        f"offline stages {scale.steps} steps of {scale.batch}; on-policy {scale.iterations} RL iterations of "
        f"{scale.rollout} prompts x {scale.new_tokens} new tokens, one PPO epoch of mini-batch {scale.mini_batch} "
        f"and micro-batch {scale.micro_batch} ({scale.steps_per_iteration} optimiser steps per iteration); AdamW.",
        "Peak memory per step: PeakMemoryMonitor's per-step value in the run's metrics.csv, "
        + (
            "torch.cuda.max_memory_allocated (absolute: every model, optimiser state and activation)."
            if cuda
            else "the resident memory above the fit's start (models loaded): toy figures, not a memory claim."
        ),
        "Model-state floor: the bytes of each model's parameters, four copies of a trained one (weight, gradient, "
        "Adam's two moments) and one of a frozen one, in their own dtypes, divided by the processes it is "
        "sharded over.",
    ]
    if cuda:
        lines.append(
            "Precision: bf16-mixed without a strategy and under FSDP1 (fp32 master weights); FSDP2 keeps fp32 "
            "master weights and computes in bf16 (fsdp.param_dtype). Frozen models are loaded in bf16, except "
            "under FSDP1, which needs one dtype per flattened unit."
        )
    else:
        lines.append(
            "CPU dry run: fp32 throughout (bf16 is exercised on the GPU only), FSDP2 on gloo, FSDP1 skipped "
            "(CUDA only). Times and memory are toy-scale."
        )
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available")
    parser.add_argument("--devices", type=int, default=1, help="N > 1 also runs every stage under FSDP2 on N")
    parser.add_argument(
        "--only", type=_names(STAGES), default=list(STAGES), help=f"stages, of {','.join(STAGES)}"
    )
    parser.add_argument(
        "--variants", type=_names(VARIANTS), default=list(VARIANTS), help=f"of {','.join(VARIANTS)}"
    )
    parser.add_argument("--output", type=Path, default=None, help=f"GPU: {DEFAULT_OUTPUT}; CPU: {CPU_OUTPUT}")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="exports and logs (default: a temporary one)"
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the exports and logs of every run")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help=f"start no run after this many seconds (GPU default {GPU_DEADLINE_S}; CPU: none)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads on a CPU (0: torch's default)"
    )
    parser.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1; got {args.devices}")
    return args


def _names(known) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(known))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown}; choose from {', '.join(known)}")
        return chosen

    return parse


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as error:  # --device cuda without a GPU torch can use
        print(f"gpu-check: {error}")
        return 2
    cuda = device.type == "cuda"
    if cuda and args.devices > torch.cuda.device_count():
        print(f"gpu-check: --devices {args.devices}, but torch sees {torch.cuda.device_count()} GPU(s)")
        return 2
    if not cuda and args.threads > 0:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    scale = GPU_SCALE if cuda else CPU_SCALE
    if args.sharded_worker:
        return sharded_worker(args, scale, cuda)

    started = time.monotonic()
    deadline = started + (args.deadline_s or (GPU_DEADLINE_S if cuda else float("inf")))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dvpo-gpu-check-"))
    output = args.output or (DEFAULT_OUTPUT if cuda else CPU_OUTPUT)
    command = "python -m benchmarks.gpu_check " + shlex.join(sys.argv[1:] if argv is None else argv)
    info, extra_notes = context(args, scale, cuda), notes(scale, cuda)

    def save(records: list[dict]) -> None:
        info["elapsed_seconds"] = time.monotonic() - started
        write_report(make_report(records, info, extra_notes), output, command, device)

    write_tokenizer(work / "tokenizer", scale.vocab_size, work / "cache")
    records = run_all(plan(args.only, args.variants), scale, work, cuda, deadline, save)
    if args.devices > 1 and "fsdp2" in args.variants:
        records += run_sharded(args, args.only, work, cuda, deadline)
        save(records)
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
    failed = unfinished(records)
    for record in failed:
        print(f"gpu-check: {record['run']} {record['status'].upper()}: {record['error']}")
    counts = {status: sum(r["status"] == status for r in records) for status in ("ok", "skipped")}
    summary = (
        f"gpu-check: {counts['ok']} runs ok, {counts['skipped']} skipped, {len(failed)} failed or not run"
    )
    if failed:
        summary += f" ({', '.join(record['run'] for record in failed)})"
    print(f"{summary}, in {time.monotonic() - started:.0f} s; report: {output / 'gpu.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
