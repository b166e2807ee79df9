"""LoRA through peft: adapters on the backbone, the value head (if any) trained in full."""

from __future__ import annotations

from torch import nn

from dvpo_lightning.models.spec import LoraSpec


def apply_lora(
    model: nn.Module, spec: LoraSpec, task_type: str, full_modules: tuple[str, ...] = ()
) -> nn.Module:
    """Wrap `model` with LoRA adapters. `task_type` is peft's: CAUSAL_LM or TOKEN_CLS (value models).

    `full_modules` (a value model's head) are trained in full rather than adapted.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "LoRA needs peft: install the extra with `pip install 'dvpo-lightning[peft]'` or remove `lora:` "
            "from the model spec"
        ) from error
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        task_type=task_type,
        exclude_modules=list(full_modules) or None,
        modules_to_save=list(full_modules) or None,
    )
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")
