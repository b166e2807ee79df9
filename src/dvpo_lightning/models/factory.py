"""Build policies and value models from a `ModelSpec` and the run's tokenizer.

- A policy is an HF causal LM.
- A value model (Global Value Model, PPO critic, reward model) is an HF token-classification model with one
  label: the causal-LM backbone plus a linear head giving one scalar per token. Created from a causal LM (or
  an inline architecture), its head starts at zero, so every value starts at 0; loaded from an exported value
  model, its trained head is kept. Either way it is a plain `save_pretrained` directory, head included.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dvpo_lightning.models.lora import apply_lora
from dvpo_lightning.models.spec import ModelSpec
from dvpo_lightning.models.tokenizers import check_tokenizer_matches

log = logging.getLogger(__name__)

VALUE_HEAD_NAMES = ("score", "classifier")


def build_policy(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, role: str = "policy") -> nn.Module:
    """A causal LM for `spec`, sized for `tokenizer`, with LoRA and gradient checkpointing as asked.

    Everything random in the build (an `arch` model's weights, new embedding rows, LoRA adapters) is drawn from
    `spec.init_seed` (default: the run's seed), so every process builds the same model: FSDP2 does not broadcast
    initial weights.
    """
    with _seeded(spec.resolved_init_seed()):
        config = _config_for(spec, tokenizer, role)
        model = _instantiate(AutoModelForCausalLM, spec, config)
        _fit_to_tokenizer(model, tokenizer)
        return _adapt(model, spec, task_type="CAUSAL_LM", full_modules=())


def build_value_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, role: str = "value model"
) -> nn.Module:
    """A token-level value model for `spec`: backbone + scalar head (zero-initialised when new).

    Seeded from `spec.init_seed` like `build_policy`.
    """
    with _seeded(spec.resolved_init_seed()):
        return _build_value_model(spec, tokenizer, role)


def _build_value_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, role: str) -> nn.Module:
    config = _config_for(spec, tokenizer, role)
    from_value_checkpoint = is_value_model_config(config)
    config.num_labels = 1
    if hasattr(config, "classifier_dropout"):
        config.classifier_dropout = 0.0
    # A causal-LM checkpoint has no head and an unused LM head: transformers reports both; expected here.
    quiet = contextlib.nullcontext() if from_value_checkpoint else _transformers_quiet()
    with quiet:
        model = _instantiate(AutoModelForTokenClassification, spec, config)
    head = value_head(model)
    if not from_value_checkpoint:
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
    _fit_to_tokenizer(model, tokenizer)
    head_names = tuple(name for name in VALUE_HEAD_NAMES if hasattr(model, name))
    return _adapt(model, spec, task_type="TOKEN_CLS", full_modules=head_names)


def freeze(model: nn.Module) -> nn.Module:
    """Make `model` a frozen scorer: no gradients, no dropout. The caller runs it under `torch.no_grad()`."""
    model.requires_grad_(False)
    model.eval()
    return model


def value_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a value model (named `score` or `classifier` depending on the architecture)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in VALUE_HEAD_NAMES:
        head = getattr(base, name, None)
        if head is not None:
            # peft wraps trained heads (`modules_to_save`); the module that runs is the active copy.
            active = getattr(head, "modules_to_save", None)
            return active[head.active_adapter] if active is not None else head
    raise ValueError(f"{type(base).__name__} has no value head (looked for {VALUE_HEAD_NAMES})")


def context_length(spec: ModelSpec) -> int | None:
    """The longest sequence the model of `spec` reads (its config's `max_position_embeddings`), read without
    loading any weights; None when the config names no limit."""
    if spec.name_or_path is not None:
        config = AutoConfig.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    else:
        arch = dict(spec.arch)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    return getattr(config, "max_position_embeddings", None)


def is_value_model_config(config: PretrainedConfig) -> bool:
    return any(name.endswith("ForTokenClassification") for name in (config.architectures or []))


def _config_for(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, role: str) -> PretrainedConfig:
    if spec.name_or_path is not None:
        check_tokenizer_matches(spec.name_or_path, tokenizer, role)
        config = AutoConfig.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    else:
        arch = dict(spec.arch)
        config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        config.vocab_size = len(tokenizer)
    # A pad token the tokenizer added after the model was trained lies beyond the embeddings until
    # `_fit_to_tokenizer` grows them; the config learns it there.
    if tokenizer.pad_token_id < config.vocab_size:
        config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None or spec.arch is not None:
        # A random model's architecture default (GPT-2's 50256) may lie outside a small tokenizer's vocabulary.
        config.bos_token_id = tokenizer.bos_token_id
    if spec.disable_dropout:
        for key, value in config.to_dict().items():
            if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
                setattr(config, key, 0.0)
    return config


def _instantiate(auto_class, spec: ModelSpec, config: PretrainedConfig) -> PreTrainedModel:
    kwargs = dict(spec.extra_kwargs)
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.name_or_path is not None:
        return auto_class.from_pretrained(
            spec.name_or_path,
            config=config,
            dtype=spec.torch_dtype,
            revision=spec.revision,
            trust_remote_code=spec.trust_remote_code,
            **kwargs,
        )
    return auto_class.from_config(config, dtype=spec.torch_dtype, **kwargs)


def _fit_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained tokens (e.g. the added pad token)."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
        generation_config.eos_token_id = tokenizer.eos_token_id


def _adapt(
    model: PreTrainedModel, spec: ModelSpec, task_type: str, full_modules: tuple[str, ...]
) -> nn.Module:
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, task_type, full_modules)
    if spec.disable_dropout:  # after LoRA, whose adapters bring dropout modules of their own
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return model


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _transformers_quiet():
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)
