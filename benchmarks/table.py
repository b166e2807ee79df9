"""`table`: the paper's comparison in miniature — SFT, the offline DPO, SimPO, ORPO and KTO, PPO, DVPO, RTO, the critic-free
estimators (GRPO, RLOO, REINFORCE++, GVM-scored GRPO), GRPO's policy-loss variants (GSPO, CISPO, DAPO) and PPO with a
GVM-initialised critic on the built-in task, several seeds.

Per seed, every stage runs through the `dvpo` CLI from its config in `configs/` (what a user would type), with
`--seed_everything <seed>`, its own `--trainer.default_root_dir <output>/runs/seed<seed>/<stage>` and every path
it reads pointed at that seed's exports: sft, then rm, gvm, dpo, simpo, orpo and kto (from the SFT export), then ppo, grpo, rloo,
reinforce_pp, gspo, cispo and dapo (SFT + RM), dvpo and gvm_grpo (SFT + GVM), ppo_gvm_critic (SFT + RM + GVM) and rto (SFT + RM + DPO). The SFT model's random initialisation also takes the seed
(`init_seed`), so seeds vary the whole pipeline, not only the RL sampling.

Budgets are the configs' own (a user's `dvpo fit --config configs/<stage>.yaml`): PPO, DVPO and RTO share one
optimiser-step budget, rollout batch, PPO epochs, mini-batch and KL target, so their gold rewards compare at
equal KL; the report states them. The quick run overrides every stage with toy budgets.

Every final policy is then judged the same way (`evaluation.evaluate_policy`): one sampled answer per held-out
prompt (the validation split of the task, the same prompts, sampling and seed for every policy), scored by the
gold reward; KL to the seed's SFT policy on the policy's own samples; win rate against the SFT policy's answers
to the same prompts (`evaluation.win_rate`, ties count half).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from benchmarks.report import Report, Table, mark_merged, mean_std, merged_seeds, read_parts
from benchmarks.timing import accelerator
from dvpo_lightning.demo import StageRun
from dvpo_lightning.evaluation import evaluate_policy, evaluation_data, win_rate
from dvpo_lightning.plots import reward_vs_kl
from dvpo_lightning.rl import SamplingConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ON_POLICY = (
    "ppo",
    "dvpo",
    "rto",
    "grpo",
    "rloo",
    "reinforce_pp",
    "gvm_grpo",
    "ppo_gvm_critic",
    "gspo",
    "cispo",
    "dapo",
)
OFFLINE = ("dpo", "simpo", "orpo", "kto")
STAGES = ("sft", "rm", "gvm", *OFFLINE, *ON_POLICY)
POLICIES = ("sft", *OFFLINE, *ON_POLICY)
#: how a stage is named in the report; the others upper-cased
LABELS = {
    "simpo": "SimPO",
    "reinforce_pp": "REINFORCE++",
    "gvm_grpo": "GVM-GRPO",
    "ppo_gvm_critic": "PPO (GVM critic)",
}
#: what an offline stage's batch holds, when not pairs (KTO: labelled responses, two per pair of pair data)
BATCH_UNITS = {"kto": "labelled responses"}
# For each stage, the model arguments that load an earlier stage's export, and which stage that is.
INPUTS = {
    "sft": {},
    "rm": {"model": "sft"},
    "gvm": {"model": "sft"},
    "dpo": {"policy": "sft"},
    "simpo": {"policy": "sft"},
    "orpo": {"policy": "sft"},
    "kto": {"policy": "sft"},
    "ppo": {"policy": "sft", "reward_model": "rm"},
    "dvpo": {"policy": "sft", "value_model": "gvm"},
    "rto": {"policy": "sft", "reward_model": "rm", "dpo_model": "dpo"},
    "grpo": {"policy": "sft", "reward_model": "rm"},
    "rloo": {"policy": "sft", "reward_model": "rm"},
    "reinforce_pp": {"policy": "sft", "reward_model": "rm"},
    "gvm_grpo": {"policy": "sft", "value_model": "gvm"},
    "ppo_gvm_critic": {"policy": "sft", "reward_model": "rm", "critic": "gvm"},
    "gspo": {"policy": "sft", "reward_model": "rm"},
    "cispo": {"policy": "sft", "reward_model": "rm"},
    "dapo": {"policy": "sft", "reward_model": "rm"},
}


def label(name: str) -> str:
    return LABELS.get(name, name.upper())


def stages_in(configs: Path) -> tuple[str, ...]:
    """The stages whose config `configs` holds (`configs/hard` holds the value-model comparison only); refuses a
    directory without SFT or DVPO, or a stage without the config of a stage it loads."""
    present = tuple(stage for stage in STAGES if (configs / f"{stage}.yaml").exists())
    missing = sorted({"sft", "dvpo"} - set(present)) + sorted(
        f"{upstream} (for {stage})"
        for stage in present
        for upstream in INPUTS[stage].values()
        if upstream not in present
    )
    if missing:
        raise ValueError(
            f"--configs {configs} lacks the config of {', '.join(missing)}, which the table needs"
        )
    return present


def dataset_of(configs: Path) -> str:
    return yaml.safe_load((configs / "sft.yaml").read_text())["data"]["init_args"]["dataset"]


def report_name(configs: Path, benchmark: str = "table") -> str:
    """`<benchmark>`, or `<benchmark>_<setting>` for another configs directory (`table_hard`), so that the report
    of one setting never overwrites another's."""
    return benchmark if configs.resolve() == CONFIGS.resolve() else f"{benchmark}_{configs.name}"


@dataclass(frozen=True)
class Budget:
    seeds: tuple[int, ...]
    overrides: tuple[str, ...] = ()  # given to every stage (none: the configs' budgets)
    on_policy_overrides: tuple[str, ...] = ()  # given to PPO, DVPO and RTO besides

    def stage_overrides(self, stage: str) -> list[str]:
        return [*self.overrides, *(self.on_policy_overrides if stage in ON_POLICY else ())]


FULL = Budget(seeds=(0, 1, 2), overrides=("--trainer.enable_progress_bar=false",))
QUICK = Budget(
    seeds=(0,),
    overrides=(
        "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--data.init_args.builtin_size=200",
        "--data.init_args.val_size=20",
        "--data.init_args.batch_size=8",
    ),
    on_policy_overrides=("--model.init_args.ppo.ppo_epochs=1", "--model.init_args.ppo.mini_batch_size=8"),
)


def budget_note(budget: Budget, configs: Path, stages: tuple[str, ...]) -> str:
    """The policy stages' budgets, as their configs set them (the configs give PPO, DVPO and RTO equal ones)."""
    offline_stages = tuple(stage for stage in OFFLINE if stage in stages)
    on_policy_stages = tuple(stage for stage in ON_POLICY if stage in stages)
    config = {
        stage: yaml.safe_load((configs / f"{stage}.yaml").read_text())
        for stage in (*offline_stages, *on_policy_stages)
    }
    offline = {
        stage: (
            config[stage]["trainer"]["max_steps"],
            config[stage]["data"]["init_args"]["batch_size"],
            BATCH_UNITS.get(stage, "pairs"),
        )
        for stage in offline_stages
    }
    groups: dict[tuple, list[str]] = {}  # stages with the same budget share one phrase
    for stage, settings in offline.items():
        groups.setdefault(settings, []).append(label(stage))
    offline_note = "; ".join(
        f"{names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]} {steps} optimiser steps "
        f"of {batch} {unit}{' each' if len(names) > 1 else ''}"
        for (steps, batch, unit), names in groups.items()
    )
    on_policy = {}
    for stage in on_policy_stages:
        ppo = config[stage]["model"]["init_args"]["ppo"]
        responses = config[stage]["data"]["init_args"]["batch_size"] * ppo.get("samples_per_prompt", 1)
        on_policy[stage] = (
            config[stage]["trainer"]["max_steps"],
            responses,
            ppo["ppo_epochs"],
            ppo["mini_batch_size"],
            ppo.get("kl_target"),
        )
    steps, batch, epochs, mini_batch, kl_target = on_policy["dvpo"]
    unequal = [label(stage) for stage, settings in on_policy.items() if settings != on_policy["dvpo"]]
    rollouts = steps // (epochs * -(-batch // mini_batch))
    note = (
        f"Budgets, from the configs: {offline_note}; every on-policy algorithm {steps} optimiser steps ({rollouts} "
        f"rollouts of {batch} responses{grouped_note(on_policy_stages)}, "
        f"{epochs} PPO epochs, mini-batch {mini_batch}), the KL coefficient steered to {kl_target} nats per response; "
        "SFT, RM and GVM as in their configs. Seeds: `--seed_everything` and the SFT model's `init_seed`."
    )
    if unequal:
        note += f" Unequal on-policy budgets in the configs of {', '.join(unequal)}."
    if budget is QUICK:
        note += f" Quick run, toy budgets: {' '.join(budget.stage_overrides('dvpo'))}."
    return note


def grouped_note(stages: tuple[str, ...]) -> str:
    grouped = [
        label(stage) for stage in ("grpo", "rloo", "gvm_grpo", "gspo", "cispo", "dapo") if stage in stages
    ]
    if not grouped:
        return ""
    names = grouped[0] if len(grouped) == 1 else f"{', '.join(grouped[:-1])} and {grouped[-1]}"
    return f" -- {names}: 4 to each of a quarter as many prompts --"


def run(
    quick: bool,
    device: torch.device,
    output: Path,
    seeds: list[int] | None = None,
    configs: Path = CONFIGS,
) -> Report:
    stages = stages_in(configs)
    budget = QUICK if quick else FULL
    name = report_name(configs)
    runs = {}
    for seed in seeds if seeds is not None else budget.seeds:
        root = output / "runs" / name / f"seed{seed}"
        shutil.rmtree(root, ignore_errors=True)  # scratch of an earlier run: every run starts from nothing
        runs[seed] = run_seed(seed, root, budget, device, configs, stages)
    return make_report(runs, budget, reward_vs_kl_figure(runs, stages, output, name), configs, stages)


def merge(directories: list[Path], output: Path, configs: Path = CONFIGS) -> Report:
    """One report from the table runs written to `directories` (e.g. one seed each, run in parallel processes), all
    at one budget and from one configs directory; the figure is drawn again in `output`."""
    name = report_name(configs)
    records = read_parts(directories, name)
    parts = [record["results"] for record in records]
    overrides = {tuple(part["budget"]["overrides"]) for part in parts}
    if len(overrides) != 1:
        raise ValueError(
            "--merge: the runs have different budgets (one is a --quick run); merge runs of one budget"
        )
    budget = next(known for known in (FULL, QUICK) if tuple(known.stage_overrides("dvpo")) in overrides)
    runs = merged_seeds(parts, "seeds")
    stages = stages_in(configs)
    report = make_report(runs, budget, reward_vs_kl_figure(runs, stages, output, name), configs, stages)
    return mark_merged(report, records)


def reward_vs_kl_figure(runs: dict[int, dict], stages: tuple[str, ...], output: Path, name: str) -> Path:
    return reward_vs_kl(
        {
            label(stage): [
                (seed_run[stage]["kl_ref"], seed_run[stage]["gold_reward"]) for seed_run in runs.values()
            ]
            for stage in policies_of(stages)
        },
        output / f"{name}_reward_vs_kl.png",
    )


def policies_of(stages: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(stage for stage in POLICIES if stage in stages)


def stage_arguments(stage: str, seed: int, root: Path, budget: Budget, device: torch.device) -> list[str]:
    """The CLI overrides of `stage` for `seed`: budgets, device, and the paths of this seed's exports."""
    arguments = [
        *budget.stage_overrides(stage),
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={root / stage}",
        f"--trainer.accelerator={accelerator(device)}",
        "--trainer.devices=1",
    ]
    if stage == "sft":
        arguments.append(f"--model.init_args.policy.init_seed={seed}")
    else:
        arguments.append(f"--data.init_args.tokenizer={export_dir(root, 'sft')}")
    for argument, upstream in INPUTS[stage].items():
        arguments.append(f"--model.init_args.{argument}.name_or_path={export_dir(root, upstream)}")
    return arguments


def export_dir(root: Path, stage: str) -> Path:
    return root / stage / "model"


def run_seed(
    seed: int,
    root: Path,
    budget: Budget,
    device: torch.device,
    configs: Path = CONFIGS,
    stages: tuple[str, ...] = STAGES,
) -> dict[str, dict]:
    """Train every stage for `seed`, then evaluate every policy; returns per stage its cost and evaluation."""
    results, held_out = {}, {}
    for stage in stages:
        print(f"[table] seed {seed}: {stage}")
        stage_run = StageRun.run(
            stage, configs / f"{stage}.yaml", stage_arguments(stage, seed, root, budget, device)
        )
        results[stage] = {"seconds": stage_run.seconds, "peak_gb": stage_run.peak_gb}
        held_out[stage] = stage_run.held_out
    sft_dir = str(export_dir(root, "sft"))
    # The held-out prompts of the SFT stage's own data split (the same split every stage holds out).
    data = evaluation_data(tokenizer=sft_dir, batch_size=64, **held_out["sft"])
    sampling = SamplingConfig(max_new_tokens=data.max_response_length)
    reports = {
        name: evaluate_policy(str(export_dir(root, name)), sft_dir, data, sampling, device=device)
        for name in policies_of(stages)
    }
    for name, report in reports.items():
        results[name].update(report.summary())
        results[name]["win_rate_vs_sft"] = win_rate(report.per_prompt_gold, reports["sft"].per_prompt_gold)
        results[name]["prompts"] = len(report.per_prompt_gold)
    return results


def make_report(
    runs: dict[int, dict[str, dict]],
    budget: Budget,
    figure: Path,
    configs: Path = CONFIGS,
    stages: tuple[str, ...] = STAGES,
) -> Report:
    def column(stage: str, key: str) -> list[float]:
        return [seed_run[stage][key] for seed_run in runs.values()]

    def gains(stage: str) -> list[float]:
        """Gold reward minus the same seed's SFT gold reward: the seeds' SFT differences cancel."""
        return [seed_run[stage]["gold_reward"] - seed_run["sft"]["gold_reward"] for seed_run in runs.values()]

    def memory(stage: str) -> str:
        peaks = column(stage, "peak_gb")
        return "n/a" if None in peaks else mean_std(peaks)

    seeds = list(runs)
    policies = Table(
        f"Held-out gold reward and cost, mean ± std over seeds {seeds}",
        [
            "algorithm",
            "gold reward",
            "gain over SFT",
            "fraction of optimum",
            "win rate vs SFT",
            "KL to SFT (nats)",
            "stage wall time (s)",
            "stage peak memory (GiB)",
        ],
    )
    for name in policies_of(stages):
        policies.rows.append(
            [
                label(name),
                mean_std(column(name, "gold_reward")),
                "—" if name == "sft" else mean_std(gains(name)),
                mean_std(column(name, "gold_fraction")),
                "—" if name == "sft" else mean_std(column(name, "win_rate_vs_sft")),
                mean_std(column(name, "kl_ref")),
                mean_std(column(name, "seconds"), digits=0),
                memory(name),
            ]
        )
    costs = Table(
        "Every stage's cost (mean ± std over seeds)",
        ["stage", "wall time (s)", "peak memory (GiB)"],
        [[name, mean_std(column(name, "seconds"), digits=0), memory(name)] for name in stages],
    )
    per_seed = Table(
        "Per seed",
        ["seed", "algorithm", "gold reward", "fraction of optimum", "win rate vs SFT", "KL to SFT (nats)"],
    )
    for seed, seed_run in runs.items():
        for name in policies_of(stages):
            result = seed_run[name]
            per_seed.rows.append(
                [
                    str(seed),
                    label(name),
                    f"{result['gold_reward']:.3f}",
                    f"{result['gold_fraction']:.3f}",
                    f"{result['win_rate_vs_sft']:.3f}",
                    f"{result['kl_ref']:.3f}",
                ]
            )
    prompts = next(iter(runs.values()))["sft"]["prompts"]
    notes = [
        budget_note(budget, configs, stages),
        f"Evaluation: {prompts} held-out prompts, one sampled answer each (temperature 1, the same sampling seed "
        "for every policy); gold reward of the built-in task; KL = summed k1 estimate on the policy's own samples "
        "against the seed's SFT policy; win rate against the SFT answers to the same prompts (ties count half).",
        "Wall time: the whole CLI run of the stage (set-up, training, validation, export). Peak memory: the "
        "PeakMemoryMonitor's overall peak (CPU: the process's resident memory; CUDA: max_memory_allocated); the "
        "stages run one after another in one process, so on the CPU it includes what earlier stages left "
        "allocated (the `cost` benchmark measures memory in fresh processes).",
    ]
    raw = {
        "seeds": {str(seed): seed_run for seed, seed_run in runs.items()},
        "budget": {"overrides": budget.stage_overrides("dvpo")},
    }
    name = report_name(configs)
    if name != "table":
        left_out = [label(stage) for stage in POLICIES if stage not in stages]
        notes.insert(
            0,
            f"Setting: the configs of `{configs.name}/` (dataset `{dataset_of(configs)}`); "
            f"{', '.join(left_out) or 'no algorithm'} left out (no config there).",
        )
    return Report(
        name,
        f"{name}: SFT, the offline and the on-policy algorithms on the built-in task"
        + ("" if name == "table" else f" (`{configs.name}/` configs)"),
        [policies, costs, per_seed],
        raw,
        notes,
        [figure],
    )
