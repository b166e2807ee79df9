"""Degenerate data in on-policy training: prompts without room for a response in the policy's context, batches
in which every prompt is dropped, and responses that never emit EOS are handled and logged, never a crash deep
inside a library.

The policy is a tiny GPT-2 with 16 learned positions: past them its position embedding fails with an index
error, so a prompt that is not dropped when it should be crashes the test.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from dvpo_lightning.models import ModelSpec
from dvpo_lightning.modules import DVPOModule, PPOConfig, SamplingConfig, SFTModule
from tests.helpers.onpolicy import bias_logits, export_frozen_models
from tests.helpers.stages import TINY_GPT2, quick_trainer, topics_data

CONTEXT = 16
SHORT_GPT2 = {**TINY_GPT2, "n_positions": CONTEXT}


@pytest.fixture(scope="module")
def gvm(tmp_path_factory, tokenizer) -> str:
    return export_frozen_models(tmp_path_factory.mktemp("exports"), tokenizer).gvm


def dvpo(tokenizer, gvm: str, max_new_tokens: int, **ppo) -> DVPOModule:
    return DVPOModule(
        policy=ModelSpec(arch=dict(SHORT_GPT2)),
        value_model=ModelSpec(name_or_path=gvm),
        sampling=SamplingConfig(max_new_tokens=max_new_tokens),
        ppo=PPOConfig(ppo_epochs=1, **ppo),
        tokenizer=tokenizer,
    )


class Rollouts(pl.Callback):
    """Per training batch: its prompt lengths and the rollout metrics logged for it."""

    def __init__(self) -> None:
        self.prompt_lengths: list[torch.Tensor] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompt_lengths.append(batch["prompt_attention_mask"].sum(-1))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({name: float(value) for name, value in trainer.callback_metrics.items()})


def test_prompts_without_room_for_a_response_are_dropped_and_counted(tmp_path, cache, tokenizer, gvm):
    module, rollouts = dvpo(tokenizer, gvm, max_new_tokens=8), Rollouts()
    trainer = quick_trainer(tmp_path, max_steps=3, callbacks=[rollouts])
    with pytest.warns(UserWarning, match=r"leave no room for a response of sampling.max_new_tokens=8 tokens"):
        trainer.fit(module, datamodule=topics_data(cache, size=60, batch_size=8))
    assert trainer.global_step == 3  # every batch still trained on the prompts that fit
    dropped = [int((lengths + 8 > CONTEXT).sum()) for lengths in rollouts.prompt_lengths]
    assert sum(dropped) > 0 and min(dropped) < 8  # the data has prompts on both sides of the limit
    assert [m["rollout/prompts_without_room"] for m in rollouts.metrics] == dropped


def test_a_batch_left_without_prompts_is_skipped_and_an_epoch_of_them_is_an_error(
    tmp_path, cache, tokenizer, gvm
):
    # 15 new tokens leave room for a prompt of one token; every prompt of the task is longer.
    module = dvpo(tokenizer, gvm, max_new_tokens=CONTEXT - 1)
    trainer = quick_trainer(tmp_path, max_steps=3)
    with pytest.warns(UserWarning, match=r"A rollout batch has no prompt with room .*: the batch is skipped"):
        with pytest.raises(
            ValueError, match=r"batches in a row \(an epoch's worth\) had no prompt with room .* lower data"
        ):
            trainer.fit(module, datamodule=topics_data(cache, size=60, batch_size=8))
    assert trainer.global_step == 0


def test_max_new_tokens_filling_the_context_is_refused_naming_the_option(tmp_path, cache, tokenizer, gvm):
    module = dvpo(tokenizer, gvm, max_new_tokens=CONTEXT)
    with pytest.raises(
        ValueError, match=r"sampling.max_new_tokens=16 leaves no room for a prompt .* 16 tokens"
    ):
        quick_trainer(tmp_path, max_steps=1).fit(module, datamodule=topics_data(cache, size=60))


def test_responses_that_never_emit_eos_are_scored_unfinished_with_the_penalty(
    tmp_path, cache, tokenizer, gvm
):
    module, rollouts = dvpo(tokenizer, gvm, max_new_tokens=6, missing_eos_penalty=1.0), Rollouts()
    module.configure_model()
    for model in (module.policy, module.reference):  # the same bias on both: the KL stays exactly 0
        bias_logits(model, {tokenizer.eos_token_id: -1e9})
    trainer = quick_trainer(tmp_path, max_steps=2, callbacks=[rollouts])
    with pytest.warns(
        UserWarning, match=r"No response of a rollout emitted EOS .* ppo.missing_eos_penalty=1.0"
    ):
        trainer.fit(module, datamodule=topics_data(cache, size=60))
    for metrics in rollouts.metrics:
        assert metrics["rollout/finished_rate"] == 0.0
        assert metrics["rollout/response_length"] == 6.0
    # The first rollout's reward is the penalty alone: the policy is still its reference (KL 0).
    assert rollouts.metrics[0]["rollout/token_reward_sum"] == -1.0
    assert trainer.global_step == 2


def test_offline_data_longer_than_the_model_context_is_refused_naming_the_options(tmp_path, tokenizer):
    data = topics_data(tmp_path / "cache", mode="sft")  # prompts <= 12 and responses <= 16 tokens: 28
    module = SFTModule(policy=ModelSpec(arch=dict(SHORT_GPT2)), tokenizer=tokenizer)
    trainer = quick_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"max_prompt_length=12 plus .*max_response_length=16 .* at most 16"):
        trainer.fit(module, datamodule=data)
