"""Each option that loads a model by path takes the exports of the stages it can use, read from the export's
lineage record: a mismatch is refused naming the option, the path and the stage found; a value model without a
record (a hub or foreign model) is taken with a warning that its stage is unknown."""

from __future__ import annotations

import json
import re

import pytest

from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.models.lineage import EXPORT_INFO
from dvpo_lightning.modules import CriticFreeModule, DVPOModule, PPOModule
from dvpo_lightning.rl import PPOConfig
from tests.helpers.stages import export_random_value_model, tiny

EXPORTED = {
    "SFTModule": "policy",
    "DPOModule": "policy",
    "RewardModelModule": "reward_model",
    "GVMModule": "value_model",
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer) -> dict[str, str]:
    """A tiny export of each stage, by stage name, and one without a lineage record ("foreign")."""
    root = tmp_path_factory.mktemp("stages")
    policy = build_policy(tiny(), tokenizer)
    paths = {}
    for stage, kind in EXPORTED.items():
        directory = root / stage
        if kind == "policy":
            export_model(policy, tokenizer, str(directory))
        else:
            export_random_value_model(directory, tokenizer)
        (directory / EXPORT_INFO).write_text(json.dumps({"stage": stage, "exported_model": kind}))
        paths[stage] = str(directory)
    paths["foreign"] = export_random_value_model(root / "foreign", tokenizer)
    return paths


def ppo(
    exports, tokenizer, reward_model: str, critic: str | None = None, policy: str = "SFTModule"
) -> PPOModule:
    return PPOModule(
        policy=ModelSpec(name_or_path=exports[policy]),
        reward_model=ModelSpec(name_or_path=exports[reward_model]),
        critic=ModelSpec(name_or_path=exports[critic]) if critic else None,
        tokenizer=tokenizer,
    )


def dvpo(exports, tokenizer, value_model: str) -> DVPOModule:
    return DVPOModule(
        policy=ModelSpec(name_or_path=exports["DPOModule"]),
        value_model=ModelSpec(name_or_path=exports[value_model]),
        tokenizer=tokenizer,
    )


def grpo(exports, tokenizer, reward_model: str) -> CriticFreeModule:
    return CriticFreeModule(
        policy=ModelSpec(name_or_path=exports["SFTModule"]),
        reward_model=ModelSpec(name_or_path=exports[reward_model]),
        ppo=PPOConfig(samples_per_prompt=2),
        tokenizer=tokenizer,
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda exports, tokenizer: ppo(
            exports, tokenizer, "RewardModelModule"
        ),  # the critic starts from the RM
        lambda exports, tokenizer: ppo(exports, tokenizer, "RewardModelModule", critic="GVMModule"),
        lambda exports, tokenizer: dvpo(exports, tokenizer, "GVMModule"),
        lambda exports, tokenizer: grpo(exports, tokenizer, "RewardModelModule"),
    ],
    ids=["ppo_critic_from_rm", "ppo_critic_from_gvm", "dvpo_gvm", "grpo_rm"],
)
def test_each_option_takes_the_stages_it_can_use(make, exports, tokenizer, recwarn):
    make(exports, tokenizer).check_model_sources()
    assert not [str(warning.message) for warning in recwarn if "stage" in str(warning.message)]


@pytest.mark.parametrize(
    "make, option, stage",
    [
        (lambda exports, tokenizer: grpo(exports, tokenizer, "GVMModule"), "reward_model", "GVMModule"),
        (
            lambda exports, tokenizer: dvpo(exports, tokenizer, "RewardModelModule"),
            "value_model",
            "RewardModelModule",
        ),
        (
            lambda exports, tokenizer: ppo(exports, tokenizer, "RewardModelModule", critic="SFTModule"),
            "critic",
            "SFTModule",
        ),
        (
            lambda exports, tokenizer: ppo(exports, tokenizer, "RewardModelModule", policy="GVMModule"),
            "policy",
            "GVMModule",
        ),
    ],
    ids=["gvm_as_reward_model", "rm_as_dvpo_value_model", "sft_as_critic", "gvm_as_policy"],
)
def test_an_export_of_another_stage_is_refused_naming_the_option_the_path_and_the_stage(
    make, option, stage, exports, tokenizer
):
    module = make(exports, tokenizer)
    with pytest.raises(ValueError) as error:
        module.check_model_sources()
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert re.search(f"option `{option}`: '{re.escape(exports[stage])}' is a {stage} export", message)


def test_a_value_model_without_a_lineage_record_is_taken_with_a_warning(exports, tokenizer):
    with pytest.warns(
        UserWarning,
        match=f"option `value_model`: .* has no {EXPORT_INFO} naming its stage .* stage is unknown",
    ):
        dvpo(exports, tokenizer, "foreign").check_model_sources()
