"""The terminal reward of each trajectory of a preference pair: what a value model (DVPO's GVM) is trained towards.

"preference" gives the chosen response `+preference_reward` and the rejected one `-preference_reward`; "score"
takes the data's `chosen_score` / `rejected_score` columns; "reward_model" a frozen reward model's score of each
response. Also which states a GVM fits, and the checks of how its values are read (`value_form`).
"""

from __future__ import annotations

import torch
from torch import nn

from dvpo_lightning.algos import last_token_mask, subset_return_values
from dvpo_lightning.models import VALUE_FORMS
from dvpo_lightning.rl.forward import final_values, state_mask, state_values
from dvpo_lightning.rl.sequences import Sequences

TERMINAL_REWARDS = ("preference", "score", "reward_model")


def check_terminal_reward(terminal_reward: str, reward_model) -> None:
    """Refuse an unknown `terminal_reward`, or a `reward_model` given without terminal_reward='reward_model'."""
    if terminal_reward not in TERMINAL_REWARDS:
        raise ValueError(f"terminal_reward must be one of {TERMINAL_REWARDS}; got {terminal_reward!r}")
    if (terminal_reward == "reward_model") != (reward_model is not None):
        raise ValueError(
            "terminal_reward='reward_model' and `reward_model` go together: give the reward model's path "
            f"with it, and only with it (got terminal_reward={terminal_reward!r}, reward_model={reward_model})"
        )


def terminal_rewards(
    batch: dict,
    sequences: Sequences,
    terminal_reward: str,
    preference_reward: float = 1.0,
    reward_model: nn.Module | None = None,
) -> torch.Tensor:
    """Terminal reward `[2B]` of each trajectory of a pair batch (`sequences = pair_sequences(batch)`: chosen rows
    first, then rejected)."""
    if terminal_reward == "preference":
        size = batch["chosen_input_ids"].shape[0]
        sign = torch.cat([torch.ones(size), -torch.ones(size)]).to(sequences.response_mask.device)
        return preference_reward * sign
    if terminal_reward == "score":
        if "chosen_score" not in batch:
            raise ValueError(
                "terminal_reward='score' needs `chosen_score` and `rejected_score` columns in the data; "
                "this dataset has none (use terminal_reward='preference' or a reward model)"
            )
        return torch.cat([batch["chosen_score"], batch["rejected_score"]]).float()
    with torch.no_grad():
        return final_values(state_values(reward_model, sequences), sequences.response_mask)


def check_value_form(
    value_form: str, train_final_value: bool, final_consistency_weight: float, td_consistency_weight: float
) -> None:
    """Refuse an unknown `value_form` (`models.VALUE_FORMS`), or options that fit the states an "earned" GVM does not
    fit itself."""
    if value_form not in VALUE_FORMS:
        raise ValueError(f"GVMModule option value_form must be one of {VALUE_FORMS}; got {value_form!r}")
    if value_form != "earned":
        return
    if not train_final_value:
        raise ValueError(
            "GVMModule option value_form='earned' fits only the complete response's value: it needs "
            "train_final_value: true"
        )
    for name, weight in (
        ("final_consistency_weight", final_consistency_weight),
        ("td_consistency_weight", td_consistency_weight),
    ):
        if weight:
            raise ValueError(
                f"GVMModule option {name}={weight} fits each state's value to another's, but with "
                "value_form='earned' a state's value is the reward earned so far, not a prediction of the final "
                f"one: set {name}: 0"
            )


def check_trained_value_form(value_model: nn.Module, value_form: str, path: str | None) -> None:
    """Refuse to continue training a value model saved with another value form: its outputs mean something else."""
    trained_form = getattr(value_model.config, "dvpo_value_form", value_form)
    if trained_form != value_form:
        raise ValueError(
            f"GVMModule option value_form={value_form!r}, but the value model at {path!r} was trained with "
            f"value_form={trained_form!r}: its outputs mean something else; continue it with the same value_form"
        )


def fitted_states(response_mask: torch.Tensor, value_form: str, train_final_value: bool) -> torch.Tensor:
    """Mask `[B, R + 1]` of the states a GVM fits: s_1..s_T, the complete response by `train_final_value`; of an
    "earned" GVM, the complete response alone."""
    if value_form == "earned":
        return last_token_mask(state_mask(response_mask, include_final=True))
    return state_mask(response_mask, include_final=train_final_value)


def subset_fitted_values(
    values: torch.Tensor, response_mask: torch.Tensor, keep_probability: float
) -> torch.Tensor:
    """An earned GVM's values `[B, R + 1]` with the complete response's value summed over a fresh random subset of
    its tokens (`algos.subset_return_values`); as they are where every token is kept."""
    if keep_probability == 1:
        return values
    keep = torch.rand_like(values[:, 1:]) < keep_probability
    return subset_return_values(values, response_mask, keep, keep_probability)


def check_reward_subset(reward_subset_probability: float, value_form: str) -> None:
    """Refuse a subset probability outside (0, 1], or below 1 where the values are not sums of token rewards."""
    if not 0 < reward_subset_probability <= 1:
        raise ValueError(
            f"GVMModule option reward_subset_probability must be in (0, 1]; got {reward_subset_probability}"
        )
    if reward_subset_probability < 1 and value_form != "earned":
        raise ValueError(
            f"GVMModule option reward_subset_probability={reward_subset_probability} sums a subset of the token "
            f"rewards of value_form='earned'; value_form={value_form!r} has none: set reward_subset_probability: 1"
        )
