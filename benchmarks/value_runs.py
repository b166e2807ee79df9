"""The runs of the `value` benchmark: what each one trains, from which config, with which options and budget.

A run is one `dvpo fit` of a config (as `table` runs them, through the CLI a user types) under its own name, so
that one config can train several variants (the GVM with each option beyond the paper, DVPO on each GVM, ...).
`Scale` turns the configs' own budgets into the benchmark's: all of them (full), a fraction of every stage's
optimiser steps (a reduced run), or toy budgets (quick).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from benchmarks.table import export_dir
from benchmarks.timing import accelerator
from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.sources import builtin_task_name

ON_POLICY_CONFIGS = ("ppo", "dvpo", "gvm_grpo", "ppo_gvm_critic")
LENGTHS = ("recommended_max_prompt_length", "recommended_max_response_length")
SAMPLED_PAIRS = "sft_samples.jsonl"  # gold-scored pairs of the SFT policy's samples, in the seed's root
GVM_SCORED_PAIRS = (
    "gvm_samples.jsonl"  # pairs of the SFT policy's samples scored by the GVM, in the seed's root
)
FILE_LENGTHS = (  # a file, not the task: its lengths are the task's, as they were when the answers were sampled
    "--data.init_args.max_prompt_length={recommended_max_prompt_length}",
    "--data.init_args.max_response_length={recommended_max_response_length}",
)
GOLD_SCORED_SAMPLES = (  # trained on the gold-scored pairs of the SFT policy's samples, towards their scores
    f"--data.init_args.dataset={{root}}/{SAMPLED_PAIRS}",
    *FILE_LENGTHS,
    "--model.init_args.terminal_reward=score",
)


@dataclass(frozen=True)
class Run:
    name: str  # its directory under the seed's root, and its key in the results
    config: str  # the config it fits (`<configs>/<config>.yaml`)
    inputs: dict[str, str] = field(default_factory=dict)  # model option -> the run whose export it loads
    # CLI overrides beyond the config's; "{root}" is the seed's root, "{recommended_max_prompt_length}" and
    # "{recommended_max_response_length}" the config's built-in task's
    options: tuple[str, ...] = ()


GVM_OPTIONS = {  # the GVM's options beyond the paper, each a GVM run of its own (and a DVPO run on it)
    "gvm_ranking": ("--model.init_args.ranking_weight=1.0",),
    "gvm_inner_epochs": (
        "--model.init_args.inner_epochs=2",  # the reference code's vas_epochs
        "--model.init_args.max_grad_norm=1.0",  # the config's clip, which the manual steps apply themselves
        "--trainer.gradient_clip_val=null",
    ),
    "gvm_sft_samples": (  # VC-PPO's value pretraining: every state towards the sample's final return
        *GOLD_SCORED_SAMPLES,
        "--model.init_args.lam=1.0",
    ),
    "gvm_consistency": (  # TCRM's per-prefix consistency terms
        "--model.init_args.final_consistency_weight=1.0",
        "--model.init_args.td_consistency_weight=1.0",
    ),
    "gvm_earned": (  # values as running sums of learned token rewards, with the ranking term (configs/gvm_earned)
        "--model.init_args.value_form=earned",
        "--model.init_args.ranking_weight=1.0",
    ),
    "gvm_earned_subsets": (  # the same, its sum fitted over random halves of the tokens (randomized decomposition)
        "--model.init_args.value_form=earned",
        "--model.init_args.ranking_weight=1.0",
        "--model.init_args.reward_subset_probability=0.5",
    ),
    # the earned form's sum fitted to the gold score of the SFT policy's samples: a return decomposition
    "gvm_earned_sft_samples": (*GOLD_SCORED_SAMPLES, "--model.init_args.value_form=earned"),
}
SFT, POLICY = {"model": "sft"}, {"policy": "sft"}
# VC-PPO's Monte-Carlo value pretraining as self-distillation: the GVM, continued on the SFT policy's samples with
# its own complete-response values as every state's target (lambda = 1)
SELF_DISTILLED = Run(
    "gvm_self_mc",
    "gvm",
    {"model": "gvm"},
    (
        f"--data.init_args.dataset={{root}}/{GVM_SCORED_PAIRS}",
        *FILE_LENGTHS,
        "--model.init_args.terminal_reward=score",
        "--model.init_args.lam=1.0",
    ),
)
#: the runs that write the SFT policy's samples they train on: their file in the seed's root, and the run whose GVM
#: scores them (None: the gold reward); gvm_earned_sft_samples trains on gvm_sft_samples's file after it
SAMPLED_DATA = {"gvm_sft_samples": (SAMPLED_PAIRS, None), SELF_DISTILLED.name: (GVM_SCORED_PAIRS, "gvm")}
#: trained at equal budgets from the SFT export (the self-distilled one from the GVM's); then PPO's critic
GVM_VARIANTS = (*GVM_OPTIONS, SELF_DISTILLED.name)  # each with a DVPO run on it
VALUE_MODELS = ("rm", "gvm", *GVM_VARIANTS)
#: the reference code's advantages (advantage.options): the GVM's values whitened over the batch, 0 after the end
#: (braces doubled: options are formatted)
REFERENCE_ADVANTAGES = '--model.init_args.advantage.options={{"bootstrap": "zero", "whiten_values": true}}'
BUILTIN_RUNS = (
    Run("sft", "sft"),
    Run("rm", "rm", SFT),
    Run("gvm", "gvm", SFT),
    *(Run(name, "gvm", SFT, options) for name, options in GVM_OPTIONS.items()),
    SELF_DISTILLED,
    Run("dpo", "dpo", POLICY),
    Run("ppo", "ppo", {**POLICY, "reward_model": "rm"}),
    Run(
        "ppo_frozen_critic",
        "ppo",
        {**POLICY, "reward_model": "rm"},
        ("--model.init_args.train_critic=false",),
    ),
    Run("ppo_gvm_critic", "ppo_gvm_critic", {**POLICY, "reward_model": "rm", "critic": "gvm"}),
    Run("dvpo", "dvpo", {**POLICY, "value_model": "gvm"}),
    *(Run(f"dvpo_{name}", "dvpo", {**POLICY, "value_model": name}) for name in GVM_VARIANTS),
    Run("dvpo_lam1", "dvpo", {**POLICY, "value_model": "gvm"}, ("--model.init_args.ppo.lam=1.0",)),
    Run("dvpo_reference_advantages", "dvpo", {**POLICY, "value_model": "gvm"}, (REFERENCE_ADVANTAGES,)),
    Run(
        "dvpo_gold_values",
        "dvpo",
        POLICY,
        ("--model.init_args.value_model=null", "--model.init_args.gold_values=true"),
    ),
    Run("gvm_grpo", "gvm_grpo", {**POLICY, "value_model": "gvm"}),
)
#: the policies of the diagnostics table, in its order
POLICIES = tuple(run.name for run in BUILTIN_RUNS if run.config in ("dpo", *ON_POLICY_CONFIGS))


# ----------------------------------------------------------------------------------------------- HH-RLHF
HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
HH_NEW_TOKENS = 32  # PPO's answers
HH_DATA = {  # the data module's options on HH-RLHF
    "max_prompt_length": 192,
    "max_response_length": 64,
    "val_size": 500,  # raw rows held out; those with too long a prompt are then dropped (~350 pairs stay)
    "batch_size": 16,
}
#: optimiser steps on HH-RLHF (~1,150 training pairs of the 2,312 fit the lengths): RM and GVMs equal
HH_STEPS = {"sft": 400, "rm": 300, "gvm": 300, "ppo": 200}
HH_RUNS = (
    Run(
        "sft",
        "sft",
        options=(
            "--data.init_args.tokenizer=bpe:1024",
            "--model.init_args.policy.arch.max_position_embeddings="
            f"{HH_DATA['max_prompt_length'] + HH_DATA['max_response_length']}",
        ),
    ),
    Run("rm", "rm", SFT),
    Run("gvm", "gvm", SFT),
    Run("gvm_ranking", "gvm", SFT, GVM_OPTIONS["gvm_ranking"]),
    Run("gvm_inner_epochs", "gvm", SFT, GVM_OPTIONS["gvm_inner_epochs"]),
    Run(
        "ppo",
        "ppo",
        {**POLICY, "reward_model": "rm"},
        (
            f"--model.init_args.sampling.max_new_tokens={HH_NEW_TOKENS}",
            "--model.init_args.eval_sampling=null",
            "--data.init_args.batch_size=32",  # prompts per rollout
        ),
    ),
)
HH_VALUE_MODELS = ("rm", "gvm", "gvm_ranking", "gvm_inner_epochs")


# ------------------------------------------------------------------------------------------------ scales
@dataclass(frozen=True)
class Scale:
    """The benchmark's budgets: `fraction` of every config's optimiser steps (none: toy budgets)."""

    name: str
    seeds: tuple[int, ...]
    fraction: float | None
    overrides: tuple[str, ...] = ()  # for every run
    on_policy_overrides: tuple[str, ...] = ()
    hh_data: dict = field(default_factory=dict)  # data module options on HH-RLHF beyond HH_DATA

    def steps(self, configured: int) -> int:
        return 2 if self.fraction is None else max(1, round(configured * self.fraction))


COMMON = ("--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0")  # evaluated afterwards
FULL = Scale("full", (0, 1, 2), 1.0, COMMON)
QUICK = Scale(
    "quick",
    (0,),
    None,
    (
        *COMMON,
        "--data.init_args.builtin_size=200",
        "--data.init_args.val_size=20",
        "--data.init_args.batch_size=8",
    ),
    ("--model.init_args.ppo.ppo_epochs=1", "--model.init_args.ppo.mini_batch_size=8"),
    {"max_samples": 300, "val_size": 60, "batch_size": 8},
)


def reduced(fraction: float) -> Scale:
    """Every config's optimiser steps times `fraction`, the full scale's seeds."""
    return Scale(f"reduced: {fraction:g} of every stage's optimiser steps", FULL.seeds, fraction, COMMON)


def hh_data(scale: Scale) -> dict:
    """The data module's options on HH-RLHF at `scale`."""
    return {**HH_DATA, **scale.hh_data}


def config_file(configs: Path, run: Run) -> Path:
    return configs / f"{run.config}.yaml"


def check_configs(configs: Path) -> None:
    """Every config the runs fit must be in `configs`: one message naming the missing ones."""
    missing = sorted(
        {config_file(configs, run).name for run in (*BUILTIN_RUNS, *HH_RUNS)}
        - set(path.name for path in configs.glob("*.yaml"))
    )
    if missing:
        raise ValueError(f"--configs {configs} lacks {', '.join(missing)}, which the value benchmark fits")


def arguments(
    run: Run, seed: int, root: Path, scale: Scale, device: torch.device, configs: Path, hh: bool = False
) -> list[str]:
    """The CLI overrides of `run` for `seed`: budget, device, this seed's exports, the run's own options."""
    config = yaml.safe_load(config_file(configs, run).read_text())
    steps = HH_STEPS["gvm" if run.config == "gvm" else run.config] if hh else config["trainer"]["max_steps"]
    on_policy = run.config in ON_POLICY_CONFIGS
    task = get_task(builtin_task_name(config["data"]["init_args"]["dataset"]))
    fields = {"root": root, **{key: getattr(task, key) for key in LENGTHS}}
    # The run's own options, then the scale's (which win), then what every run of this seed shares.
    result = [
        *(data_arguments({"dataset": HH_FILE, **HH_DATA}) if hh else ()),
        *(option.format(**fields) for option in run.options),
        *scale.overrides,
        *(scale.on_policy_overrides if on_policy else ()),
        *(data_arguments(scale.hh_data) if hh else ()),
        f"--trainer.max_steps={scale.steps(steps)}",
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={root / run.name}",
        f"--trainer.accelerator={accelerator(device)}",
        "--trainer.devices=1",
    ]
    if run.name == "sft":
        result.append(f"--model.init_args.policy.init_seed={seed}")
    else:
        result.append(f"--data.init_args.tokenizer={export_dir(root, 'sft')}")
    for option, upstream in run.inputs.items():
        result.append(f"--model.init_args.{option}.name_or_path={export_dir(root, upstream)}")
    return result


def data_arguments(options: dict) -> list[str]:
    return [f"--data.init_args.{option}={value}" for option, value in options.items()]


def sampled_pairs_count(configs: Path, scale: Scale) -> int:
    """Pairs the score-mode GVM trains and validates on: its steps' worth of batches and its held-out pairs."""
    gvm = yaml.safe_load((configs / "gvm.yaml").read_text())
    data = gvm["data"]["init_args"]
    if scale.fraction is None:
        return 40  # two quick batches of 8 and the quick runs' 20 held-out pairs
    return scale.steps(gvm["trainer"]["max_steps"]) * data["batch_size"] + data["val_size"]
