"""`value`: DVPO's value model measured as its paper measures it, and where DVPO loses its gold reward.

Per seed, every run goes through the `dvpo` CLI from a config of `--configs` (default `configs/`; `configs/hard`
is the harder built-in setting), as `table` runs them (`benchmarks/value_runs.py` lists them):

- **value models**, at the configs' equal budgets from the same SFT export: the Bradley-Terry reward model, the GVM
  as the paper trains it, and the GVM with each option beyond the paper (a ranking term on complete-response values;
  two inner epochs on fixed targets per batch; the score mode on gold-scored pairs of the SFT policy's own samples
  at lambda = 1 (VC-PPO's Monte-Carlo value pretraining), `dvpo_lightning.sampled_pairs`; TCRM's per-prefix
  consistency terms; values as running sums of learned token rewards, `value_form: earned`, also with its sum fitted
  over random halves of the tokens, and fitted to the gold scores of the SFT policy's samples), the GVM continued on
  the SFT policy's samples with its own complete-response values as Monte-Carlo targets (VC-PPO's value pretraining
  as self-distillation); and PPO's critic after PPO (it starts from the reward model);
- **policies**: DPO, PPO, PPO with a frozen critic, PPO with a GVM-initialised critic, DVPO on each GVM, DVPO at
  lambda = 1, DVPO with the reference code's advantages (values whitened over the batch, 0 after the last token),
  DVPO on the gold values (the oracle critic, `rl.GoldValues`), GVM-scored GRPO.

Then, on the built-in task:

- *value accuracy*: pairwise accuracy on the held-out pairs (`evaluation.pairwise_value_accuracy`), by the mean
  value over a response's states (the paper's measure) and by the complete response's value;
- *gold agreement* on the SFT policy's own samples and on the final DVPO policy's (`evaluation.gold_agreement`):
  Pearson of the complete-response value with the gold reward, and of the TD errors with the gold token rewards;
  beside them, on the SFT samples, the SFT policy's own value function by Monte Carlo (`rl.MonteCarloValues`):
  the token credit an expected-return value model of that policy can reach;
- *diagnostics*: every policy judged as `table` judges it (held-out gold reward, KL to SFT, win rate vs SFT).

On the real HH-RLHF pairs (`../shared/data/hh-rlhf`; skipped where absent): SFT with a BPE tokenizer trained on
the data, then the reward model, the GVMs and PPO at equal budgets, and their value accuracy on held-out pairs.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch

from benchmarks.report import Report, Table, judgement, mark_merged, mean_std, merged_seeds, read_parts
from benchmarks.table import export_dir, report_name
from benchmarks.value_runs import (
    BUILTIN_RUNS,
    FULL,
    GVM_VARIANTS,
    HH_FILE,
    HH_NEW_TOKENS,
    HH_RUNS,
    HH_VALUE_MODELS,
    POLICIES,
    QUICK,
    SAMPLED_DATA,
    VALUE_MODELS,
    Run,
    Scale,
    arguments,
    check_configs,
    config_file,
    hh_data,
    reduced,
    sampled_pairs_count,
)
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.demo import StageRun
from dvpo_lightning.evaluation import (
    evaluate_policy,
    evaluation_data,
    gold_agreement,
    held_out_responses,
    pairwise_value_accuracy,
    value_scorer,
    win_rate,
)
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.rl import GoldValues, MonteCarloValues, SamplingConfig
from dvpo_lightning.sampled_pairs import write_scored_pairs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: sampled continuations per state of each SFT sample (quick runs: a few), for the SFT policy's own values
MC_CONTINUATIONS = {"full": 32, "quick": 4}
LABELS = {
    "gold": "Gold reward (the oracle: the labels' own ceiling)",
    "rm": "Reward model (Bradley-Terry)",
    "gvm": "GVM (the paper's)",
    "gvm_ranking": "GVM + ranking term",
    "gvm_inner_epochs": "GVM, 2 inner epochs",
    "gvm_sft_samples": "GVM on SFT samples (gold score, lambda = 1)",
    "gvm_consistency": "GVM + per-prefix consistency (TCRM)",
    "gvm_self_mc": "GVM continued on SFT samples, its own values as MC targets",
    "gvm_earned": "GVM, earned form (running sum of token rewards) + ranking term",
    "gvm_earned_subsets": "GVM, earned form + ranking term, sums over random halves of the tokens",
    "gvm_earned_sft_samples": "GVM, earned form on SFT samples (gold score)",
    "sft_monte_carlo": "SFT policy's own values (Monte Carlo: the ceiling of an expected-return GVM)",
    "ppo_critic": "PPO's critic after PPO",
    "dpo": "DPO",
    "ppo": "PPO",
    "ppo_frozen_critic": "PPO, frozen critic (the RM's weights)",
    "ppo_gvm_critic": "PPO, GVM-initialised critic",
    "dvpo": "DVPO",
    "dvpo_gvm_ranking": "DVPO on GVM + ranking term",
    "dvpo_gvm_inner_epochs": "DVPO on GVM, 2 inner epochs",
    "dvpo_gvm_sft_samples": "DVPO on GVM of SFT samples",
    "dvpo_gvm_consistency": "DVPO on GVM + per-prefix consistency",
    "dvpo_gvm_self_mc": "DVPO on GVM self-distilled on SFT samples",
    "dvpo_gvm_earned": "DVPO on GVM, earned form + ranking term",
    "dvpo_gvm_earned_subsets": "DVPO on GVM, earned form over random halves",
    "dvpo_gvm_earned_sft_samples": "DVPO on GVM, earned form on SFT samples",
    "dvpo_reference_advantages": "DVPO, reference advantages (whitened values, 0 after the end)",
    "dvpo_lam1": "DVPO, lambda = 1",
    "dvpo_gold_values": "DVPO on the gold values (oracle critic)",
    "gvm_grpo": "GVM-scored GRPO",
}
JUDGED = ("gold", *VALUE_MODELS, "ppo_critic")  # the value scorers of the built-in accuracy table
DVPO_VARIANTS = ("dvpo", *(f"dvpo_{name}" for name in GVM_VARIANTS), "dvpo_reference_advantages")
GVMS = ("gvm", *GVM_VARIANTS)  # the value models DVPO runs on


def run(
    quick: bool,
    device: torch.device,
    output: Path,
    seeds: list[int] | None = None,
    configs: Path = CONFIGS,
    fraction: float | None = None,
) -> Report:
    check_configs(configs)
    scale = QUICK if quick else (FULL if fraction is None else reduced(fraction))
    seeds = tuple(seeds) if seeds is not None else scale.seeds
    builtin, hh = {}, {}
    for seed in seeds:
        root = output / "runs" / report_name(configs, "value") / f"seed{seed}"
        shutil.rmtree(root, ignore_errors=True)  # every run starts from nothing
        builtin[seed] = builtin_seed(seed, root / "builtin", scale, device, configs)
        if HH_FILE.exists():
            hh[seed] = hh_seed(seed, root / "hh", scale, device, configs)
    return make_report(builtin, hh, scale, configs)


def merge(directories: list[Path], configs: Path = CONFIGS) -> Report:
    """One report from the value runs written to `directories` (e.g. one seed each, run in parallel processes), all
    of one scale and one configs directory."""
    records = read_parts(directories, report_name(configs, "value"))
    parts = [record["results"] for record in records]
    scales = {part["scale"] for part in parts}
    if len(scales) != 1:
        raise ValueError(
            f"--merge: the runs have different scales ({sorted(scales)}); merge runs of one scale"
        )
    name = scales.pop()
    # A reduced scale is rebuilt from its name only: the report reads nothing else of it.
    scale = next((known for known in (FULL, QUICK) if known.name == name), None) or Scale(name, (), 1.0)
    report = make_report(merged_seeds(parts, "builtin"), merged_seeds(parts, "hh"), scale, configs)
    return mark_merged(report, records)


# ---------------------------------------------------------------------------------------------- built-in
def builtin_seed(seed: int, root: Path, scale: Scale, device: torch.device, configs: Path) -> dict:
    """Train every built-in run for `seed`, then judge its value models and policies."""
    seconds, held_out = {}, {}
    for item in BUILTIN_RUNS:
        print(f"[value] seed {seed}: {item.name}")
        if item.name in SAMPLED_DATA:  # its data: pairs of the SFT policy's samples, gold- or GVM-scored
            output, value_model = SAMPLED_DATA[item.name]
            write_scored_pairs(
                str(export_dir(root, "sft")),
                root / output,
                held_out["dataset"],
                pairs=sampled_pairs_count(configs, scale),
                sampling_seed=seed,
                device=device,
                value_model=value_model and str(export_dir(root, value_model)),
                seed=held_out["seed"],
                builtin_size=held_out["builtin_size"],
                val_size=held_out["val_size"],
                batch_size=64,
            )
        stage = fit(item, seed, root, scale, device, configs)
        seconds[item.name] = stage.seconds
        held_out = held_out or stage.held_out  # the SFT stage's split, which every run holds out
    pairs = RLHFDataModule(tokenizer=str(export_dir(root, "sft")), mode="pairs", batch_size=64, **held_out)
    pairs.setup("validate")
    prompts = evaluation_data(tokenizer=str(export_dir(root, "sft")), batch_size=64, **held_out)
    sampling = SamplingConfig(max_new_tokens=prompts.max_response_length)
    samples = {
        name: held_out_responses(
            policy(root, name, prompts, device), prompts, sampling, seed=0, device=device
        )
        for name in ("sft", "dvpo")
    }
    values = {}
    for name in JUDGED:
        scorer = (
            GoldValues(prompts.task, prompts.tokenizer)
            if name == "gold"
            else value_scorer(str(value_model_dir(root, name)), prompts, device)
        )
        values[name] = {
            "accuracy": vars(pairwise_value_accuracy(scorer, pairs, device)),
            **{
                f"{policy_name}_samples": vars(gold_agreement(scorer, samples[policy_name], prompts))
                for policy_name in samples
            },
        }
    # An expected-return value model of the SFT policy at its best: that policy's own values, sampled (on its own
    # samples only: the pairs' and DVPO's answers are another policy's)
    continuations = MC_CONTINUATIONS["quick" if scale.fraction is None else "full"]
    monte_carlo = MonteCarloValues(
        policy(root, "sft", prompts, device), prompts.task, prompts.tokenizer, sampling, continuations
    )
    values["sft_monte_carlo"] = {"sft_samples": vars(gold_agreement(monte_carlo, samples["sft"], prompts))}
    reports = {
        name: evaluate_policy(
            str(export_dir(root, name)), str(export_dir(root, "sft")), prompts, sampling, device=device
        )
        for name in ("sft", *POLICIES)
    }
    policies = {
        name: {
            **report.summary(),
            "win_rate_vs_sft": win_rate(report.per_prompt_gold, reports["sft"].per_prompt_gold),
        }
        for name, report in reports.items()
    }
    return {"values": values, "policies": policies, "seconds": seconds}


def fit(
    item: Run, seed: int, root: Path, scale: Scale, device: torch.device, configs: Path, hh: bool = False
):
    """One run through the CLI; PPO's critic is exported beside its policy (`<run>/critic`)."""
    return fit_config(
        item.name, config_file(configs, item), arguments(item, seed, root, scale, device, configs, hh), root
    )


def fit_config(name: str, config: Path, overrides: list[str], root: Path) -> StageRun:
    """`dvpo fit` of `config` as run `name` of the seed's `root`; PPO's critic is exported beside its policy."""
    stage = StageRun.run(name, config, overrides)
    if name == "ppo":
        export_model(stage.model.critic_model, stage.model.tokenizer, str(root / "ppo" / "critic"))
    stage.model = None  # its models are exported: free them
    return stage


def value_model_dir(root: Path, name: str) -> Path:
    return root / "ppo" / "critic" if name == "ppo_critic" else export_dir(root, name)


def policy(root: Path, name: str, data: RLHFDataModule, device: torch.device) -> torch.nn.Module:
    spec = ModelSpec(name_or_path=str(export_dir(root, name)))
    return build_policy(spec, data.tokenizer, role="policy").to(device).eval()


# ----------------------------------------------------------------------------------------------- HH-RLHF
def hh_seed(seed: int, root: Path, scale: Scale, device: torch.device, configs: Path) -> dict:
    """SFT, reward model, GVMs and PPO on the real HH-RLHF pairs; value accuracy on their held-out pairs."""
    for item in HH_RUNS:
        print(f"[value] seed {seed}: HH-RLHF {item.name}")
        fit(item, seed, root, scale, device, configs, hh=True)
    options = {**hh_data(scale), "batch_size": 64}
    pairs = RLHFDataModule(str(HH_FILE), tokenizer=str(export_dir(root, "sft")), mode="pairs", **options)
    pairs.setup("validate")
    return {
        name: vars(
            pairwise_value_accuracy(
                value_scorer(str(value_model_dir(root, name)), pairs, device), pairs, device
            )
        )
        for name in (*HH_VALUE_MODELS, "ppo_critic")
    }


# ------------------------------------------------------------------------------------------------ report
def make_report(builtin: dict[int, dict], hh: dict[int, dict], scale: Scale, configs: Path) -> Report:
    seeds = list(builtin)
    tables = [accuracy_table(builtin), credit_classes_table(builtin), diagnostics_table(builtin)]
    if hh:
        tables.insert(2, hh_table(hh))
    tables.append(targets_table(builtin, hh, quick=scale.name == "quick"))
    notes = [
        f"Scale: {scale.name}; seeds {seeds}; configs `{configs.name}/`"
        + (" (the hard setting, builtin:topics-long)" if configs.name == "hard" else " (builtin:topics)")
        + ". Budgets are the configs' own (scaled): the reward model and every GVM take the same optimiser steps "
        "and batch from the same SFT export (the 2-inner-epoch GVM draws half as many batches); PPO's critic "
        "starts from the reward model and trains during PPO; every on-policy run has the same steps, rollout, epochs "
        "and KL target.",
        "Value accuracy: chosen valued strictly above rejected on the held-out pairs of the SFT stage's split. "
        "Gold agreement: one sampled answer per held-out prompt (the same prompts and seed as the diagnostics); "
        "token credit = Pearson, over every response token, of the value model's TD error V(s_t+1) - V(s_t) "
        "(V_final after the last token) with the gold reward of that token; within each token, the same after "
        "centring both on their mean over the token's occurrences (`evaluation.within_token_pearson`): the credit "
        "that reads the context (a topic asked for or not, named before or not), where a bag of words scores about "
        "0. The SFT policy's own values: the mean "
        f"gold reward of {MC_CONTINUATIONS['full']} answers sampled from each state (quick runs: "
        f"{MC_CONTINUATIONS['quick']}), `rl.MonteCarloValues`. The earned form's mean value averages the reward "
        "earned so far, not predictions of the final value: its complete-response accuracy is the comparable one.",
        *gap_notes(builtin),
    ]
    if not hh:
        notes.append(f"HH-RLHF: skipped, no data at {HH_FILE}.")
    else:
        notes.append(
            f"HH-RLHF ({HH_FILE.name}): a BPE tokenizer of 1,024 tokens trained on its training split, prompts of at "
            f"most 192 tokens, answers of 64 (PPO samples {HH_NEW_TOKENS}); the held-out pairs are the same for "
            "every model."
        )
    raw = {"scale": scale.name, "configs": str(configs), "builtin": builtin, "hh": hh}
    name = report_name(configs, "value")
    title = f"{name}: DVPO's value model measured like the paper, and where DVPO loses"
    if name != "value":
        title += f" (`{configs.name}/` configs)"
    if scale is not FULL:
        title += f" ({scale.name} scale)" if scale is QUICK else f" ({scale.name}, seeds {seeds})"
    return Report(name, title, tables, raw, notes)


def accuracy_table(builtin: dict[int, dict]) -> Table:
    def cell(name: str, *keys: str) -> str:
        values = []
        for result in builtin.values():
            value = result["values"][name]
            # not measured for this scorer (the SFT policy's Monte-Carlo values: on its own samples only)
            if keys[0] not in value:
                return "—"
            for key in keys:
                value = value[key]
            values.append(value)
        return mean_std(values)

    table = Table(
        "Built-in task: value accuracy on held-out pairs and gold agreement on samples (mean ± std over seeds)",
        [
            "value model",
            "pairwise accuracy (mean value)",
            "pairwise accuracy (complete response)",
            "value vs gold, SFT samples",
            "value vs gold, DVPO samples",
            "token credit vs gold, SFT samples",
            "token credit within each token, SFT samples",
            "token credit vs gold, DVPO samples",
        ],
    )
    for name in ("gold", "sft_monte_carlo", *JUDGED[1:]):
        table.rows.append(
            [
                LABELS[name],
                cell(name, "accuracy", "mean_value"),
                cell(name, "accuracy", "final_value"),
                cell(name, "sft_samples", "final_value_pearson"),
                cell(name, "dvpo_samples", "final_value_pearson"),
                cell(name, "sft_samples", "token_credit_pearson"),
                cell(name, "sft_samples", "contextual_credit_pearson"),
                cell(name, "dvpo_samples", "token_credit_pearson"),
            ]
        )
    return table


def hh_table(hh: dict[int, dict]) -> Table:
    table = Table(
        "HH-RLHF: value accuracy on held-out pairs, equal budgets from the same SFT start (mean ± std over seeds)",
        ["value model", "pairwise accuracy (mean value)", "pairwise accuracy (complete response)", "pairs"],
    )
    for name in (*HH_VALUE_MODELS, "ppo_critic"):
        results = [seed_result[name] for seed_result in hh.values()]
        table.rows.append(
            [
                LABELS[name],
                mean_std([result["mean_value"] for result in results]),
                mean_std([result["final_value"] for result in results]),
                str(results[0]["pairs"]),
            ]
        )
    return table


def gains(builtin: dict[int, dict], name: str) -> list[float]:
    """Held-out gold reward minus the same seed's SFT gold reward."""
    return [
        result["policies"][name]["gold_reward"] - result["policies"]["sft"]["gold_reward"]
        for result in builtin.values()
    ]


def diagnostics_table(builtin: dict[int, dict]) -> Table:
    table = Table(
        "Diagnostics on the built-in task: where DVPO loses gold reward (held-out prompts, mean ± std over seeds)",
        [
            "policy",
            "gain over SFT",
            "gain minus DVPO's",
            "win rate vs SFT",
            "KL to SFT (nats)",
            "fraction of optimum",
        ],
    )
    dvpo = gains(builtin, "dvpo")
    for name in POLICIES:
        column = [result["policies"][name] for result in builtin.values()]
        table.rows.append(
            [
                LABELS[name],
                mean_std(gains(builtin, name)),
                mean_std([gain - base for gain, base in zip(gains(builtin, name), dvpo)]),
                mean_std([policy["win_rate_vs_sft"] for policy in column]),
                mean_std([policy["kl_ref"] for policy in column]),
                mean_std([policy["gold_fraction"] for policy in column]),
            ]
        )
    return table


#: the gold token rewards of the built-in tasks, and what earns them
GOLD_CLASSES = {
    "1": "+1: a topic asked for, first time",
    "-0.5": "-0.5: a topic off the prompt or again",
    "-0.0625": "-1/16: a filler word or mark",
    "0": "0: the end of a finished answer",
}


def credit_classes_table(builtin: dict[int, dict]) -> Table:
    """Each value scorer's mean TD error on the SFT samples' tokens of each gold reward (mean ± std over seeds)."""
    table = Table(
        "Built-in task: the mean TD error (credit) a value model gives the SFT samples' tokens of each gold reward "
        "(mean ± std over seeds)",
        ["value model", *GOLD_CLASSES.values()],
    )
    for name in ("gold", "sft_monte_carlo", *JUDGED[1:]):
        means = [
            result["values"][name]["sft_samples"]["credit_by_gold_reward"] for result in builtin.values()
        ]
        table.rows.append(
            [LABELS[name], *(class_cell([seed.get(key) for seed in means]) for key in GOLD_CLASSES)]
        )
    return table


def class_cell(means: list[float | None]) -> str:
    """Mean ± std over seeds; "—" where a seed's samples hold no token of the class (small quick runs)."""
    return "—" if None in means else mean_std(means)


def mean_gain(builtin: dict[int, dict], name: str) -> float:
    return statistics.fmean(gains(builtin, name))


def mean_credit(builtin: dict[int, dict], name: str, measure: str = "token_credit_pearson") -> float:
    """Mean over seeds of a value scorer's token credit vs gold on the SFT samples (`measure`: or within each
    token, "contextual_credit_pearson")."""
    return statistics.fmean(result["values"][name]["sft_samples"][measure] for result in builtin.values())


def gap_notes(builtin: dict[int, dict]) -> list[str]:
    """What the diagnostics say, in numbers (means over seeds of the gold gain over SFT)."""
    gain = {name: mean_gain(builtin, name) for name in POLICIES}
    best = max(DVPO_VARIANTS, key=gain.__getitem__)
    credit = {
        name: mean_credit(builtin, name)
        for name in ("sft_monte_carlo", "gvm", "gvm_earned", "gvm_earned_subsets")
    }
    contextual = {
        name: mean_credit(builtin, name, "contextual_credit_pearson") for name in (*GVMS, "sft_monte_carlo")
    }
    best_contextual = max(GVMS, key=contextual.__getitem__)
    return [
        f"Token credit on the SFT policy's samples: its own values (Monte Carlo, the expected-return values a GVM "
        f"of that policy is trained towards) reach {credit['sft_monte_carlo']:.3f}, short of the oracle's 1 because "
        "a value's step is the token's reward plus what it changes in the rest of the answer; the paper's GVM "
        f"{credit['gvm']:.3f}; the earned form, whose steps are its learned token rewards, "
        f"{credit['gvm_earned']:.3f}, fitted over random halves of its tokens {credit['gvm_earned_subsets']:.3f}.",
        f"Within each token (what the context adds to a token's credit): the SFT policy's own values "
        f"{contextual['sft_monte_carlo']:.3f}, the paper's GVM {contextual['gvm']:.3f}, the best GVM "
        f"({LABELS[best_contextual]}) {contextual[best_contextual]:.3f}: a GVM near 0 credits a token by what it "
        "is, not by where it stands (a topic noun the same whether the prompt asked for it or it was named before).",
        f"Where DVPO stands: DVPO {gain['dvpo']:+.3f}, PPO {gain['ppo']:+.3f}, DPO {gain['dpo']:+.3f}; the best GVM "
        f"option, {LABELS[best]}, {gain[best]:+.3f}.",
        f"A perfect frozen critic (the gold values) gains {gain['dvpo_gold_values']:+.3f}: "
        f"{gain['dvpo_gold_values'] - gain['dvpo']:+.3f} over the GVM, the part of the gap that is the GVM's error.",
        f"Training PPO's critic is worth {gain['ppo'] - gain['ppo_frozen_critic']:+.3f} (PPO minus PPO with its "
        f"critic frozen at the reward model's weights); starting it from the GVM, "
        f"{gain['ppo_gvm_critic'] - gain['ppo']:+.3f}.",
        f"lambda = 1 (the GVM's complete-response value as outcome, its state values as baseline) moves DVPO by "
        f"{gain['dvpo_lam1'] - gain['dvpo']:+.3f}; GVM-scored GRPO (no state values at all) by "
        f"{gain['gvm_grpo'] - gain['dvpo']:+.3f}.",
    ]


def targets_table(builtin: dict[int, dict], hh: dict[int, dict], quick: bool) -> Table:
    table = Table("Targets", ["target", "measured", "verdict"])
    if hh:
        accuracy = {
            name: statistics.fmean(result[name]["final_value"] for result in hh.values())
            for name in ("gvm", "rm")
        }
        accuracy["ppo_critic"] = statistics.fmean(
            result["ppo_critic"]["mean_value"] for result in hh.values()
        )
        met = accuracy["gvm"] >= accuracy["rm"] >= accuracy["ppo_critic"]
        table.rows.append(
            [
                "HH-RLHF: GVM (complete response) >= RM >= PPO critic (mean value)",
                f"{accuracy['gvm']:.3f} / {accuracy['rm']:.3f} / {accuracy['ppo_critic']:.3f}",
                judgement(met, quick),
            ]
        )
    credit = {name: mean_credit(builtin, name) for name in GVMS}
    best_credit = max(GVMS, key=credit.__getitem__)
    table.rows.append(
        [
            f"built-in: the best GVM's token credit vs gold on SFT samples >= 0.3 ({LABELS[best_credit]})",
            f"{credit[best_credit]:.3f} (the paper's GVM {credit['gvm']:.3f})",
            judgement(credit[best_credit] >= 0.3, quick),
        ]
    )
    best = max(DVPO_VARIANTS, key=lambda name: mean_gain(builtin, name))
    best_gain, ppo, dpo = (mean_gain(builtin, name) for name in (best, "ppo", "dpo"))
    table.rows.append(
        [
            f"built-in: the best GVM option's DVPO gain >= PPO's and > DPO's ({LABELS[best]})",
            f"{best_gain:+.3f} vs PPO {ppo:+.3f}, DPO {dpo:+.3f}",
            judgement(best_gain >= ppo and best_gain > dpo, quick),
        ]
    )
    return table
