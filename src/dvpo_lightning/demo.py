"""`make demo`: the main job on the built-in task — SFT, then the Global Value Model, then DVPO — on CPU.

Runs `configs/sft.yaml`, `configs/gvm.yaml` and `configs/dvpo.yaml` through the `dvpo` CLI (exactly what a user
would type), evaluates the SFT and DVPO policies on the same held-out prompts with the same sampling and seed,
prints a table (gold reward and its fraction of the optimum, KL to the reference, peak memory, wall time) and
writes it with learning curves and a token-level heatmap of GVM values and DVPO advantages to `--output`.

    python -m dvpo_lightning.demo [--output outputs/demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import transformers
from lightning.pytorch import LightningModule

from dvpo_lightning.callbacks import PeakMemoryMonitor
from dvpo_lightning.cli import run_cli
from dvpo_lightning.evaluation import (
    PolicyReport,
    dvpo_token_credit,
    evaluate_policy,
    evaluation_data,
    win_rate,
)
from dvpo_lightning.plots import learning_curves, token_heatmap
from dvpo_lightning.rl import SamplingConfig

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGES = ("sft", "gvm", "dvpo")
# Toy budgets that exercise every step of the pipeline in seconds (tests use them).
QUICK_OVERRIDES = [
    "--trainer.max_steps=4",
    "--trainer.val_check_interval=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.builtin_size=200",
    "--data.init_args.val_size=20",
]


@dataclass
class StageRun:
    name: str
    export_dir: Path
    metrics_csv: Path
    seconds: float
    peak_gb: float | None  # the stage's peak: resident memory on CPU, allocated memory on CUDA
    peak_above_start_gb: float | None  # the same above the stage's start (models loaded)
    held_out: dict  # the data module's settings that define its held-out split (dataset, seed, sizes)
    model: LightningModule  # the fitted module (its trained models, e.g. PPO's critic, beside the export)

    @classmethod
    def run(cls, name: str, config: Path, overrides: list[str]) -> StageRun:
        start = time.perf_counter()
        # The demo reruns the whole pipeline: each stage starts over in its directory.
        cli = run_cli(["fit", "--config", str(config), "--overwrite=true", *overrides])
        seconds = time.perf_counter() - start
        monitor = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PeakMemoryMonitor))
        overall = monitor.summary.get("overall", {})
        above = overall.get("peak_rss_above_baseline_gb")
        if above is not None:  # CPU: the process's resident memory
            peak = monitor.summary["baseline_rss_gb"] + above
        else:  # CUDA: the allocator's peak, which resets per stage
            peak = above = overall.get("max_memory_allocated_gb")
        data = cli.datamodule
        held_out = {key: getattr(data, key) for key in ("dataset", "seed", "builtin_size", "val_size")}
        metrics = Path(cli.trainer.log_dir) / "metrics.csv"
        return cls(
            name, Path(cli.model.default_export_dir()), metrics, seconds, peak, above, held_out, cli.model
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", type=Path, default=REPO_CONFIGS, help="directory holding sft/gvm/dvpo.yaml"
    )
    parser.add_argument("--output", type=Path, default=Path("outputs/demo"), help="where the report goes")
    parser.add_argument("--quick", action="store_true", help="toy budgets (seconds), for tests")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # tiny models load instantly: the bars are noise here

    overrides = QUICK_OVERRIDES if args.quick else []
    runs = {name: StageRun.run(name, args.configs / f"{name}.yaml", overrides) for name in STAGES}
    sft_dir, gvm_dir, dvpo_dir = (str(runs[name].export_dir) for name in STAGES)

    # The held-out prompts of the SFT stage's own data split.
    data = evaluation_data(tokenizer=sft_dir, batch_size=100, **runs["sft"].held_out)
    sampling = SamplingConfig(max_new_tokens=data.max_response_length)
    reports = {
        "SFT": evaluate_policy(sft_dir, sft_dir, data, sampling),
        "DVPO": evaluate_policy(dvpo_dir, sft_dir, data, sampling),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    table = results_table(reports, runs)
    (args.output / "results.md").write_text(table + "\n")
    figures = [
        learning_curves(
            [
                ("SFT", runs["sft"].metrics_csv, ["train/loss", "val/gold_reward"]),
                (
                    "GVM",
                    runs["gvm"].metrics_csv,
                    ["train/loss", "val/accuracy_mean_value", "val/score_pearson"],
                ),
                ("DVPO", runs["dvpo"].metrics_csv, ["rollout/gold_reward", "rollout/reward", "kl/k1"]),
            ],
            args.output / "learning_curves.png",
        ),
        token_heatmap(
            dvpo_token_credit(dvpo_dir, gvm_dir, sft_dir, data, sampling),
            args.output / "token_credit.png",
            title="DVPO responses: gold reward, GVM value V(s_t) and advantage per token",
        ),
    ]
    summary = {
        "policies": {name: report.summary() for name, report in reports.items()},
        "stages": {
            name: {
                "seconds": run.seconds,
                "peak_gb": run.peak_gb,
                "peak_above_start_gb": run.peak_above_start_gb,
            }
            for name, run in runs.items()
        },
        "figures": [str(path) for path in figures],
    }
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + table)
    print(f"\nResults, learning curves and the token-level heatmap: {args.output.resolve()}")
    return summary


def results_table(reports: dict[str, PolicyReport], runs: dict[str, StageRun]) -> str:
    """The demo's markdown table: one row per policy, then the cost of each stage."""
    lines = [
        "| policy | gold reward | fraction of optimum | KL to SFT (nats) | win rate vs SFT | response length | "
        "finished |",
        "|---|---|---|---|---|---|---|",
    ]
    baseline = reports["SFT"].per_prompt_gold
    for name, report in reports.items():
        wins = "—" if name == "SFT" else f"{win_rate(report.per_prompt_gold, baseline):.3f}"
        lines.append(
            f"| {name} | {report.gold_reward:.3f} ± {report.gold_reward_std:.3f} | {report.gold_fraction:.1%} | "
            f"{report.kl_ref:.3f} | {wins} | {report.response_length:.1f} | {report.finished_rate:.0%} |"
        )
    lines += [
        "",
        "| stage | wall time (s) | peak memory (GiB) | of which above the stage's start |",
        "|---|---|---|---|",
    ]
    for run in runs.values():
        peak, above = (
            "n/a" if value is None else f"{value:.3f}" for value in (run.peak_gb, run.peak_above_start_gb)
        )
        lines.append(f"| {run.name} | {run.seconds:.0f} | {peak} | {above} |")
    lines.append(
        "\nPeak memory is the process's resident set on CPU (every stage runs in this one process, so later stages "
        "reuse memory earlier ones grew) and the allocator's peak on CUDA."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
