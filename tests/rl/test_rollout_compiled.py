"""The `compiled` rollout backend (`rl.compiled_rollout`): greedy decoding gives `generate`'s tokens, sampling keeps
every guarantee of `generate` (no pad, cut after the first EOS, min_new_tokens, top-k / top-p), batches of one
bucket reuse one graph, and a run logs the compile time apart from its generation time.

Most tests compile with dynamo's "eager" backend: the same graph capture (full graph, static shapes, the same
guards and recompilations) without inductor's code generation, which takes tens of seconds on a CPU; the slow test
runs inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch._dynamo.testing import CompileCounter

from dvpo_lightning.models import LoraSpec, ModelSpec, build_policy
from dvpo_lightning.modules import DVPOModule, PPOConfig
from dvpo_lightning.rl import SamplingConfig, generate_responses, warmup_seconds
from dvpo_lightning.rl.compiled_rollout import bucket_length, bucket_rows
from tests.helpers.onpolicy import bias_logits, hand_built_rollout, perturb
from tests.helpers.stages import TINY_GPT2, quick_trainer, tiny, topics_data


def compiled(compile_backend="eager", **settings) -> SamplingConfig:
    return SamplingConfig(
        backend="compiled", backend_options={"compile_backend": compile_backend}, **settings
    )


def prompts(tokenizer, copies: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of 3, 5, 2 and 4 tokens `[4 * copies, 5]`."""
    rollout = hand_built_rollout(tokenizer)
    return rollout.prompt_input_ids.repeat(copies, 1), rollout.prompt_attention_mask.repeat(copies, 1)


SPECS = {"llama": tiny(), "gpt2": ModelSpec(arch=dict(TINY_GPT2)), "lora": tiny(lora=LoraSpec(r=4, alpha=8))}


@pytest.fixture(scope="module", params=sorted(SPECS))
def policy(request, tokenizer):
    """A tiny policy whose responses end at different steps (EOS slightly favoured)."""
    policy = build_policy(SPECS[request.param], tokenizer)
    if request.param == "lora":
        perturb(policy)  # adapters that are not zero: they take part in every step
    bias_logits(policy, {tokenizer.eos_token_id: 0.3})
    return policy


@pytest.mark.parametrize("min_new_tokens", [0, 3])
def test_greedy_tokens_equal_generates(policy, tokenizer, min_new_tokens):
    ids, mask = prompts(tokenizer, copies=2)
    settings = dict(max_new_tokens=8, min_new_tokens=min_new_tokens, do_sample=False)
    expected = generate_responses(policy, ids, mask, SamplingConfig(**settings), tokenizer)
    actual = generate_responses(policy, ids, mask, compiled(**settings), tokenizer)
    assert expected.response_input_ids.shape[1] > 1  # some row decodes several steps
    assert torch.equal(actual.response_input_ids, expected.response_input_ids)
    assert torch.equal(actual.response_mask, expected.response_mask)
    assert torch.equal(actual.finished, expected.finished)
    assert torch.equal(actual.prompt_input_ids, ids) and torch.equal(actual.prompt_attention_mask, mask)


@pytest.mark.slow
def test_greedy_tokens_equal_generates_with_inductor(tokenizer):
    policy = build_policy(tiny(), tokenizer)
    bias_logits(policy, {tokenizer.eos_token_id: 0.3})
    ids, mask = prompts(tokenizer)
    settings = dict(max_new_tokens=8, min_new_tokens=2, do_sample=False)
    expected = generate_responses(policy, ids, mask, SamplingConfig(**settings), tokenizer)
    actual = generate_responses(policy, ids, mask, compiled("inductor", **settings), tokenizer)
    assert torch.equal(actual.response_input_ids, expected.response_input_ids)
    assert torch.equal(actual.response_mask, expected.response_mask)


def test_sampled_responses_hold_no_padding_end_at_their_first_eos_and_respect_min_new_tokens(tokenizer):
    policy = build_policy(tiny(), tokenizer)
    bias_logits(
        policy, {tokenizer.pad_token_id: 10.0, tokenizer.eos_token_id: 2.5}
    )  # it would rather pad or stop
    ids, mask = prompts(tokenizer, copies=4)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    responses = generate_responses(policy, ids, mask, compiled(max_new_tokens=6, min_new_tokens=2), tokenizer)
    response, finished, lengths = responses.response_input_ids, responses.finished, responses.lengths
    assert finished.any() and not finished.all()
    assert torch.equal(responses.response_mask, torch.arange(response.shape[1]) < lengths[:, None])
    real = responses.response_mask
    assert (response[real] != pad).all(), "the pad token was sampled"
    assert (response[~real] == pad).all()
    assert torch.equal(((response == eos) & real).sum(-1), finished.long())  # EOS only at the end
    assert (lengths[finished] >= 3).all()  # no EOS among the first min_new_tokens = 2 tokens
    assert (lengths[~finished] == 6).all()


@pytest.mark.parametrize("warper", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_and_top_p_are_applied(policy, tokenizer, warper):
    """Keeping only the most likely token samples greedily: the warpers run, after the temperature."""
    ids, mask = prompts(tokenizer)
    greedy = generate_responses(
        policy, ids, mask, SamplingConfig(max_new_tokens=8, do_sample=False), tokenizer
    )
    torch.manual_seed(0)
    sampled = generate_responses(
        policy, ids, mask, compiled(max_new_tokens=8, temperature=0.7, **warper), tokenizer
    )
    assert torch.equal(sampled.response_input_ids, greedy.response_input_ids)


def test_batches_of_one_bucket_share_one_graph(tokenizer):
    policy = build_policy(tiny(), tokenizer)  # no EOS bias: every rollout decodes all 8 tokens
    counter = CompileCounter()
    sampling = compiled(counter, max_new_tokens=8, min_new_tokens=8)
    ids, mask = prompts(tokenizer, copies=2)  # [8, 5]: 8 rows, 5 + 8 tokens -> 16 cache positions

    def roll(rows: int, extra_padding: int = 0) -> None:
        padding = torch.full((rows, extra_padding), tokenizer.pad_token_id)
        generate_responses(
            policy,
            torch.cat([padding, ids[:rows]], 1),
            torch.cat([padding.bool() & False, mask[:rows]], 1),
            sampling,
            tokenizer,
        )

    for rows, extra_padding in [(8, 0), (6, 0), (5, 3), (7, 2)]:  # rows -> 8, positions -> 16
        roll(rows, extra_padding)
    assert counter.frame_count == 1
    roll(4)  # rows -> 4: a new bucket
    roll(8, 4)  # 17 positions -> 32: another
    roll(3, 1)  # back to the first two buckets: compiled already
    roll(8, 10)
    assert counter.frame_count == 3


def test_buckets():
    assert [bucket_rows(rows) for rows in (1, 2, 3, 5, 8, 9, 16, 17, 30)] == [1, 2, 4, 8, 8, 16, 16, 24, 32]
    assert [bucket_length(length) for length in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_an_unknown_backend_option_is_named():
    with pytest.raises(
        ValueError, match=r"backend_options \['mode'\].*'compiled'.*compile_backend, compile_mode"
    ):
        SamplingConfig(backend="compiled", backend_options={"mode": "max-autotune"})
    with pytest.raises(ValueError, match="options: none"):
        SamplingConfig(backend_options={"compile_mode": "default"})


class PhaseSeconds(Callback):
    def __init__(self) -> None:
        self.iterations: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.iterations.append(dict(pl_module.phase_seconds))


def test_a_run_logs_the_compile_time_apart_from_the_generation_time(tokenizer, cache, tmp_path):
    module = DVPOModule(
        policy=tiny(),
        value_model=tiny(),
        sampling=compiled(max_new_tokens=4, min_new_tokens=4),
        ppo=PPOConfig(ppo_epochs=1),
        tokenizer=tokenizer,
    )
    phases = PhaseSeconds()
    trainer = quick_trainer(tmp_path, max_steps=2, callbacks=[phases])
    trainer.fit(module, datamodule=topics_data(cache, batch_size=4))
    first, second = phases.iterations
    assert first["compile"] > 0 and first["generate"] > 0
    assert "compile" not in second and second["generate"] > 0  # compiled once, for both iterations
    assert warmup_seconds(module.policy) == pytest.approx(first["compile"])


def test_a_sharded_policy_is_refused_naming_the_option(tokenizer):
    from torch.distributed.fsdp import FSDPModule

    policy = build_policy(tiny(), tokenizer)
    policy.__class__ = type(
        "FSDPPolicy", (FSDPModule, type(policy)), {}
    )  # what `fully_shard` does to a model
    ids, mask = prompts(tokenizer)
    with pytest.raises(
        ValueError, match="sampling.backend=compiled cannot compile a policy sharded with FSDP"
    ):
        generate_responses(policy, ids, mask, compiled(max_new_tokens=2), tokenizer)


def test_the_static_caches_of_the_two_buckets_used_last_are_kept(tokenizer):
    from dvpo_lightning.rl.compiled_rollout import _DECODERS

    policy = build_policy(tiny(), tokenizer)
    ids, mask = prompts(tokenizer, copies=2)
    sampling = compiled(max_new_tokens=2, min_new_tokens=2)
    kept = []
    for rows in (8, 4, 8, 2):  # buckets of 8, 4, 8 and 2 rows
        generate_responses(policy, ids[:rows], mask[:rows], sampling, tokenizer)
        kept.append(_DECODERS[policy].caches.get((8, 16)))
    assert kept[0] is kept[2] is kept[3] is not None  # reused: the same tensors, which CUDA graphs replay on
    assert list(_DECODERS[policy].caches) == [(8, 16), (2, 16)]  # the 4-row one was freed
