"""The walkthroughs of docs/design.md ("Extending") hold: a new advantage estimator, policy loss and rollout backend
are each one registered function, which a config then names, with no other file touched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvpo_lightning.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    aggregate_loss,
    kl_penalty,
    masked_mean,
    masked_sum,
    register_advantage,
    register_policy_loss,
)
from dvpo_lightning.cli import main
from dvpo_lightning.models import build_policy, export_model
from dvpo_lightning.rl import ROLLOUT_BACKENDS, AdvantageConfig, SamplingConfig, register_rollout_backend
from dvpo_lightning.rl.rollout import hf_generate
from tests.helpers.stages import export_random_value_model, tiny, topics_data

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CALLS = {"estimator": 0, "backend": 0, "scale": None, "loss": 0, "loss_scale": None}


def sign_of_score(*, token_rewards, values, mask, gamma, lam, group_size, scale=1.0):
    """A toy critic-free estimator: +scale on every token of a response that beats its group's mean, else -scale."""
    rewards = masked_sum(token_rewards, mask, dim=-1).view(-1, group_size)  # [B / k, k]
    sign = torch.where(rewards > rewards.mean(dim=-1, keepdim=True), scale, -scale).reshape(-1, 1)
    CALLS["estimator"] += 1
    CALLS["scale"] = scale
    return torch.where(mask.bool(), sign, 0.0), torch.where(mask.bool(), rewards.reshape(-1, 1), 0.0)


def unclipped(*, logprobs, old_logprobs, advantages, mask, mode="token-mean", normalizers=None, scale=1.0):
    """A toy policy loss: the surrogate without PPO's clip."""
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, 0))  # [B, T], 1 on padding
    loss = aggregate_loss(-scale * advantages * ratio, mask, mode, normalizers)
    CALLS["loss"] += 1
    CALLS["loss_scale"] = scale
    return loss, {"approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs.detach(), "k3", mask), mask)}


def counting_generate(*args):
    CALLS["backend"] += 1
    return hf_generate(*args)


def test_a_registered_estimator_and_rollout_backend_train_from_a_config(tmp_path, monkeypatch):
    tokenizer = topics_data(tmp_path / "cache").tokenizer
    policy = export_model(build_policy(tiny(), tokenizer), tokenizer, str(tmp_path / "sft"))
    reward_model = export_random_value_model(tmp_path / "rm", tokenizer)
    register_advantage("sign_of_score")(sign_of_score)
    register_rollout_backend("counting")(counting_generate)
    register_policy_loss("unclipped")(unclipped)
    monkeypatch.chdir(tmp_path)
    try:
        main(
            [
                "fit",
                "--config=" + str(CONFIGS / "grpo.yaml"),
                f"--model.init_args.policy.name_or_path={policy}",
                f"--model.init_args.reward_model.name_or_path={reward_model}",
                f"--data.init_args.tokenizer={policy}",
                "--model.init_args.advantage.estimator=sign_of_score",
                "--model.init_args.advantage.options={scale: 0.5}",
                "--model.init_args.sampling.backend=counting",
                "--model.init_args.ppo.policy_loss=unclipped",
                "--model.init_args.ppo.policy_loss_options={scale: 0.5}",
                "--model.init_args.eval_sampling=null",
                "--trainer.max_steps=4",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.builtin_size=100",
                "--data.init_args.val_size=10",
                "--data.init_args.batch_size=4",
                f"--trainer.default_root_dir={tmp_path / 'run'}",
            ]
        )
    finally:
        ADVANTAGE_ESTIMATORS.unregister("sign_of_score")
        ROLLOUT_BACKENDS.unregister("counting")
        POLICY_LOSSES.unregister("unclipped")
    # two iterations of 16 responses (4 prompts x 4), each 2 optimiser steps (2 epochs, one mini-batch); the estimator
    # also ran once at start-up, where the module checks it against the run's settings
    # the policy loss: on every micro-batch (2 iterations x 2 steps), besides the config's checks on one token
    losses = CALLS.pop("loss")
    assert CALLS == {"estimator": 3, "backend": 2, "scale": 0.5, "loss_scale": 0.5} and losses >= 4
    start, trained = (
        load_file(f"{policy}/model.safetensors"),
        load_file(tmp_path / "run/model/model.safetensors"),
    )
    assert max(float((trained[key] - start[key]).abs().max()) for key in start) > 0


def test_an_unknown_backend_or_estimator_option_is_refused_at_construction_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown rollout backend 'vllm'; known: compiled, generate"):
        SamplingConfig(backend="vllm")
    with pytest.raises(
        ValueError, match=r"\['scale_by_mean'\] are not options of the 'grpo' estimator; its options: "
    ):
        AdvantageConfig("grpo", {"scale_by_mean": True})
