"""Lineage: a stage warns when the models it reads come from different SFT exports, or were rewritten after its
run began (found at export and on resume); records and identities by hand, tiny models for the warnings."""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest

from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.models.lineage import EXPORT_INFO, disagreeing_inputs, identity, rewritten_inputs
from dvpo_lightning.modules import DPOModule, SFTModule
from dvpo_lightning.modules.checks import check_run_seeds_agree
from tests.helpers.stages import quick_trainer, tiny, topics_data


def record(stage: str, export_id: str, **inputs) -> dict:
    return {
        "stage": stage,
        "export_id": export_id,
        "export_dir": f"/runs/{export_id}",
        "inputs": {option: {"export": parent} for option, parent in inputs.items()},
    }


SFT_A, SFT_B = record("SFTModule", "a" * 32), record("SFTModule", "b" * 32)


def test_inputs_of_one_pipeline_agree():
    reward_model = record("RewardModelModule", "r" * 32, model=SFT_A)
    assert disagreeing_inputs({"policy": SFT_A, "reward_model": reward_model, "critic": reward_model}) == []
    assert disagreeing_inputs({"policy": SFT_A, "reward_model": None}) == []  # a model without a record


def test_a_reward_model_built_from_another_sft_than_the_policy_is_named_with_both():
    reward_model = record("RewardModelModule", "r" * 32, model=SFT_B)
    [problem] = disagreeing_inputs({"policy": SFT_A, "reward_model": reward_model})
    assert problem == (
        f"inputs `policy` and `reward_model` come from different SFTModule exports (/runs/{'a' * 32} "
        f"[{'a' * 12}] and /runs/{'b' * 32} [{'b' * 12}]): they were not trained in one pipeline"
    )


def test_an_input_rewritten_since_the_start_is_named(tmp_path, tokenizer):
    path = export_model(
        build_policy(tiny(), tokenizer), tokenizer, str(tmp_path / "gvm"), info=record("GVMModule", "1" * 32)
    )
    before = {"value_model": identity(path)}
    assert rewritten_inputs(before, {"value_model": identity(path)}) == []
    export_model(build_policy(tiny(), tokenizer), tokenizer, path, info=record("GVMModule", "2" * 32))
    [problem] = rewritten_inputs(before, {"value_model": identity(path)})
    assert problem == (
        f"input `value_model` ({path}) was rewritten after this run began: it was GVMModule {'1' * 12} then, and is "
        f"GVMModule {'2' * 12} now"
    )


def test_a_directory_without_a_record_is_identified_by_its_files(tmp_path, tokenizer):
    path = build_policy(tiny(), tokenizer).save_pretrained(tmp_path / "plain") or str(tmp_path / "plain")
    found = identity(path)
    assert set(found) == {"path", "files"} and "config.json" in found["files"]
    assert identity("org/model", "main") == {"hub": "org/model", "revision": "main"}


@pytest.fixture
def sft_exports(tmp_path, tokenizer) -> tuple[str, str]:
    model = build_policy(tiny(), tokenizer)
    return tuple(
        export_model(
            model, tokenizer, str(tmp_path / name), info={**info, "export_dir": str(tmp_path / name)}
        )
        for name, info in (("sft_a", SFT_A), ("sft_b", SFT_B))
    )


def test_a_stage_warns_when_it_starts_from_inputs_of_different_pipelines(sft_exports, tokenizer):
    first, second = sft_exports
    module = DPOModule(
        policy=ModelSpec(name_or_path=first), reference=ModelSpec(name_or_path=second), tokenizer=tokenizer
    )
    with pytest.warns(
        UserWarning, match=r"DPOModule: inputs `policy` and `reference` come from different SFTModule"
    ):
        module.configure_model()


def test_a_stage_warns_at_export_and_on_resume_when_an_input_was_rewritten(sft_exports, tokenizer, tmp_path):
    first, _ = sft_exports
    module = DPOModule(policy=ModelSpec(name_or_path=first), tokenizer=tokenizer)
    module.configure_model()
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    export_model(build_policy(tiny(), tokenizer), tokenizer, first, info=record("SFTModule", "c" * 32))
    with pytest.warns(UserWarning, match=r"input `policy` \(.*sft_a\) was rewritten after this run began"):
        module.export(str(tmp_path / "dpo"))
    resumed = DPOModule(policy=ModelSpec(name_or_path=first), tokenizer=tokenizer)
    with pytest.warns(UserWarning, match=r"was SFTModule a{12} then, and is SFTModule c{12} now"):
        resumed.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("init_seed", [None, 2], ids=["following_the_run_seed", "pinned"])
def test_the_export_records_the_run_seed_and_the_initialisation_and_data_seeds_it_gave(
    init_seed, tokenizer, cache, tmp_path
):
    pl.seed_everything(4)  # what --seed_everything 4 does
    module = SFTModule(
        policy=tiny(init_seed=init_seed), tokenizer=tokenizer, export_dir=str(tmp_path / "model")
    )
    quick_trainer(tmp_path, max_steps=1).fit(module, datamodule=topics_data(cache))
    info = json.loads((tmp_path / "model" / EXPORT_INFO).read_text())
    expected = 4 if init_seed is None else init_seed
    assert (info["seed"], info["init_seeds"], info["data"]["seed"]) == (4, {"policy": expected}, 4)
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"- seeds: run 4; initialisation policy {expected}; data 4" in card


def test_a_run_whose_processes_drew_different_seeds_is_refused(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # this process's; rank 0 drew 3
    strategy = SimpleNamespace(
        broadcast=lambda value, src=0: 3, reduce_boolean_decision=lambda agree, all: agree
    )
    with pytest.raises(
        ValueError, match="processes of this run have different seeds .* pin --seed_everything"
    ):
        check_run_seeds_agree("SFTModule", SimpleNamespace(world_size=2, strategy=strategy))
    check_run_seeds_agree("SFTModule", SimpleNamespace(world_size=1, strategy=None))
