"""What `gpu_check` reads from a finished run, and the report it writes.

A run's figures come from what every `dvpo fit` already produces: the peak memory of each training step and RL
stage from `PeakMemoryMonitor` (its per-step values in the run's `metrics.csv`, its fit summary), the
generate / score / update seconds the on-policy modules log as `time/<stage>`, and the wall time of each
training step from the benchmarks' `StepClock` callback. The model-state floor is counted from the run's own
models after the fit.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import lightning.pytorch as pl
import torch

from benchmarks.cost import MEMORY_TARGET, TIME_TARGET
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import StepClock
from dvpo_lightning.callbacks import PeakMemoryMonitor

GIB = 2**30
RL_STAGES = ("generate", "score", "update")
# A trained parameter holds its weight, its gradient and Adam's two moments, each in the parameter's dtype.
TRAINED_COPIES = 4
LEFTOVER_GIB = 0.1  # memory a run may find allocated at its start without a note in the report
WARMUP = 1  # leading steps left out of the median step time (compilation, allocator growth, lazy state)


def peak_metric(cuda: bool) -> str:
    """The name of `PeakMemoryMonitor`'s per-step peak on this device (see `memory_probes`)."""
    return "max_memory_allocated_gb" if cuda else "peak_rss_above_baseline_gb"


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Every column of a CSVLogger `metrics.csv` as its non-empty values in row (step) order."""
    if not path.exists():  # only rank zero's logger writes it
        return {}
    columns: dict[str, list[float]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if value not in ("", None):
                    columns.setdefault(name, []).append(float(value))
    return columns


def steady_median(values: list[float]) -> float | None:
    """The median after the warm-up steps (of all of them when there are no others)."""
    steady = values[WARMUP:] or values
    return statistics.median(steady) if steady else None


def model_states(module: pl.LightningModule) -> dict[str, dict[str, int]]:
    """Parameters and model-state bytes of each model of a stage (trained: `TRAINED_COPIES` copies; frozen: one).

    Counted from the parameters themselves, so dtypes (a frozen model in bf16, fp32 master weights), tied
    embeddings (counted once) and LoRA (a frozen base, trained adapters) all come out as they are. Under FSDP a
    parameter's `numel` is the whole tensor's, so the bytes are those of all ranks together.
    """
    states = {}
    for name, model in module.hf_models().items():
        parameters = list(model.parameters())
        trained = [p for p in parameters if p.requires_grad]
        states[name] = {
            "parameters": sum(p.numel() for p in parameters),
            "trained_parameters": sum(p.numel() for p in trained),
            "state_bytes": sum(
                (TRAINED_COPIES if p.requires_grad else 1) * p.numel() * p.element_size() for p in parameters
            ),
        }
    return states


def measure(trainer: pl.Trainer, module: pl.LightningModule, cuda: bool) -> dict:
    """The figures of a finished fit. Every rank calls it (`trainer.log_dir` is a collective)."""
    clock = next(cb for cb in trainer.callbacks if isinstance(cb, StepClock))
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, PeakMemoryMonitor))
    metrics = read_metrics(Path(trainer.log_dir or trainer.default_root_dir) / "metrics.csv")
    metric = peak_metric(cuda)
    per_step = metrics.get(f"perf/{metric}", [])
    stage_seconds = {stage: metrics[f"time/{stage}"] for stage in RL_STAGES if f"time/{stage}" in metrics}
    states = model_states(module)
    return {
        "training_batches": len(clock.durations),  # optimiser steps offline, RL iterations on-policy
        "optimizer_steps": trainer.global_step,
        "step_seconds": clock.durations,
        "step_seconds_median": steady_median(clock.durations),
        "rl_stage_seconds": stage_seconds,
        "rl_stage_seconds_median": {stage: steady_median(values) for stage, values in stage_seconds.items()},
        "peak_metric": metric,
        "peak_gb_per_step": per_step,
        "peak_gb": max(per_step) if per_step else None,
        "fit_peak_gb": monitor.summary.get("overall", {}).get(metric),
        "rl_stage_peak_gb": {
            stage: peaks.get(metric) for stage, peaks in monitor.summary.get("phases", {}).items()
        },
        "models": states,
        "floor_gb": sum(state["state_bytes"] for state in states.values()) / trainer.world_size / GIB,
    }


def cuda_allocated_gb(cuda: bool) -> float | None:
    """Memory the allocator holds before a run starts: what earlier runs of the process failed to release."""
    return torch.cuda.memory_allocated() / GIB if cuda else None


# ------------------------------------------------------------------------------------------------- report
def _number(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _size(gib: float | None) -> str:
    """GiB with 4 significant digits: 1B-scale figures and the dry run's kilobytes alike."""
    return "—" if gib is None else f"{gib:.4g}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def runs_table(records: list[dict]) -> Table:
    table = Table(
        "Every run (time: median over the steps after the first)",
        [
            "run",
            "status",
            "setting",
            "optimiser steps",
            "time per step / RL iteration (s)",
            "generate / score / update (s)",
            "peak memory per step, max (GiB)",
            "model-state floor (GiB)",
            "peak / floor",
            "wall time (s)",
        ],
    )
    for record in records:
        stages = record.get("rl_stage_seconds_median") or {}
        split = " / ".join(_number(stages.get(stage)) for stage in RL_STAGES) if stages else "—"
        table.rows.append(
            [
                record["run"],
                record["status"],
                record["setting"],
                str(record.get("optimizer_steps", "—")),
                _number(record.get("step_seconds_median")),
                split,
                _size(record.get("peak_gb")),
                _size(record.get("floor_gb")),
                _number(_ratio(record.get("peak_gb"), record.get("floor_gb"))),
                _number(record.get("wall_seconds"), 0),
            ]
        )
    return table


def dvpo_ppo_ratios(records: list[dict]) -> dict[str, dict[str, float | None]]:
    """DVPO / PPO peak memory, iteration time and model-state floor, per strategy both ran under."""
    by_run = {record["run"]: record for record in records if record["status"] == "ok"}
    ratios = {}
    for name, dvpo in by_run.items():
        if dvpo["stage"] != "dvpo" or (ppo := by_run.get(name.replace("dvpo/", "ppo/", 1))) is None:
            continue
        ratios[name.split("/", 1)[1]] = {
            key: _ratio(dvpo.get(key), ppo.get(key)) for key in ("peak_gb", "step_seconds_median", "floor_gb")
        }
    return ratios


def ratios_table(ratios: dict[str, dict[str, float | None]]) -> Table:
    table = Table(
        "DVPO / PPO at the same model size, batch and lengths",
        [
            "strategy",
            "memory ratio",
            f"target <= {MEMORY_TARGET}",
            "time ratio",
            f"target <= {TIME_TARGET}",
            "model-state floor ratio",
        ],
    )
    for variant, ratio in ratios.items():
        memory, seconds = ratio["peak_gb"], ratio["step_seconds_median"]
        table.rows.append(
            [
                variant,
                _number(memory),
                "—" if memory is None else verdict(memory, MEMORY_TARGET),
                _number(seconds),
                "—" if seconds is None else verdict(seconds, TIME_TARGET),
                _number(ratio["floor_gb"]),
            ]
        )
    return table


def dvpo_variants_table(records: list[dict]) -> Table:
    """Each DVPO run against dvpo/single: gradient checkpointing off, LoRA, FSDP1, FSDP2."""
    table = Table(
        "DVPO iteration under each setting, against dvpo/single",
        ["run", "setting", "peak memory ratio", "time ratio"],
    )
    by_run = {record["run"]: record for record in records if record["status"] == "ok"}
    single = by_run.get("dvpo/single")
    for name, record in by_run.items():
        if record["stage"] != "dvpo" or single is None or record is single:
            continue
        table.rows.append(
            [
                name,
                record["setting"],
                _number(_ratio(record.get("peak_gb"), single.get("peak_gb"))),
                _number(_ratio(record.get("step_seconds_median"), single.get("step_seconds_median"))),
            ]
        )
    return table


def unfinished(records: list[dict]) -> list[dict]:
    """Runs that failed or could not run (skipped ones, e.g. FSDP1 on a CPU, are not failures)."""
    return [record for record in records if record["status"] in ("failed", "not run")]


def make_report(records: list[dict], context: dict, notes: list[str]) -> Report:
    ratios = dvpo_ppo_ratios(records)
    problems = [
        f"**{record['run']} {record['status']}**: {record['error']}" for record in unfinished(records)
    ]
    problems += [
        f"{record['run']} started with {record['allocated_at_start_gb']:.2f} GiB still allocated by earlier runs "
        "(its peak includes them)"
        for record in records
        if (record.get("allocated_at_start_gb") or 0) > LEFTOVER_GIB
    ]
    skipped = [
        f"{record['run']} skipped: {record['error']}" for record in records if record["status"] == "skipped"
    ]
    raw = {
        **context,
        "runs": records,
        "dvpo_ppo_ratios": ratios,
        "failed": [r["run"] for r in unfinished(records)],
    }
    tables = [ratios_table(ratios), dvpo_variants_table(records), runs_table(records)]
    return Report("gpu", context["title"], tables, raw, problems + skipped + notes)
