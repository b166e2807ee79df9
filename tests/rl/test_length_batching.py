"""Length-aware batching: rows of similar lengths share a forward pass, and no number changes.

- `RLHFDataModule(group_by_length=True)` (`LengthGroupedShuffle`): the same rows every epoch, less padding, and the
  same per-row losses (DPO, SFT) as ungrouped batches.
- `ExperienceMaker.in_blocks`: scoring blocks of rows sorted by length, each trimmed of the padding its rows do not
  need, give the experience of the whole unsorted rollout.
- `PPOUpdate.micro_batches`: a mini-batch's micro-batches hold rows of similar lengths.
"""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.algos import bradley_terry_loss
from dvpo_lightning.data.resumable import EpochShuffle, LengthGroupedShuffle
from dvpo_lightning.models import build_policy, build_value_model, value_head
from dvpo_lightning.modules import DPOModule, RewardModelModule, SFTModule
from dvpo_lightning.rl import (
    AdvantageConfig,
    DPOTokenReward,
    ExperienceMaker,
    PPOConfig,
    PPOUpdate,
    Scorers,
    SequenceValue,
    StateValues,
    pair_sequences,
)
from tests.helpers.onpolicy import hand_built_rollout, pad_rollout, perturb
from tests.helpers.stages import tiny, topics_data

PER_TOKEN = ("old_logprobs", "ref_logprobs", "kl", "values", "token_rewards", "advantages", "returns")

# ------------------------------------------------------------------------------------------------- the sampler
LENGTHS = torch.randint(1, 200, (203,), generator=torch.Generator().manual_seed(0)).tolist()


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    """Tokens a loader of `batch_size` computes in `order`, padding included."""
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return sum(len(batch) * max(lengths[index] for index in batch) for batch in batches)


def test_length_grouped_shuffle_draws_every_row_once_in_batches_of_similar_lengths():
    sampler = LengthGroupedShuffle(LENGTHS, batch_size=8, seed=3, mega_batches=5)
    order = list(sampler)
    assert sorted(order) == list(range(len(LENGTHS)))
    assert order == list(sampler)  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == sorted(order)
    shuffled = list(EpochShuffle(LENGTHS, seed=3))
    assert padded_tokens(order, LENGTHS, 8) < 0.8 * padded_tokens(shuffled, LENGTHS, 8)
    # Mega-batches of 5 x 8 rows: batches of similar lengths; the last 3 rows (the 6th mega-batch) come last.
    spreads = [
        max(LENGTHS[index] for index in order[start : start + 8])
        - min(LENGTHS[index] for index in order[start : start + 8])
        for start in range(0, 200, 8)
    ]
    assert sorted(spreads)[12] < 60  # the median batch spans < 60 tokens (random batches of 8: ~150)
    assert sorted(order[-3:]) == sorted(
        torch.randperm(203, generator=torch.Generator().manual_seed(3))[-3:].tolist()
    )


def test_prompt_and_response_lengths_are_grouped_on_both_blocks():
    """A split-layout batch is as wide as its longest prompt plus its longest response: grouping rows on both lengths
    pads less than grouping them on their total."""
    generator = torch.Generator().manual_seed(1)
    pairs = torch.randint(1, 200, (400, 2), generator=generator).tolist()  # (prompt, response) lengths

    def split_layout_tokens(order: list[int]) -> int:
        batches = [order[start : start + 8] for start in range(0, len(order), 8)]
        return sum(
            8 * (max(pairs[i][0] for i in batch) + max(pairs[i][1] for i in batch)) for batch in batches
        )

    both = list(LengthGroupedShuffle(pairs, batch_size=8, seed=0))
    total = list(
        LengthGroupedShuffle([prompt + response for prompt, response in pairs], batch_size=8, seed=0)
    )
    assert sorted(both) == list(range(400))
    assert split_layout_tokens(both) < 0.9 * split_layout_tokens(total)


def test_the_shuffled_batches_do_not_trend_in_length():
    order = list(LengthGroupedShuffle(LENGTHS, batch_size=4, seed=0, mega_batches=50))
    longest = [max(LENGTHS[index] for index in order[start : start + 4]) for start in range(0, 200, 4)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


# ----------------------------------------------------------------------------------------- the data module
@pytest.fixture(scope="module")
def datas(cache):
    """The built-in pairs as pair and SFT batches, ungrouped and length-grouped."""
    made = {}
    for mode in ("pairs", "sft"):
        for grouped in (False, True):
            data = topics_data(cache, mode=mode, size=120, batch_size=8)
            data.group_by_length = grouped
            data.setup("fit")
            made[mode, grouped] = data
    return made


def row_order(data) -> list[int]:
    return [index for batch in data.train_dataloader() for index in batch["index"].tolist()]


@pytest.mark.parametrize("mode", ["pairs", "sft"])
def test_grouped_batches_hold_the_same_rows_with_less_padding(datas, mode):
    plain, grouped = datas[mode, False], datas[mode, True]
    assert sorted(row_order(grouped)) == sorted(row_order(plain))
    assert row_order(grouped) != row_order(plain)

    def padded(data) -> int:
        widths = 0
        for batch in data.train_dataloader():
            response = batch["chosen_mask"] if mode == "pairs" else batch["response_mask"]
            widths += batch["prompt_attention_mask"].numel() + response.numel()
        return widths

    assert padded(grouped) < padded(plain)


@torch.no_grad()
def per_row_losses(module, data) -> dict[int, float]:
    """Each row's loss in the batches `data` draws: DPO's or the reward model's loss of a pair, or the summed NLL
    of a response."""
    losses = {}
    for batch in data.train_dataloader():
        if isinstance(module, DPOModule):
            values = module.pair_losses(batch, "train")[0].losses
        elif isinstance(module, RewardModelModule):
            chosen, rejected = module.pair_scores(pair_sequences(batch))
            values = bradley_terry_loss(chosen, rejected)[0]
        else:
            nll, mask = module._token_nll(batch)
            values = (nll * mask).sum(-1)
        losses.update(zip(batch["index"].tolist(), values.tolist()))
    return losses


@pytest.mark.parametrize("stage", ["dpo", "reward_model", "sft"])
def test_grouped_batches_give_every_row_the_loss_of_ungrouped_ones(datas, tokenizer, stage):
    if stage == "dpo":
        module = DPOModule(policy=tiny(), reference=tiny(init_seed=1), tokenizer=tokenizer)
    elif stage == "reward_model":
        module = RewardModelModule(model=tiny(), tokenizer=tokenizer)
    else:
        module = SFTModule(policy=tiny(), tokenizer=tokenizer)
    module.configure_model()
    if stage == "reward_model":  # a zero-initialised head would score every response 0
        value_head(module.reward_model).weight.data.normal_(
            std=0.5, generator=torch.Generator().manual_seed(0)
        )
    mode = "sft" if stage == "sft" else "pairs"
    plain, grouped = per_row_losses(module, datas[mode, False]), per_row_losses(module, datas[mode, True])
    assert plain.keys() == grouped.keys()
    assert [grouped[index] for index in plain] == pytest.approx(list(plain.values()), rel=1e-5, abs=1e-6)
    assert len({round(loss, 4) for loss in plain.values()}) > 10  # the rows' losses differ: a real comparison


# ----------------------------------------------------------------------------------------- scoring blocks
@pytest.fixture(scope="module")
def maker_parts(tokenizer):
    policy, reference, dpo_model = (build_policy(tiny(init_seed=seed), tokenizer) for seed in (0, 0, 3))
    perturb(policy)
    value_models = []
    for seed in (7, 11):
        model = build_value_model(tiny(init_seed=seed), tokenizer)
        with torch.no_grad():
            value_head(model).weight.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
        value_models.append(model.eval())
    gvm, reward_model = value_models
    scorers = Scorers(
        score=SequenceValue(reward_model),
        dense=(DPOTokenReward(dpo_model.eval(), beta1=0.5, clip=None, temperature=1.0),),
        values=StateValues(gvm),
    )
    return policy.eval(), reference.eval(), scorers


def make(maker_parts, responses, scoring_batch_size):
    policy, reference, scorers = maker_parts
    ppo = PPOConfig(scoring_batch_size=scoring_batch_size, kl_coef=0.1)
    return ExperienceMaker(policy, reference, scorers, ppo, AdvantageConfig("gae"), lambda: 0.1).make(
        responses
    )


@pytest.mark.parametrize("scoring_batch_size", [1, 2, 3])
def test_sorted_trimmed_scoring_blocks_give_the_experience_of_the_whole_rollout(
    maker_parts, tokenizer, scoring_batch_size
):
    rollout = pad_rollout(hand_built_rollout(tokenizer), tokenizer.pad_token_id, left=3, right=2)
    whole = make(maker_parts, rollout, None)
    blocks = make(maker_parts, rollout, scoring_batch_size)
    mask = rollout.response_mask
    for name in PER_TOKEN:
        torch.testing.assert_close(getattr(blocks, name)[mask], getattr(whole, name)[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(blocks.reward, whole.reward, rtol=0, atol=1e-5)
    assert blocks.values.shape == whole.values.shape == mask.shape


def test_scoring_blocks_hold_rows_of_similar_lengths_trimmed_of_padding(maker_parts, tokenizer):
    rollout = pad_rollout(hand_built_rollout(tokenizer), tokenizer.pad_token_id, left=3, right=2)
    policy, reference, scorers = maker_parts
    maker = ExperienceMaker(
        policy, reference, scorers, PPOConfig(scoring_batch_size=2), AdvantageConfig(), float
    )
    seen = []

    def spy(block, rows):
        seen.append((rows.tolist(), block.prompt_input_ids.shape[1], block.response_length))
        return block.response_mask.float()  # [b, w]

    result = maker.in_blocks(rollout, spy)
    # total lengths 3+4, 5+1, 2+3, 4+5: rows 2 and 1 (5 and 6 tokens), then 0 and 3 (7 and 9)
    assert seen == [([2, 1], 5, 3), ([0, 3], 4, 5)]
    assert torch.equal(result, rollout.response_mask.float())  # back in row order, widened to the rollout


def test_micro_batches_hold_rows_of_similar_lengths(maker_parts, tokenizer):
    experience = make(maker_parts, hand_built_rollout(tokenizer), None)
    rows = torch.tensor([3, 0, 2, 1])
    micro = PPOUpdate.micro_batches(experience, rows, 2)
    assert [batch.tolist() for batch in micro] == [[2, 1], [0, 3]]  # 5, 6 | 7, 9 tokens


def test_one_block_and_one_micro_batch_keep_the_rollouts_order(maker_parts, tokenizer):
    """Sorting a single block or micro-batch trims nothing and would only reorder sums: the configs' defaults (one
    scoring block, micro-batch = mini-batch) keep their numbers bit for bit."""
    rollout = hand_built_rollout(tokenizer)
    policy, reference, scorers = maker_parts
    maker = ExperienceMaker(policy, reference, scorers, PPOConfig(), AdvantageConfig(), float)
    assert [rows.tolist() for rows in maker.blocks(rollout)] == [[0, 1, 2, 3]]
    experience = make(maker_parts, rollout, None)
    rows = torch.tensor([3, 0, 2, 1])
    assert [batch.tolist() for batch in PPOUpdate.micro_batches(experience, rows, 4)] == [[3, 0, 2, 1]]
