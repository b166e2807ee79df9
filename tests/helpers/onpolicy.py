"""On-policy modules (PPO, DVPO, RTO), hand-built rollouts and stand-in models for tests.

`ONPOLICY` names each configuration under test and builds it from the run's tokenizer and `OnPolicyExports`,
the frozen models exported beforehand. Every configuration samples short responses (8 tokens) and runs two
PPO epochs, so one RL iteration is two optimiser steps: zero-initialised LoRA B matrices make the A
matrices' first gradient exactly zero, and the second step moves them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from torch import nn

from dvpo_lightning.data.collate import pad_sequences
from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy, export_model
from dvpo_lightning.modules import (
    CriticFreeModule,
    DVPOModule,
    OnPolicyModule,
    OptimConfig,
    PPOConfig,
    PPOModule,
    RTOModule,
    SamplingConfig,
)
from dvpo_lightning.rl import AdvantageConfig, Responses
from tests.helpers.stages import LARGE_LR, TINY_GPT2, export_random_value_model, tiny
from tests.helpers.tiny import TINY_ARCH


@dataclass
class OnPolicyExports:
    """Directories of the frozen models the on-policy stages load by path."""

    gvm: str
    reward_model: str
    dpo_model: str


def export_frozen_models(root, tokenizer) -> OnPolicyExports:
    """A GVM and a reward model with random non-zero heads (values vary), and a DPO policy unlike the SFT one."""
    dpo = build_policy(tiny(init_seed=3), tokenizer)
    return OnPolicyExports(
        gvm=export_random_value_model(root / "gvm", tokenizer, init_seed=7),
        reward_model=export_random_value_model(root / "reward_model", tokenizer, init_seed=11),
        dpo_model=export_model(dpo, tokenizer, str(root / "dpo_model")),
    )


@dataclass(frozen=True)
class Exported:
    """An option filled in with the path of one of `OnPolicyExports` when the module is built."""

    name: str


@dataclass(frozen=True)
class OnPolicyConfig:
    module_class: type[OnPolicyModule]
    options: dict
    ppo: dict
    lora: bool = False
    arch: dict | None = None  # the policy's architecture; None = the tiny Llama

    def build(
        self, tokenizer, exports: OnPolicyExports, optim: OptimConfig | None = None, **ppo
    ) -> OnPolicyModule:
        """The module, trained with `optim` (actor and critic alike; default: Adam at a large learning rate),
        with `ppo` overriding the configuration's PPO settings."""
        optim = optim or OptimConfig(lr=LARGE_LR)
        options = {
            key: ModelSpec(name_or_path=getattr(exports, value.name))
            if isinstance(value, Exported)
            else value
            for key, value in self.options.items()
        }
        if issubclass(self.module_class, PPOModule):
            options["critic_optim"] = optim  # the default 1e-5 would hide a critic that never moves
        policy = ModelSpec(
            arch=dict(self.arch or TINY_ARCH), lora=LoraSpec(r=4, alpha=8) if self.lora else None
        )
        return self.module_class(
            policy=policy,
            sampling=SamplingConfig(max_new_tokens=8),
            ppo=PPOConfig(**{"ppo_epochs": 2, "kl_coef": 0.1, **self.ppo, **ppo}),
            optim=optim,
            tokenizer=tokenizer,
            **options,
        )


def gvm_bootstrap(bootstrap: str) -> AdvantageConfig:
    """DVPO's estimator with the value `bootstrap` after the last token."""
    return AdvantageConfig("gvm", {"bootstrap": bootstrap})


def _config(
    module_class: type[OnPolicyModule],
    lora: bool = False,
    arch: dict | None = None,
    ppo: dict | None = None,
    **options,
) -> OnPolicyConfig:
    return OnPolicyConfig(module_class, options, ppo or {}, lora, arch)


GVM, REWARD_MODEL, DPO_MODEL = Exported("gvm"), Exported("reward_model"), Exported("dpo_model")
GROUPS = {"samples_per_prompt": 2, "whiten_advantages": False}  # the critic-free estimators' groups of 2
KL_IN_LOSS = {"kl_placement": "loss", "kl_estimator": "k3"}  # GRPO's

#: name -> configuration of every on-policy setup under test.
ONPOLICY: dict[str, OnPolicyConfig] = {
    "dvpo_gvm": _config(DVPOModule, value_model=GVM, advantage=gvm_bootstrap("final_value")),
    "dvpo_zero": _config(DVPOModule, value_model=GVM, advantage=gvm_bootstrap("zero")),
    "dvpo_lora": _config(DVPOModule, lora=True, value_model=GVM),
    "dvpo_gpt2": _config(DVPOModule, arch=TINY_GPT2, value_model=GVM),
    "dvpo_gold": _config(DVPOModule, gold_values=True),
    "ppo": _config(PPOModule, reward_model=REWARD_MODEL),
    "ppo_frozen_critic": _config(PPOModule, reward_model=REWARD_MODEL, train_critic=False),
    "rto": _config(RTOModule, reward_model=REWARD_MODEL, dpo_model=DPO_MODEL, beta1=0.5),
    "rto_without_dpo": _config(RTOModule, reward_model=REWARD_MODEL, beta1=0.0),
    "rto_rs_ppo": _config(
        RTOModule, reward_model=REWARD_MODEL, dpo_model=DPO_MODEL, beta1=0.5, shaping="rs-ppo"
    ),
    "ppo_gvm_critic": _config(PPOModule, reward_model=REWARD_MODEL, critic=GVM),
    "ppo_critic_warmup": _config(
        PPOModule, reward_model=REWARD_MODEL, critic=GVM, critic_warmup_iterations=1
    ),
    "grpo": _config(CriticFreeModule, reward_model=REWARD_MODEL, ppo={**GROUPS, **KL_IN_LOSS}),
    "dr_grpo": _config(
        CriticFreeModule,
        reward_model=REWARD_MODEL,
        advantage=AdvantageConfig("grpo", {"scale_by_std": False}),
        ppo=GROUPS,
    ),
    "gvm_grpo": _config(CriticFreeModule, value_model=GVM, ppo={**GROUPS, **KL_IN_LOSS}),
    "rloo": _config(
        CriticFreeModule, reward_model=REWARD_MODEL, advantage=AdvantageConfig("rloo"), ppo=GROUPS
    ),
    "reinforce_pp": _config(
        CriticFreeModule,
        reward_model=REWARD_MODEL,
        advantage=AdvantageConfig("reinforce", {"group_baseline": True}),
        ppo=GROUPS,
    ),
    "dvpo_adaptive_kl": _config(
        DVPOModule, value_model=GVM, ppo={"kl_controller": "adaptive", "kl_target": 1.0, "kl_horizon": 10}
    ),
}


def build_onpolicy(
    name: str, tokenizer, exports: OnPolicyExports, optim: OptimConfig | None = None, **ppo
) -> OnPolicyModule:
    return ONPOLICY[name].build(tokenizer, exports, optim, **ppo)


# ---------------------------------------------------------------------------------------------------- fits
@dataclass
class Run:
    """A configuration after one RL iteration (the `runs` fixture of tests/modules)."""

    module: OnPolicyModule
    trainer: pl.Trainer
    before: dict[str, torch.Tensor]  # every parameter before training, by name


def top_level(names) -> set[str]:
    return {name.split(".", 1)[0] for name in names}


def assert_trains_only_what_it_should(run: Run, trained: set[str], frozen: set[str]) -> None:
    """One RL iteration of two optimiser steps moved every parameter of the models `trained` and left every
    parameter of the models `frozen` bit-identical (a LoRA policy is in both: its base weights are frozen), and
    the frozen models stay in eval mode."""
    assert run.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 1  # one RL iteration
    assert run.trainer.global_step == 2  # of two PPO epochs, one optimiser step each
    parameters = dict(run.module.named_parameters())
    trainable = [key for key, parameter in parameters.items() if parameter.requires_grad]
    frozen_keys = [key for key, parameter in parameters.items() if not parameter.requires_grad]
    assert (top_level(trainable), top_level(frozen_keys)) == (trained, frozen)
    assert [key for key in trainable if torch.equal(parameters[key], run.before[key])] == []
    assert [key for key in frozen_keys if not torch.equal(parameters[key], run.before[key])] == []
    run.module.train()  # as a strategy or user code may: frozen models must stay in eval mode
    for model_name in run.module.frozen_models:
        model = getattr(run.module, model_name, None)
        if model is not None:
            assert not model.training, f"frozen {model_name} left eval mode"


# ------------------------------------------------------------------------------------------------ rollouts
# The hand-built rollout: four rows with prompts of 3, 5, 2 and 4 tokens and responses of 4, 1, 3 and 5 tokens.
# Rows 0 and 2 end with EOS (counted in their length); row 3 is unfinished and fills the response block.
PROMPT_LENGTHS = (3, 5, 2, 4)
RESPONSE_LENGTHS = (4, 1, 3, 5)
FINISHED = (True, False, True, False)


def hand_built_rollout(tokenizer) -> Responses:
    """The rollout above in the split layout, with seeded ordinary tokens (never pad, nor EOS before the end)."""
    ordinary = torch.tensor(
        [index for index in range(len(tokenizer)) if index not in tokenizer.all_special_ids]
    )
    generator = torch.Generator().manual_seed(0)

    def words(count: int) -> list[int]:
        return ordinary[torch.randint(len(ordinary), (count,), generator=generator)].tolist()

    prompts = [words(length) for length in PROMPT_LENGTHS]
    responses = [
        words(length - 1) + [tokenizer.eos_token_id] if ended else words(length)
        for length, ended in zip(RESPONSE_LENGTHS, FINISHED)
    ]
    prompt_ids, prompt_mask = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    response_ids, response_mask = pad_sequences(responses, tokenizer.pad_token_id, "right")
    return Responses(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(FINISHED))


# Position ids count real tokens from 0, so V(s_t), read before response token t, is at position
# (prompt length - 1 + t), and the complete response at its last real token, position
# (prompt length - 1 + response length).
STATE_POSITIONS = [[2, 3, 4, 5], [4], [1, 2, 3], [3, 4, 5, 6, 7]]
FINAL_POSITIONS = [6, 5, 4, 8]


def assert_state_positions(values: torch.Tensor, offset: float = 0.0) -> None:
    """`values [B, >= R]` of the hand-built rollout are `PositionValues`' (plus `offset`) read before each token."""
    for row, expected in enumerate(STATE_POSITIONS):
        assert values[row, : len(expected)].tolist() == [position + offset for position in expected]


def pad_rollout(responses: Responses, pad_id: int, left: int = 3, right: int = 2) -> Responses:
    """The same rollout with `left` more padding columns before the prompts and `right` more after the responses."""
    size = len(responses.finished)
    return Responses(
        torch.cat([torch.full((size, left), pad_id), responses.prompt_input_ids], dim=1),
        torch.cat([torch.zeros(size, left, dtype=torch.bool), responses.prompt_attention_mask], dim=1),
        torch.cat([responses.response_input_ids, torch.full((size, right), pad_id)], dim=1),
        torch.cat([responses.response_mask, torch.zeros(size, right, dtype=torch.bool)], dim=1),
        responses.finished,
    )


def row_alone(responses: Responses, row: int) -> Responses:
    """Row `row` as a batch of one, without any padding."""
    prompt = responses.prompt_attention_mask[row]
    response = responses.response_mask[row]
    return Responses(
        responses.prompt_input_ids[row][prompt][None],
        prompt[prompt][None],
        responses.response_input_ids[row][response][None],
        response[response][None],
        responses.finished[row : row + 1],
    )


# ---------------------------------------------------------------------------------------------- stand-ins
class PositionValues(nn.Module):
    """A value model whose output at each position is that position's id (plus `offset`): values show where
    they were read."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    def forward(self, input_ids, attention_mask, position_ids, **unused):
        return SimpleNamespace(logits=position_ids.float().unsqueeze(-1) + self.offset)  # [B, L, 1]


class ScriptedPolicy(nn.Module):
    """A policy whose `generate` appends the fixed `continuation [B, N]` and records each call's settings."""

    def __init__(self, continuation: torch.Tensor):
        super().__init__()
        self.continuation = continuation
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **settings):
        self.calls.append({"training": self.training, **settings})
        return torch.cat([input_ids, self.continuation], dim=1)


def bias_logits(policy: nn.Module, biases: dict[int, float]) -> None:
    """Add `biases[token]` to the policy's logit of each token (a forward hook on the LM head)."""
    bias = torch.zeros(policy.get_output_embeddings().out_features)
    for token, value in biases.items():
        bias[token] = value
    policy.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits + bias)


def perturb(model: nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add seeded noise to every parameter of `model`, so that it no longer equals the reference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
