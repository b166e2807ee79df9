"""What `gpu_check` runs: the model sizes, the stages and their variants, and each run's layered configs.

A run is a stage (its built-in-task config, `configs/<stage>.yaml`) under a variant (a strategy config from
`configs/strategy/` where one is used), plus an override file written for it: the models (a random model of the
scale's shape for SFT; the exports of earlier stages for the rest), budgets, precision and checkpointing. The
stages feed each other as the README's pipeline does: RM, GVM and DPO start from the SFT export, PPO, DVPO and
RTO from theirs, each loading the export of the provider's `single` run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from benchmarks.cost import llama
from dvpo_lightning.data import RLHFDataModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# meta-llama/Llama-3.2-1B's config.json; the vocabulary size is the tokenizer's (Scale.vocab_size).
LLAMA_3_2_1B = {
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
}
# Grouped-query attention and tied embeddings, as Llama-3.2-1B.
TOY_LLAMA = {**llama(32, 2), "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


@dataclass(frozen=True)
class Scale:
    arch: dict
    vocab_size: int | None  # the tokenizer is padded to this many ids (the model's vocabulary); None: as is
    steps: int  # optimiser steps of an offline stage (SFT, RM, GVM, DPO)
    batch: int  # demonstrations or pairs per offline step
    iterations: int  # RL iterations of an on-policy stage (PPO, DVPO, RTO)
    rollout: int  # prompts per RL iteration, per rank
    new_tokens: int  # every response has this length (min_new_tokens = max_new_tokens)
    mini_batch: int  # samples per optimiser step (one PPO epoch)
    micro_batch: int  # samples per forward/backward
    lora_rank: int
    builtin_size: int  # generated pairs: enough for every step and rollout

    @property
    def steps_per_iteration(self) -> int:
        return -(-self.rollout // self.mini_batch)


GPU_SCALE = Scale(
    arch=LLAMA_3_2_1B,
    vocab_size=128256,
    steps=4,
    batch=8,
    iterations=3,
    rollout=32,
    new_tokens=64,
    mini_batch=16,
    micro_batch=8,
    lora_rank=16,
    builtin_size=512,
)
CPU_SCALE = Scale(
    arch=TOY_LLAMA,
    vocab_size=None,
    steps=2,
    batch=4,
    iterations=2,
    rollout=4,
    new_tokens=4,
    mini_batch=2,
    micro_batch=2,
    lora_rank=4,
    builtin_size=64,
)


@dataclass(frozen=True)
class Stage:
    needs: tuple[str, ...]  # stages whose export (of their single run) this one loads
    on_policy: bool


STAGES = {
    "sft": Stage((), False),
    "rm": Stage(("sft",), False),
    "gvm": Stage(("sft",), False),
    "dpo": Stage(("sft",), False),
    "ppo": Stage(("sft", "rm"), True),
    "dvpo": Stage(("sft", "gvm"), True),
    "rto": Stage(("sft", "rm", "dpo"), True),
    "grpo": Stage(("sft", "rm"), True),
    "gvm_grpo": Stage(("sft", "gvm"), True),
}
#: critic-free stages sample groups: this many responses to each of half as many prompts as the others' rollouts
GROUP_SIZE = 2
CRITIC_FREE = ("grpo", "gvm_grpo")
VARIANTS = {
    "single": "no strategy",
    "no-gc": "no strategy, gradient checkpointing off",
    "lora": "no strategy, LoRA policy, reference = the disabled adapter",
    "fsdp1": "FSDP1 (FSDPStrategy)",
    "fsdp2": "FSDP2 (ModelParallelStrategy)",
}
DVPO_ONLY = ("no-gc", "lora", "fsdp1")
PROVIDERS = {need for stage in STAGES.values() for need in stage.needs}
STRATEGY_CONFIGS = {"fsdp1": "fsdp.yaml", "fsdp2": "fsdp2.yaml"}


@dataclass(frozen=True)
class Run:
    stage: str
    variant: str
    world: int = 1  # processes (GPUs) of an FSDP2 run

    @property
    def name(self) -> str:
        return f"{self.stage}/{self.variant}" + (f"x{self.world}" if self.world > 1 else "")

    @property
    def folder(self) -> str:
        return self.name.replace("/", "-")

    def record(self, cuda: bool, **fields) -> dict:
        """The start of this run's record in the report."""
        return {
            "run": self.name,
            "stage": self.stage,
            "variant": self.variant,
            "setting": setting(self, cuda),
            **fields,
        }


def export_dir(work: Path, stage: str) -> Path:
    """Where a stage's single run exports the model later stages load."""
    return work / f"{stage}-single" / "model"


def with_providers(stages: list[str]) -> list[str]:
    """`stages` and every stage whose export they load, in pipeline order."""
    wanted = set(stages)
    for name in reversed(list(STAGES)):
        if name in wanted:
            wanted.update(STAGES[name].needs)
    return [name for name in STAGES if name in wanted]


def plan(stages: list[str], variants: list[str]) -> list[Run]:
    """The runs of one process, in order: the single runs (providers always), DVPO's variants, FSDP2."""
    pipeline = with_providers(stages)
    loaded = {need for name in pipeline for need in STAGES[name].needs}
    runs = [Run(name, "single") for name in pipeline if "single" in variants or name in loaded]
    if "dvpo" in stages:
        runs += [Run("dvpo", variant) for variant in DVPO_ONLY if variant in variants]
    if "fsdp2" in variants:
        runs += [Run(name, "fsdp2") for name in STAGES if name in stages]
    return runs


def precision(run: Run, cuda: bool) -> str:
    if not cuda:
        return "32-true"
    # FSDP2 keeps fp32 master weights and computes in bf16 through `fsdp.param_dtype`, as the GPU recipes do.
    return "32-true" if run.variant == "fsdp2" else "bf16-mixed"


def setting(run: Run, cuda: bool) -> str:
    unit = "GPU" if cuda else "process"
    return f"{VARIANTS[run.variant]}, {run.world} {unit}{'s' if run.world > 1 else ''}, {'bf16' if cuda else 'fp32'}"


def run_overrides(run: Run, scale: Scale, work: Path, cuda: bool) -> dict:
    """The override config of `run`, layered over the stage's config (and strategy config)."""
    stage = STAGES[run.stage]
    sft = str(export_dir(work, "sft"))
    frozen_dtype = {"dtype": "bfloat16"} if cuda and run.variant != "fsdp1" else {}

    def trained(source: dict) -> dict:
        return {**source, "gradient_checkpointing": run.variant != "no-gc", "attn_implementation": "sdpa"}

    def frozen(name: str) -> dict:
        return {"name_or_path": str(export_dir(work, name)), **frozen_dtype}

    policy = trained({"name_or_path": sft})
    models = {
        "sft": {"policy": trained({"arch": scale.arch})},
        "rm": {"model": policy},
        "gvm": {"model": policy},
        "dpo": {"policy": policy, "reference": frozen("sft")},
        "ppo": {
            "policy": policy,
            "reference": frozen("sft"),
            "reward_model": frozen("rm"),
            "critic": trained({"name_or_path": str(export_dir(work, "rm"))}),
        },
        "dvpo": {"policy": policy, "reference": frozen("sft"), "value_model": frozen("gvm")},
    }
    models["rto"] = {**models["ppo"], "dpo_model": frozen("dpo")}
    models["grpo"] = {"policy": policy, "reference": frozen("sft"), "reward_model": frozen("rm")}
    models["gvm_grpo"] = {"policy": policy, "reference": frozen("sft"), "value_model": frozen("gvm")}
    model = models[run.stage]
    if run.variant == "lora":
        rank = scale.lora_rank
        model = {**model, "policy": {**policy, "lora": {"r": rank, "alpha": 2 * rank}}, "reference": None}
        model["reference_as_disabled_adapter"] = True
    if stage.on_policy:
        tokens = scale.new_tokens
        model["sampling"] = {"max_new_tokens": tokens, "min_new_tokens": tokens}
        model["ppo"] = {
            "ppo_epochs": 1,
            "mini_batch_size": scale.mini_batch,
            "micro_batch_size": scale.micro_batch,
            "samples_per_prompt": GROUP_SIZE if run.stage in CRITIC_FREE else 1,
        }
    if run.variant == "fsdp2":
        model["fsdp"] = {"param_dtype": "bfloat16" if cuda else None}
    trainer = {
        "default_root_dir": str(work / run.folder),
        "max_steps": scale.iterations * scale.steps_per_iteration if stage.on_policy else scale.steps,
        "limit_val_batches": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "gpu" if cuda else "cpu",
        "devices": run.world,
        "precision": precision(run, cuda),
        "callbacks": [{"class_path": "benchmarks.timing.StepClock"}],
    }
    if run.variant == "fsdp2":
        trainer["strategy"] = {"init_args": {"data_parallel_size": run.world}}
    data = {
        "tokenizer": str(work / "tokenizer") if run.stage == "sft" else sft,
        "builtin_size": scale.builtin_size,
        "val_size": 0,
        "batch_size": (scale.rollout // (GROUP_SIZE if run.stage in CRITIC_FREE else 1))
        if stage.on_policy
        else scale.batch,
        "cache_dir": str(work / "cache"),
    }
    return {
        "trainer": trainer,
        "model": {"init_args": model},
        "data": {"init_args": data},
        "checkpoint": {"save_last": False, "save_top_k": 0},  # a 1B checkpoint with Adam states is 20 GB
    }


def config_files(run: Run, scale: Scale, work: Path, cuda: bool) -> list[Path]:
    override = work / run.folder / "override.yaml"
    override.parent.mkdir(parents=True, exist_ok=True)
    override.write_text(yaml.safe_dump(run_overrides(run, scale, work, cuda), sort_keys=False))
    strategy = STRATEGY_CONFIGS.get(run.variant)
    return [CONFIGS / f"{run.stage}.yaml", *([CONFIGS / "strategy" / strategy] if strategy else []), override]


def write_tokenizer(directory: Path, vocab_size: int | None, cache: Path) -> None:
    """The built-in task's word-level tokenizer, padded with `filler<id>` words to `vocab_size` ids.

    The task's text tokenises exactly as before; the model gets the vocabulary (and so the embedding and output
    sizes) of the model it stands in for.
    """
    base = RLHFDataModule("builtin:topics", cache_dir=str(cache)).tokenizer
    state = json.loads(base.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    vocab.update({f"filler{index}": index for index in range(len(vocab), vocab_size or 0)})
    padded = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(state)),
        pad_token=base.pad_token,
        eos_token=base.eos_token,
        unk_token=base.unk_token,
        clean_up_tokenization_spaces=False,
    )
    padded.save_pretrained(str(directory))
