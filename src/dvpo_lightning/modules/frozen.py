"""Frozen models take no part in a stage's `state_dict()`: they are rebuilt from their paths, so a checkpoint holds
only what training changed, and loading one still checks every trained key."""

from __future__ import annotations

import lightning.pytorch as pl


def leave_frozen_models_out_of_checkpoints(module: pl.LightningModule) -> None:
    """Register the hooks that drop `module.frozen_models`' entries from its state dict and forgive their absence."""
    module.register_state_dict_post_hook(_drop_frozen_entries)
    module.register_load_state_dict_post_hook(_forgive_missing_frozen_entries)


def _is_frozen_key(module: pl.LightningModule, key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] in module.frozen_models


def _drop_frozen_entries(module: pl.LightningModule, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [key for key in state_dict if _is_frozen_key(module, key, prefix)]:
        del state_dict[key]


def _forgive_missing_frozen_entries(module: pl.LightningModule, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys if not _is_frozen_key(module, key, "")
    ]
