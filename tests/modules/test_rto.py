"""RTO (`RTOModule`): what an iteration trains and keeps frozen, with DPO token rewards, without them, and with
RS-PPO shaping, and the checks of RTO's options.
"""

from __future__ import annotations

import pytest

from dvpo_lightning.modules import RTOModule
from tests.helpers.onpolicy import assert_trains_only_what_it_should
from tests.helpers.stages import tiny

#: RTO configurations, and the models each one trains and keeps frozen.
MODELS = {
    "rto": ({"policy", "critic_model"}, {"reference", "reward_model", "dpo_model"}),
    "rto_without_dpo": ({"policy", "critic_model"}, {"reference", "reward_model"}),
    "rto_rs_ppo": ({"policy", "critic_model"}, {"reference", "reward_model", "dpo_model"}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_one_iteration_moves_every_trainable_parameter_and_no_frozen_one(name, runs):
    assert_trains_only_what_it_should(runs(name), *MODELS[name])


@pytest.mark.parametrize(
    "make, option",
    [
        (lambda: RTOModule(policy=tiny(), reward_model=tiny(), beta1=0.1), "dpo_model"),
        (lambda: RTOModule(policy=tiny(), reward_model=tiny(), beta1=0.0, shaping="reward"), "shaping"),
    ],
    ids=["rto_beta1_without_dpo_model", "rto_unknown_shaping"],
)
def test_bad_rto_options_fail_at_construction_naming_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()
