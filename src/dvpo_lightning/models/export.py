"""Export a trained model as a self-contained HF directory (weights, config, tokenizer, lineage, model card).

The next stage loads it by path with `from_pretrained`. LoRA adapters are merged into the weights so the
export is an ordinary model that needs no peft to load.
"""

from __future__ import annotations

import copy
import json
import os

from torch import nn
from transformers import PreTrainedTokenizerBase

from dvpo_lightning.models.card import model_card
from dvpo_lightning.models.lineage import EXPORT_INFO
from dvpo_lightning.models.lora import is_lora


def export_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directory: str,
    info: dict | None = None,
    state_dict: dict | None = None,
) -> str:
    """Save `model` (LoRA merged) and `tokenizer` to `directory`; returns the directory.

    `state_dict`, when given, is the full (gathered) state dict to write instead of the module's own: sharded
    strategies gather it first. `info`, the export's lineage record (`dvpo_lightning.models.lineage`), is written
    as `dvpo_export.json`, and the model card made from it as `README.md`.
    """
    os.makedirs(directory, exist_ok=True)
    if is_lora(model):
        model = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if info is not None:
        with open(os.path.join(directory, EXPORT_INFO), "w") as handle:
            json.dump(info, handle, indent=2, sort_keys=True, default=str)
        with open(os.path.join(directory, "README.md"), "w") as handle:
            handle.write(model_card(info))
    return directory


def read_export_info(directory: str) -> dict:
    """What `export_model` recorded about the export at `directory` (`{}` for a hub name or a foreign model)."""
    path = os.path.join(os.path.expanduser(directory), EXPORT_INFO)
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)
