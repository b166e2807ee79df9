"""LightningModules of every stage; they orchestrate models and `dvpo_lightning.algos`, holding no formulas."""

import torch

from dvpo_lightning.models import LoraSpec, ModelSpec
from dvpo_lightning.modules.base import RLHFModule
from dvpo_lightning.modules.dpo import DPOModule
from dvpo_lightning.modules.dvpo import DVPOModule
from dvpo_lightning.modules.generation import Responses, SamplingConfig, generate_responses, gold_rewards
from dvpo_lightning.modules.gvm import GVMModule
from dvpo_lightning.modules.onpolicy import Experience, OnPolicyModule, PPOConfig, Scores
from dvpo_lightning.modules.optim import OptimConfig
from dvpo_lightning.modules.policy import PolicyModule
from dvpo_lightning.modules.ppo import PPOModule
from dvpo_lightning.modules.reward_model import RewardModelModule
from dvpo_lightning.modules.rto import RTOModule
from dvpo_lightning.modules.sft import SFTModule

# Checkpoints store each module's hyperparameters, these config dataclasses among them; torch.load's default
# weights_only=True unpickles only allow-listed classes.
torch.serialization.add_safe_globals([ModelSpec, LoraSpec, OptimConfig, SamplingConfig, PPOConfig])

__all__ = [
    "DVPOModule",
    "Experience",
    "OnPolicyModule",
    "PPOConfig",
    "PPOModule",
    "RTOModule",
    "Scores",
    "DPOModule",
    "GVMModule",
    "RewardModelModule",
    "OptimConfig",
    "PolicyModule",
    "RLHFModule",
    "Responses",
    "SFTModule",
    "SamplingConfig",
    "generate_responses",
    "gold_rewards",
]
