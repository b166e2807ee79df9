"""The model card (`README.md`) of an export, written from its lineage record as the Hugging Face hub expects:
YAML metadata, then what the model is, how it was trained, its final metrics and how to load it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from dvpo_lightning.data.sources import is_local

#: what each stage's export is, and the transformers class that loads it
KINDS = {
    "SFTModule": ("a policy fine-tuned on demonstrations (SFT)", "AutoModelForCausalLM"),
    "RewardModelModule": (
        "a Bradley-Terry reward model (its score is the value head at the last token)",
        None,
    ),
    "GVMModule": ("a token-level Global Value Model (GVM), the frozen critic of DVPO", None),
    "DPOModule": ("a policy trained with Direct Preference Optimization (DPO)", "AutoModelForCausalLM"),
    "KTOModule": ("a policy trained with KTO on desirable and undesirable responses", "AutoModelForCausalLM"),
    "PPOModule": (
        "a policy trained with PPO against a reward model and a learned critic",
        "AutoModelForCausalLM",
    ),
    "DVPOModule": (
        "a policy trained with DVPO, a frozen Global Value Model as its critic",
        "AutoModelForCausalLM",
    ),
    "RTOModule": ("a policy trained with RTO (PPO with dense DPO token rewards)", "AutoModelForCausalLM"),
}
VALUE_MODEL_CLASS = "AutoModelForTokenClassification"  # a value head of one output per token


def model_card(info: Mapping[str, Any]) -> str:
    """The README.md of an export whose lineage record is `info`."""
    stage = info.get("stage", "?")
    what, auto_class = KINDS.get(stage, (f"the result of the {stage} stage", None))
    auto_class = auto_class or VALUE_MODEL_CLASS
    data = info.get("data") or {}
    metadata = {"library_name": "transformers", "tags": ["dvpo-lightning", "rlhf", stage]}
    bases = [
        record["identity"]["hub"]
        for record in (info.get("inputs") or {}).values()
        if "hub" in record["identity"]
    ]
    if bases:
        metadata["base_model"] = bases[0] if len(bases) == 1 else bases
    if data.get("dataset") and not is_local(data["dataset"]) and not data["dataset"].startswith("builtin:"):
        metadata["datasets"] = [data["dataset"]]
    lines = [
        "---",
        yaml.safe_dump(metadata, sort_keys=False).strip(),
        "---",
        "",
        f"# {stage} export",
        "",
        f"This is {what}, exported by dvpo-lightning as a plain Hugging Face "
        "directory (LoRA adapters merged). Its full lineage is in `dvpo_export.json`.",
        "",
        "## Training",
        "",
        f"- stage: `{stage}`, {info.get('global_step', '?')} optimiser steps",
        f"- seeds: run {info.get('seed')}; initialisation {_listed_seeds(info.get('init_seeds'))}; data "
        f"{data.get('seed', '?')}",
    ]
    for option, record in (info.get("inputs") or {}).items():
        found = record["identity"]
        source = found.get("hub") or found.get("path")
        lines.append(
            f"- `{option}`: {source}"
            + (f" (export {found['export_id'][:12]})" if "export_id" in found else "")
        )
    if data:
        rows = data.get("rows") or {}
        lines.append(
            f"- data: {data.get('dataset')} ({data.get('mode')} mode), {rows.get('train', '?')} training and "
            f"{rows.get('validation', '?')} validation rows, tokenizer {data.get('tokenizer') or 'of the task'}"
        )
        if data.get("skipped"):
            lines.append(f"- rows skipped: {json.dumps(data['skipped'])}")
    code = info.get("code") or {}
    lines.append(
        f"- code: dvpo-lightning {code.get('dvpo_lightning', '?')}"
        + (f" (commit {code['git_commit'][:12]})" if code.get("git_commit") else "")
    )
    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import AutoTokenizer, {auto_class}",
        "",
        f'model = {auto_class}.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
    ]
    if auto_class == "AutoModelForCausalLM":
        lines += ["", 'or sample from it: `dvpo generate path/to/this/directory --prompt "..."`.']
    return "\n".join(lines) + "\n"


def _listed_seeds(seeds: dict | None) -> str:
    """`policy 0, reference 0`: the initialisation seed of each model a stage built (`?` in older records)."""
    return ", ".join(f"{option} {seed}" for option, seed in seeds.items()) if seeds else "?"
