"""LightningModules of every stage: they choose models, scorers and estimators, and hold no formula and no loop."""

import torch

from dvpo_lightning.models import LoraSpec, ModelSpec
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.critic_free import CriticFreeModule
from dvpo_lightning.modules.dpo import DPOModule
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.gvm import GVMModule
from dvpo_lightning.modules.kto import KTOModule
from dvpo_lightning.modules.onpolicy import OnPolicyModule
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.modules.ppo import PPOModule
from dvpo_lightning.modules.reward_model import RewardModelModule
from dvpo_lightning.modules.rto import RTOModule
from dvpo_lightning.modules.sft import SFTModule
from dvpo_lightning.rl import AdvantageConfig, PPOConfig, SamplingConfig

# Checkpoints store each module's hyperparameters, these config dataclasses among them; torch.load's default
# weights_only=True unpickles only allow-listed classes.
torch.serialization.add_safe_globals(
    [ModelSpec, LoraSpec, OptimConfig, SamplingConfig, PPOConfig, AdvantageConfig]
)

__all__ = [
    "AdvantageConfig",
    "CriticFreeModule",
    "DVPOModule",
    "OnPolicyModule",
    "PPOConfig",
    "PPOModule",
    "RTOModule",
    "DPOModule",
    "GVMModule",
    "KTOModule",
    "RewardModelModule",
    "OptimConfig",
    "PolicyModule",
    "RLHFModule",
    "SFTModule",
    "SamplingConfig",
]
