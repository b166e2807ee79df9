"""`real_value`: the `value` benchmark's HH-RLHF question asked with a pretrained backbone (opt-in, issue 23 part 4).

    python -m benchmarks.run --only real_value --threads 2       # SmolLM2-135M-Instruct: ~1.5 h on 2 quiet cores
    python -m benchmarks.run --only real_value --fraction 0.05   # the plumbing at a few steps (reduced)
    python -m benchmarks.run --only real_value --quick           # a tiny random model: seconds, for tests

Every run is a `dvpo fit` of a `configs/real/` recipe (SmolLM2-135M-Instruct, LoRA, the chat template) with the
benchmark's data and budget as overrides. The HH-RLHF pairs are shuffled once (from the seed) into three disjoint
parts, the proxy-gold setup of Gao et al. 2022 (arXiv 2210.10760): the *runs'* pairs, on which the reward model and
the GVM are trained; the *judge's* pairs, on which a second reward model is trained that no run ever sees; and the
*held-out* pairs, never trained on.

- Part 1, value models: the reward model and the GVM at equal budgets from the instruct model, then PPO (its critic
  starts from the reward model and trains during PPO); their pairwise accuracy on the held-out pairs by mean value
  and by the complete response's value (`evaluation.pairwise_value_accuracy`), beside the v2 paper's accuracies and
  beside the random-initialisation numbers of the `value` report's HH-RLHF table.
- Part 2, policies: DVPO on the GVM (PPO is part 1's run, the same rollouts and steps) and the instruct model
  itself answer the held-out prompts; each answer is scored by the judge and by the runs' own reward model, with
  the KL to the instruct model and the win rate against it by the judge's scores (`evaluation.judge_policy`); and
  the GVM's token credit on a few DVPO answers as a picture (`real_value_token_credit.png`).

The full scale is sized for 2 quiet CPU cores (a SmolLM2 optimiser step with LoRA takes 10-15 s there), each part
within an hour; the report says what that reduces.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.peer import Skipped
from benchmarks.report import DEFAULT_OUTPUT, Report, Table
from benchmarks.timing import accelerator
from benchmarks.value import LABELS, fit_config, value_model_dir
from benchmarks.value_runs import HH_FILE, data_arguments
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.demo import StageRun
from dvpo_lightning.evaluation import (
    dvpo_token_credit,
    judge_policy,
    pairwise_value_accuracy,
    value_scorer,
    win_rate,
)
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.plots import token_heatmap
from dvpo_lightning.rl import SamplingConfig

NAME = "real_value"
REAL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "real"
INSTRUCT = "packaged:smollm2-135m-instruct"
VALUE_MODELS = ("rm", "gvm", "ppo_critic", "judge")
#: DVPO v2 (docs/algorithms.md): value accuracy of the GVM and of PPO's critic, Llama-3-8B
PAPER = {"gvm": "0.681 / 0.633", "ppo_critic": "0.606 / 0.575"}
# A 2-layer Llama for --quick: the plumbing in seconds, with a BPE tokenizer trained on the runs' pairs.
QUICK_ARCH = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@dataclass(frozen=True)
class RealScale:
    """The real benchmark's budget. RM and GVM take `value_steps` optimiser steps of `batch_size` pairs, the judge
    `judge_steps` (more pairs: a judge stronger than the runs' reward model, as the proxy-gold setup wants); PPO and
    DVPO `rl_iterations` rollouts of `rollout_size` prompts (one epoch, mini-batches of 4)."""

    name: str
    value_steps: int
    judge_steps: int
    rl_iterations: int
    held_out_pairs: int  # value accuracy
    held_out_prompts: int  # the policies' answers (the first held-out pairs' prompts)
    max_prompt_length: int = 128  # the recipes' own lengths
    max_response_length: int = 64
    new_tokens: int = 32
    batch_size: int = 4
    rollout_size: int = 8
    rows: int | None = None  # HH-RLHF rows read (None: all 2,312)

    def reduced(self, fraction: float) -> RealScale:
        """Every step count and held-out set times `fraction` (at least 1 step, 4 pairs, 4 prompts)."""
        return replace(
            self,
            name=f"reduced: {fraction:g} of every step count and held-out set",
            value_steps=max(1, round(self.value_steps * fraction)),
            judge_steps=max(1, round(self.judge_steps * fraction)),
            rl_iterations=max(1, round(self.rl_iterations * fraction)),
            held_out_pairs=max(4, round(self.held_out_pairs * fraction)),
            held_out_prompts=max(4, round(self.held_out_prompts * fraction)),
        )


FULL = RealScale(
    "full", value_steps=50, judge_steps=100, rl_iterations=12, held_out_pairs=200, held_out_prompts=64
)
QUICK = RealScale(
    "quick (a tiny random model, not SmolLM2)",
    value_steps=2,
    judge_steps=2,
    rl_iterations=1,
    held_out_pairs=8,
    held_out_prompts=3,  # fewer than a rollout's prompts
    max_prompt_length=48,
    max_response_length=16,
    new_tokens=8,
    rollout_size=4,
    rows=120,
)
MINI_BATCH = 4  # the recipes' PPO mini-batch


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts of the HH-RLHF pairs, as HH-format JSON-lines files."""

    runs: Path
    judge: Path
    held_out: Path


#: part 1's runs on the runs' pairs: (name, configs/real/<config>.yaml, model option -> base model or run)
VALUE_RUNS = (
    ("rm", "rm", {"model": "base"}),
    ("gvm", "gvm", {"model": "base"}),
    ("ppo", "ppo", {"policy": "base", "reward_model": "rm", "critic": "rm"}),
)


def run(
    quick: bool,
    device: torch.device,
    output: Path,
    seeds: list[int] | None = None,
    fraction: float | None = None,
) -> Report:
    if not HH_FILE.exists():
        raise Skipped(f"no HH-RLHF data at {HH_FILE}")
    scale = QUICK if quick else (FULL if fraction is None else FULL.reduced(fraction))
    seed = (seeds or [0])[0]
    root = output / "runs" / NAME / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)  # every run starts from nothing
    splits = write_splits(root / "data", scale, seed)
    base = str(quick_base_model(root / "base" / "model", splits)) if quick else INSTRUCT
    setting = Setting(root, scale, seed, device, splits, base)

    start = time.perf_counter()
    stages = {name: setting.fit(name, config, splits.runs, inputs) for name, config, inputs in VALUE_RUNS}
    pairs = setting.held_out("pairs", scale.held_out_pairs)
    values = {name: setting.accuracy(name, pairs) for name in ("rm", "gvm", "ppo_critic")}
    part1 = time.perf_counter() - start

    start = time.perf_counter()
    stages["judge"] = setting.fit("judge", "rm", splits.judge, {"model": "base"})
    stages["dvpo"] = setting.fit("dvpo", "dvpo", splits.runs, {"policy": "base", "value_model": "gvm"})
    values["judge"] = setting.accuracy("judge", pairs)
    prompts = setting.held_out("prompts", scale.held_out_prompts)
    sampling = SamplingConfig(max_new_tokens=scale.new_tokens)
    judges = {name: value_scorer(setting.model(name), prompts, device) for name in ("judge", "rm")}
    reports = {
        name: judge_policy(setting.model(name), base, prompts, sampling, judges, seed=seed, device=device)
        for name in ("base", "ppo", "dvpo")
    }
    policies = {
        name: {
            **report.summary(),
            "win_rate_vs_instruct": win_rate(report.per_prompt["judge"], reports["base"].per_prompt["judge"]),
        }
        for name, report in reports.items()
    }
    credit = dvpo_token_credit(
        setting.model("dvpo"), setting.model("gvm"), base, prompts, sampling, count=3, seed=seed
    )
    figure = token_heatmap(
        [
            {
                **row,
                "prompt": "..." + " ".join(row["prompt"].split())[-110:],
                # byte-level BPE marks a leading space and a newline with these
                "tokens": [token.replace("\u0120", " ").replace("\u010a", "\\n") for token in row["tokens"]],
            }
            for row in credit
        ],
        output / f"{NAME}_token_credit.png",
        quantities=("value", "advantage"),
        title="DVPO's answers to held-out HH-RLHF prompts: GVM value V(s_t) and advantage per token",
    )
    part2 = time.perf_counter() - start

    raw = {
        "scale": asdict(scale),
        "seed": seed,
        "base": base,
        "values": values,
        "policies": policies,
        "stages": {
            name: {"seconds": stage.seconds, "peak_gb": stage.peak_gb} for name, stage in stages.items()
        },
        "part_seconds": {"value models": part1, "policies": part2},
    }
    return make_report(raw, scale, figure)


# ---------------------------------------------------------------------------------------------------- data
def write_splits(directory: Path, scale: RealScale, seed: int) -> Splits:
    """Shuffle the HH-RLHF rows from `seed`: the first `held_out_pairs` are held out, the rest shared equally by
    the runs and the judge (disjoint: the judge's pairs are never seen by a run)."""
    with gzip.open(HH_FILE, "rt") as lines:
        rows = [line for line in lines if line.strip()][: scale.rows]
    random.Random(seed).shuffle(rows)
    held_out, rest = rows[: scale.held_out_pairs], rows[scale.held_out_pairs :]
    parts = {"runs": rest[: len(rest) // 2], "judge": rest[len(rest) // 2 :], "held_out": held_out}
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in parts.items():
        (directory / f"{name}.jsonl").write_text("".join(line.rstrip("\n") + "\n" for line in part))
    return Splits(*(directory / f"{name}.jsonl" for name in parts))


def quick_base_model(directory: Path, splits: Splits) -> Path:
    """--quick's starting model: a tiny random Llama with a BPE tokenizer trained on the runs' pairs."""
    data = RLHFDataModule(str(splits.runs), tokenizer="bpe:320", format="hh_chat", mode="pairs", val_size=0)
    model = build_policy(ModelSpec(arch=QUICK_ARCH), data.tokenizer, role="policy")
    return Path(export_model(model, data.tokenizer, str(directory)))


# ---------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Setting:
    """What every run and evaluation of one benchmark run shares."""

    root: Path  # the seed's runs: <root>/<run>/model
    scale: RealScale
    seed: int
    device: torch.device
    splits: Splits
    base: str  # the starting model: SmolLM2-135M-Instruct, or --quick's tiny model

    def model(self, run: str) -> str:
        """The model of `run` ("base": the starting model; "ppo_critic": PPO's critic)."""
        return self.base if run == "base" else str(value_model_dir(self.root, run))

    def fit(self, name: str, config: str, data: Path, inputs: dict[str, str]) -> StageRun:
        """`dvpo fit --config configs/real/<config>.yaml` on `data` at the scale's budget; `inputs` maps a model
        option to the run whose model it loads."""
        print(f"[{NAME}] {name}")
        scale, on_policy = self.scale, config in ("ppo", "dvpo")
        if on_policy:
            steps = scale.rl_iterations * scale.rollout_size // MINI_BATCH
        else:
            steps = scale.judge_steps if name == "judge" else scale.value_steps
        options = {
            "dataset": data,
            "val_split": self.splits.held_out,  # never validated on during training (limit_val_batches=0)
            "tokenizer": self.base,
            "max_prompt_length": scale.max_prompt_length,
            "max_response_length": scale.max_response_length,
            "batch_size": scale.rollout_size if on_policy else scale.batch_size,
        }
        sampling = (
            f"--model.init_args.sampling.max_new_tokens={scale.new_tokens}",
            "--model.init_args.eval_sampling=null",
        )
        overrides = [
            *data_arguments(options),
            *(f"--model.init_args.{option}.name_or_path={self.model(run)}" for option, run in inputs.items()),
            *(sampling if on_policy else ()),
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            f"--trainer.max_steps={steps}",
            f"--seed_everything={self.seed}",
            f"--trainer.default_root_dir={self.root / name}",
            f"--trainer.accelerator={accelerator(self.device)}",
            "--trainer.devices=1",
        ]
        return fit_config(name, REAL_CONFIGS / f"{config}.yaml", overrides, self.root)

    def held_out(self, mode: str, count: int) -> RLHFDataModule:
        """The first `count` held-out pairs (or their prompts) as the validation split of a data module."""
        data = RLHFDataModule(
            str(self.splits.runs),
            tokenizer=self.base,
            format="hh_chat",
            mode=mode,
            val_split=str(self.splits.held_out),
            max_samples=count,  # of every source: the held-out file's first rows
            max_prompt_length=self.scale.max_prompt_length,
            max_response_length=self.scale.max_response_length,
            batch_size=1,  # its training split is read only in part: a rollout's worth of prompts need not fit
            eval_batch_size=self.scale.rollout_size,
        )
        data.setup("validate")
        return data

    def accuracy(self, run: str, pairs: RLHFDataModule) -> dict:
        """Pairwise accuracy of `run`'s value model on the held-out `pairs`."""
        scorer = value_scorer(self.model(run), pairs, self.device)
        return asdict(pairwise_value_accuracy(scorer, pairs, self.device))


# -------------------------------------------------------------------------------------------------- report
def random_init_accuracy() -> dict[str, tuple[float, float]]:
    """The `value` report's HH-RLHF accuracies (random initialisation, BPE tokenizer): model -> (mean value,
    complete response), means over its seeds; empty where that report has not been written."""
    path = DEFAULT_OUTPUT / "value.json"
    if not path.exists():
        return {}
    hh = json.loads(path.read_text())["results"].get("hh", {})
    names = set.intersection(*(set(result) for result in hh.values())) if hh else set()
    return {
        name: tuple(
            statistics.fmean(result[name][key] for result in hh.values())
            for key in ("mean_value", "final_value")
        )
        for name in names
    }


def make_report(raw: dict, scale: RealScale, figure: Path) -> Report:
    values, policies = raw["values"], raw["policies"]
    random_init = random_init_accuracy()
    labels = {**LABELS, "judge": "Judge reward model (its own disjoint pairs)"}
    accuracy = Table(
        f"HH-RLHF from {raw['base']}: value accuracy on held-out pairs, equal budgets",
        [
            "value model",
            "pairwise accuracy (mean value)",
            "pairwise accuracy (complete response)",
            "pairs",
            "random init, value report (mean value / complete response)",
            "DVPO v2 paper, Llama-3-8B (UltraFeedback held-out / HH-RLHF out of distribution)",
        ],
    )
    for name in VALUE_MODELS:
        result = values[name]
        before = random_init.get(name)
        accuracy.rows.append(
            [
                labels[name],
                f"{result['mean_value']:.3f}",
                f"{result['final_value']:.3f}",
                str(result["pairs"]),
                f"{before[0]:.3f} / {before[1]:.3f}" if before else "-",
                PAPER.get(name, "-"),
            ]
        )
    judged = Table(
        "Policies from the instruct model on held-out HH-RLHF prompts, judged by a reward model trained on pairs no "
        "run saw",
        [
            "policy",
            "judge's reward",
            "runs' reward model",
            "win rate vs instruct (judge)",
            "KL to instruct (nats)",
            "response length",
        ],
    )
    for name, label in (("base", "the starting model (instruct)"), ("ppo", "PPO"), ("dvpo", "DVPO")):
        policy = policies[name]
        judged.rows.append(
            [
                label,
                f"{policy['judge_reward']:+.3f}",
                f"{policy['rm_reward']:+.3f}",
                f"{policy['win_rate_vs_instruct']:.3f}",
                f"{policy['kl_ref']:.3f}",
                f"{policy['response_length']:.1f}",
            ]
        )
    budget = Table(
        "Time per part and stage (each part's budget: 60 minutes on 2 quiet CPU cores)",
        ["part or stage", "seconds", "peak memory (GiB)", "verdict"],
    )
    for part, seconds in raw["part_seconds"].items():
        # the budget is the full scale's: a reduced or quick run shows its time but judges nothing
        within = (
            ("met" if seconds <= 3600 else "missed") if scale is FULL else "not judged (not the full scale)"
        )
        budget.rows.append([f"part: {part}", f"{seconds:.0f}", "-", within])
    for name, stage in raw["stages"].items():
        peak = stage["peak_gb"]
        budget.rows.append([name, f"{stage['seconds']:.0f}", "-" if peak is None else f"{peak:.2f}", "-"])
    notes = [
        f"Scale: {scale.name}; seed {raw['seed']}. RM and GVM: {scale.value_steps} optimiser steps of "
        f"{scale.batch_size} pairs each from the same start (the judge: {scale.judge_steps}); PPO and DVPO: {scale.rl_iterations} rollouts of "
        f"{scale.rollout_size} prompts, {scale.new_tokens} new tokens, one epoch in mini-batches of {MINI_BATCH}; "
        f"prompts of at most {scale.max_prompt_length} tokens (their end kept), answers of {scale.max_response_length}. "
        "PPO's critic starts from the reward model and trains during PPO.",
        "Reduced against the paper (and against the recipes' own 200 steps) so that each part fits an hour on 2 CPU "
        f"cores: a 135M model instead of Llama-3-8B, LoRA r=16, {scale.value_steps * scale.batch_size} training pairs "
        f"per value model, {scale.held_out_pairs} held-out pairs, {scale.held_out_prompts} held-out prompts, one seed.",
        "Splits (proxy-gold, arXiv 2210.10760): the HH-RLHF rows shuffled from the seed; the held-out pairs first, the "
        "rest halved between the runs (RM, GVM, PPO and DVPO prompts) and the judge; no run sees the judge's pairs.",
        "The paper's numbers are value accuracy (mean value) of an 8B GVM and PPO critic; the random-initialisation "
        "column is the `value` report's HH-RLHF table (a BPE tokenizer of 1,024 tokens, different held-out pairs).",
        "Policies: one sampled answer (temperature 1) per held-out prompt, the same seed for every policy; a reward "
        "is a reward model's value of the complete answer; the win rate counts ties half.",
    ]
    title = f"{NAME}: the DVPO question with a pretrained backbone (SmolLM2-135M-Instruct on HH-RLHF)"
    if scale.name != "full":
        title += f" ({scale.name})"
    return Report(NAME, title, [accuracy, judged, budget], raw, notes, [figure])
