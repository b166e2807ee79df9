"""The terminal rewards a GVM is trained towards, from each kind of pair data."""

from __future__ import annotations

import pytest
import torch

from dvpo_lightning.rl import Sequences, check_terminal_reward, terminal_rewards


def pair_batch(size: int = 2, scores: bool = True) -> tuple[dict, Sequences]:
    batch = {"chosen_input_ids": torch.zeros(size, 3, dtype=torch.long)}
    if scores:
        batch |= {"chosen_score": torch.tensor([0.5, 2.0]), "rejected_score": torch.tensor([-1.0, 0.25])}
    mask = torch.ones(2 * size, 2, dtype=torch.bool)
    ids = torch.zeros(2 * size, 2, dtype=torch.long)
    return batch, Sequences(ids, mask, ids, mask)


def test_preference_rewards_are_plus_for_chosen_and_minus_for_rejected():
    batch, sequences = pair_batch()
    rewards = terminal_rewards(batch, sequences, "preference", preference_reward=2.0)
    assert rewards.tolist() == [2.0, 2.0, -2.0, -2.0]


def test_score_rewards_are_the_data_columns_chosen_first():
    batch, sequences = pair_batch()
    assert terminal_rewards(batch, sequences, "score").tolist() == [0.5, 2.0, -1.0, 0.25]


def test_score_rewards_without_score_columns_say_which_columns_are_missing():
    batch, sequences = pair_batch(scores=False)
    with pytest.raises(ValueError, match="chosen_score"):
        terminal_rewards(batch, sequences, "score")


@pytest.mark.parametrize(
    ("kind", "reward_model", "message"),
    [
        ("margin", None, "must be one of"),
        ("reward_model", None, "go together"),
        ("score", "rm", "go together"),
    ],
)
def test_an_unknown_kind_or_a_reward_model_without_its_kind_is_refused(kind, reward_model, message):
    with pytest.raises(ValueError, match=message):
        check_terminal_reward(kind, reward_model)
