"""FSDP2 through Lightning's `ModelParallelStrategy`: sharding a stage's models and gathering them when needed.

Under that strategy Lightning calls `configure_model` with a device mesh; every HF model of the stage (trained and
frozen) is then sharded with `fully_shard`, decoder layer by decoder layer (`_no_split_modules`) and then the root.
Under any other strategy nothing here does anything.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from dvpo_lightning.models.spec import DTYPES


@dataclass
class FSDPConfig:
    """How models are sharded under `ModelParallelStrategy` (FSDP2); ignored under every other strategy.

    Args:
        param_dtype: dtype the gathered parameters are computed in: "bfloat16" for mixed precision (sharded master
            weights, gradients and optimiser states stay in the parameters' own dtype); None = no casting.
        reduce_dtype: dtype of the gradient reduce-scatter ("float32" keeps reductions exact under bf16 compute).
        reshard_after_forward: free each layer's gathered weights after its forward (ZeRO-3); false keeps them until
            the backward (less communication, more memory). Frozen models always reshard: they have no backward.
        gather_policy_for_generation: gather the policy once for a whole rollout instead of once per layer and
            decoding step (one copy of the full policy per rank while it generates; much fewer collectives).
    """

    param_dtype: str | None = None
    reduce_dtype: str | None = "float32"
    reshard_after_forward: bool = True
    gather_policy_for_generation: bool = True

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES:
                raise ValueError(f"fsdp.{name} must be one of {sorted(DTYPES)} or null; got {value!r}")

    def mixed_precision(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(
            param_dtype=DTYPES.get(self.param_dtype), reduce_dtype=DTYPES.get(self.reduce_dtype)
        )


def shard_model(model: nn.Module, mesh: DeviceMesh, config: FSDPConfig, frozen: bool) -> nn.Module:
    """`fully_shard` every decoder layer of an HF model (or of a peft model's base), then its root."""
    if isinstance(model, FSDPModule):
        return model  # Lightning calls configure_model again for validate/test
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_classes = tuple(getattr(base, "_no_split_modules", None) or ())
    options = {"mesh": mesh, "mp_policy": config.mixed_precision()}
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, reshard_after_forward=frozen or config.reshard_after_forward, **options)
    # A frozen model never runs backward, so its root would otherwise stay gathered after its first forward.
    fully_shard(model, reshard_after_forward=True if frozen else None, **options)
    if hasattr(model, "get_base_model"):
        # peft's generate calls the inner model, which is not the FSDP root: route it through the root's hooks.
        register_fsdp_forward_method(model, "generate")
    return model


@contextlib.contextmanager
def gathered(model: nn.Module, config: FSDPConfig):
    """Hold a sharded trained model's full weights for the block when `config` asks (no-op when unsharded)."""
    modules = (
        [m for m in model.modules() if isinstance(m, FSDPModule)]
        if config.gather_policy_for_generation
        else []
    )
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            # Back to how `shard_model` set a trained model up: the root waits for backward, layers per config.
            module.set_reshard_after_forward(
                module is not model and config.reshard_after_forward, recurse=False
            )
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded model, on CPU on rank 0 (empty elsewhere).

    A collective: every rank must call it.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def decoder_layer_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 (`FSDPStrategy`) auto-wrap policy: one FSDP unit per transformer block of any HF decoder.

    HF names its blocks `...DecoderLayer` (Llama, Qwen, Mistral, Gemma) or `...Block` (GPT-2, GPT-NeoX).
    """
    return recurse or type(module).__name__.endswith(("DecoderLayer", "Block"))
