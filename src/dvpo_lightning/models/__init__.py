"""Building, loading, adapting and exporting HF models: policies and token-level value models."""

from dvpo_lightning.models.export import export_model, read_export_info
from dvpo_lightning.models.factory import (
    build_policy,
    build_value_model,
    context_length,
    freeze,
    is_value_model_config,
    value_head,
)
from dvpo_lightning.models.forward import (
    VALUE_FORMS,
    PerToken,
    output_head,
    recomputes_activations,
    response_logits,
    response_token_outputs,
    response_values,
    shared_prompt_response_logits,
    shared_prompt_response_token_outputs,
    value_form,
)
from dvpo_lightning.models.lora import apply_lora, is_lora
from dvpo_lightning.models.spec import LoraSpec, ModelSpec
from dvpo_lightning.models.tokenizers import (
    TokenizerMismatchError,
    check_tokenizer_matches,
    tokenizer_difference,
)

__all__ = [
    "VALUE_FORMS",
    "LoraSpec",
    "ModelSpec",
    "PerToken",
    "TokenizerMismatchError",
    "apply_lora",
    "build_policy",
    "build_value_model",
    "check_tokenizer_matches",
    "context_length",
    "export_model",
    "freeze",
    "is_lora",
    "is_value_model_config",
    "output_head",
    "read_export_info",
    "recomputes_activations",
    "response_logits",
    "response_token_outputs",
    "shared_prompt_response_logits",
    "shared_prompt_response_token_outputs",
    "response_values",
    "tokenizer_difference",
    "value_form",
    "value_head",
]
