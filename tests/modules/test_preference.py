"""The preference-stage modules (SFT, reward model, GVM, DPO): what training changes and what it must not,
padding, real data, tokenizer checks, option checks, checkpoints and the export.

Every configuration of `tests.helpers.stages.STAGES` is fitted once (two optimiser steps, a large learning rate) by
the module-scoped `fitted` fixture; the tests of training, checkpoints and export read that one fit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import (
    ModelSpec,
    TokenizerMismatchError,
    build_policy,
    build_value_model,
    export_model,
)
from dvpo_lightning.models.export import EXPORT_INFO
from dvpo_lightning.modules import (
    DPOModule,
    GVMModule,
    KTOModule,
    PolicyModule,
    RewardModelModule,
    RLHFModule,
)
from dvpo_lightning.rl import pair_sequences, policy_logprobs, sft_sequences, state_values
from tests.helpers.stages import (
    STAGES,
    TINY_GPT2,
    Exports,
    build_stage,
    export_random_value_model,
    first_batch,
    quick_trainer,
    step_loss,
    tiny,
    topics_data,
)
from tests.helpers.tiny import TINY_ARCH

# `training_step` called without a Trainer cannot log; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


@dataclass
class Fitted:
    module: RLHFModule
    trainer: object
    before: dict[str, torch.Tensor]  # every parameter before training, by name
    root: Path


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return Exports(reward_model=export_random_value_model(tmp_path_factory.mktemp("rm") / "model", tokenizer))


@pytest.fixture(scope="module")
def batches(cache):
    """A batch of each layout: "sft", "pairs" and "unpaired"."""
    return {mode: first_batch(topics_data(cache, mode)) for mode in ("sft", "pairs", "unpaired")}


@pytest.fixture(scope="module", params=list(STAGES))
def fitted(request, tmp_path_factory, cache, tokenizer, exports):
    root = tmp_path_factory.mktemp(request.param)
    module = build_stage(request.param, tokenizer, exports)
    module.configure_model()
    before = {name: parameter.detach().clone() for name, parameter in module.named_parameters()}
    # Two steps: value heads and LoRA B matrices start at zero, so some gradients are exactly zero at step one.
    trainer = quick_trainer(root, max_steps=2)
    trainer.fit(module, datamodule=topics_data(cache))
    return Fitted(module, trainer, before, root)


def batch_for(module: RLHFModule, batches: dict) -> dict:
    return batches[module.data_mode]


def perturb(module: RLHFModule, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter, so zero heads, zero LoRA matrices and policy == reference copies
    no longer make a loss constant."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


# ------------------------------------------------------------------------------------------------ training
def test_every_trainable_parameter_moves_and_frozen_models_stay_bit_identical(fitted):
    module = fitted.module
    parameters = dict(module.named_parameters())
    assert fitted.trainer.global_step == 2
    trainable = [name for name, parameter in parameters.items() if parameter.requires_grad]
    assert trainable
    # The Bradley-Terry loss sees score differences only: a bias added to both scores gets no gradient.
    shift_invariant = {"reward_model.score.bias"} if isinstance(module, RewardModelModule) else set()
    unchanged = [
        name
        for name in trainable
        if name not in shift_invariant and torch.equal(parameters[name], fitted.before[name])
    ]
    assert unchanged == []
    frozen = [name for name, parameter in parameters.items() if not parameter.requires_grad]
    moved = [name for name in frozen if not torch.equal(parameters[name], fitted.before[name])]
    assert moved == []
    for name in module.frozen_models:
        model = getattr(module, name, None)
        if model is not None:
            assert not model.training, f"frozen {name} left eval mode"
            assert not any(parameter.requires_grad for parameter in model.parameters())


def test_frozen_models_are_the_ones_each_configuration_promises(fitted):
    module, names = fitted.module, {name.split(".", 1)[0] for name in fitted.before}
    if isinstance(module, DPOModule) and module.precompute_reference:
        assert module.reference is None  # freed after precomputing
        cache = module._reference_cache["train"]
        assert len(cache) == len(fitted.trainer.datamodule.train_dataset)
        assert "reference" in names  # it was there for the precomputation
    elif isinstance(module, DPOModule) and module.reference_as_disabled_adapter:
        # No second copy: the reference is the policy's base weights, which must stay frozen.
        assert module.reference is None and "reference" not in names
        base = [name for name in fitted.before if "lora_" not in name]
        assert base and not any(dict(module.named_parameters())[name].requires_grad for name in base)
    elif isinstance(module, DPOModule) and not module.objective.needs_reference:
        assert module.reference is None and "reference" not in names  # SimPO, ORPO: no reference at all
        models = [name for name, child in module.named_children() if isinstance(child, PreTrainedModel)]
        assert models == ["policy"]
    elif isinstance(module, (DPOModule, KTOModule)):
        assert "reference" in names
    elif isinstance(module, GVMModule):
        assert ("reward_model" in names) == (module.terminal_reward == "reward_model")


# ------------------------------------------------------------------------------------------------- padding
def pad_batch(batch: dict, pad_id: int, left: int = 3, right: int = 2) -> dict:
    """The same batch with `left` more padding columns before the prompts, `right` more after the responses."""
    padded = dict(batch)
    size = batch["prompt_input_ids"].shape[0]
    padded["prompt_input_ids"] = torch.cat(
        [torch.full((size, left), pad_id), batch["prompt_input_ids"]], dim=1
    )
    padded["prompt_attention_mask"] = torch.cat(
        [torch.zeros(size, left, dtype=torch.bool), batch["prompt_attention_mask"]], dim=1
    )
    for ids, mask in (
        ("response_input_ids", "response_mask"),
        ("chosen_input_ids", "chosen_mask"),
        ("rejected_input_ids", "rejected_mask"),
    ):
        if ids in batch:
            padded[ids] = torch.cat([batch[ids], torch.full((size, right), pad_id)], dim=1)
            padded[mask] = torch.cat([batch[mask], torch.zeros(size, right, dtype=torch.bool)], dim=1)
    return padded


@pytest.mark.parametrize("arch", [TINY_ARCH, TINY_GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_padding_never_changes_the_loss(stage, arch, tokenizer, exports, batches):
    module = build_stage(stage, tokenizer, exports, arch=arch)
    module.configure_model()
    perturb(module)
    batch = batch_for(module, batches)
    padded = pad_batch(batch, tokenizer.pad_token_id)
    assert padded["prompt_input_ids"].shape[1] == batch["prompt_input_ids"].shape[1] + 3
    with torch.no_grad():
        loss, padded_loss = step_loss(module, batch), step_loss(module, padded)
    assert torch.isfinite(loss)
    # float32 sums in another order, whose error IPO's square amplifies (its losses are ~25, with a slope of
    # ~10 per nat of log-ratio); a padding bug moves the loss by whole units
    assert padded_loss.item() == pytest.approx(loss.item(), rel=2e-5, abs=1e-5)


# ----------------------------------------------------------------------------------------------- real data
HH_STAGES = ("sft", "reward_model", "gvm_preference", "dpo_sigmoid")


@pytest.fixture(scope="module")
def hh_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hh_cache")  # shared, so the BPE tokenizer is trained once


@pytest.mark.parametrize("stage", HH_STAGES)
def test_each_stage_lowers_its_loss_on_real_hh_pairs(stage, hh_file, hh_cache, tmp_path):
    data = RLHFDataModule(
        dataset=str(hh_file),
        tokenizer="bpe:512",
        mode="sft" if stage == "sft" else "pairs",
        max_samples=200,
        max_prompt_length=96,
        max_response_length=48,
        batch_size=8,
        cache_dir=str(hh_cache),
    )
    batch = first_batch(data)
    module = build_stage(stage, data.tokenizer, lr=3e-3)
    module.configure_model()
    with torch.no_grad():
        before = step_loss(module, batch).item()
    quick_trainer(tmp_path, max_steps=10).fit(
        module, train_dataloaders=DataLoader([batch] * 10, batch_size=None)
    )
    module.trainer = None  # a loss outside the fit, as `before` was
    with torch.no_grad():
        after = step_loss(module, batch).item()
    assert after < 0.9 * before, f"{stage}: loss {before:.4f} -> {after:.4f}"


# ------------------------------------------------------------------------------------- tokenizer checks
@pytest.fixture(scope="module")
def foreign_exports(tmp_path_factory, word_tokenizer):
    """A value model and a policy trained with another tokenizer (the tests' word-level one)."""
    root = tmp_path_factory.mktemp("foreign")
    policy = build_policy(tiny(), word_tokenizer)
    return {
        "value_model": export_random_value_model(root / "value_model", word_tokenizer),
        "policy": export_model(policy, word_tokenizer, str(root / "policy")),
    }


@pytest.mark.parametrize(
    "make, role, path",
    [
        (
            lambda tokenizer, paths: GVMModule(
                ModelSpec(name_or_path=paths["value_model"]), tokenizer=tokenizer
            ),
            "value model",
            "value_model",
        ),
        (
            lambda tokenizer, paths: GVMModule(
                model=tiny(),
                terminal_reward="reward_model",
                reward_model=ModelSpec(name_or_path=paths["value_model"]),
                tokenizer=tokenizer,
            ),
            "reward model",
            "value_model",
        ),
        (
            lambda tokenizer, paths: DPOModule(
                policy=ModelSpec(name_or_path=paths["policy"]), tokenizer=tokenizer
            ),
            "policy",
            "policy",
        ),
    ],
    ids=["gvm_value_model", "gvm_reward_model", "dpo_policy"],
)
def test_a_model_trained_with_another_tokenizer_is_refused_by_path(
    make, role, path, tokenizer, foreign_exports
):
    module = make(tokenizer, foreign_exports)
    with pytest.raises(TokenizerMismatchError, match=rf"{role} at .*{re.escape(foreign_exports[path])}"):
        module.configure_model()


# -------------------------------------------------------------------------------------------- option checks
@pytest.mark.parametrize(
    "make, option",
    [
        (
            lambda: DPOModule(policy=tiny(), reference_as_disabled_adapter=True),
            "reference_as_disabled_adapter",
        ),
        (
            lambda: DPOModule(policy=tiny(), reference=tiny(), reference_as_disabled_adapter=True),
            "reference_as_disabled_adapter",
        ),
        (lambda: GVMModule(tiny(), terminal_reward="reward_model"), "reward_model"),
        (lambda: GVMModule(tiny(), reward_model=tiny()), "terminal_reward"),
        (lambda: GVMModule(tiny(), terminal_reward="gold"), "terminal_reward"),
        (lambda: DPOModule(policy=tiny(), loss_type="hnge"), "loss_type"),
        (lambda: DPOModule(policy=tiny(), loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (lambda: DPOModule(policy=tiny(), loss_type="simpo", reference=tiny()), "`reference`"),
        (
            lambda: DPOModule(policy=tiny(), loss_type="orpo", precompute_reference=True),
            "precompute_reference",
        ),
    ],
    ids=[
        "disabled_adapter_without_lora",
        "disabled_adapter_and_reference",
        "rm_reward_without_rm",
        "rm_without_rm_reward",
        "unknown_terminal_reward",
        "unknown_loss_type",
        "option_of_another_loss",
        "reference_with_reference_free_loss",
        "precompute_with_reference_free_loss",
    ],
)
def test_incompatible_options_fail_at_construction_naming_the_option(make, option):
    with pytest.raises(ValueError, match=option):
        make()


def test_score_terminal_reward_on_data_without_scores_names_the_option(tokenizer, batches):
    module = build_stage("gvm_score", tokenizer)
    module.configure_model()
    unscored = {key: value for key, value in batches["pairs"].items() if not key.endswith("_score")}
    with pytest.raises(ValueError, match="terminal_reward='score'"):
        step_loss(module, unscored)


# ----------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_leaves_frozen_models_out_and_restores_every_trained_parameter(
    fitted, tokenizer, tmp_path
):
    path = tmp_path / "stage.ckpt"
    fitted.trainer.save_checkpoint(path)
    saved = torch.load(path)["state_dict"]
    trained = fitted.module.state_dict()
    frozen = {key for key in trained if key.split(".", 1)[0] in fitted.module.frozen_models}
    assert set(saved) == set(trained) - frozen
    # Lightning's own reload: build the models (configure_model), then a strict load of the checkpoint.
    restored = type(fitted.module).load_from_checkpoint(path, tokenizer=tokenizer)
    state = restored.state_dict()
    assert [key for key in saved if not torch.equal(state[key], trained[key])] == []


def test_checkpoint_loads_under_torchs_default_weights_only(tokenizer, cache, tmp_path):
    module = build_stage("dpo_lora", tokenizer)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=topics_data(cache))
    trainer.save_checkpoint(tmp_path / "stage.ckpt")
    DPOModule.load_from_checkpoint(tmp_path / "stage.ckpt", tokenizer=tokenizer)


def test_a_checkpoint_that_stored_an_options_neutral_value_loads_with_a_loss_not_reading_it(
    tokenizer, cache, tmp_path
):
    # Before options were per-loss, every DPO checkpoint stored label_smoothing=0.0, whatever its loss_type.
    module = DPOModule(policy=tiny(), loss_type="ipo", label_smoothing=0.0, tokenizer=tokenizer)
    trainer = quick_trainer(tmp_path, max_steps=1)
    trainer.fit(module, datamodule=topics_data(cache))
    trainer.save_checkpoint(tmp_path / "stage.ckpt")
    assert torch.load(tmp_path / "stage.ckpt")["hyper_parameters"]["label_smoothing"] == 0.0
    restored = DPOModule.load_from_checkpoint(tmp_path / "stage.ckpt", tokenizer=tokenizer)
    assert restored.objective.names == ("ipo",)


# ---------------------------------------------------------------------------------------------------- export
def test_export_loads_by_path_with_the_same_outputs(fitted, tokenizer, batches):
    module = fitted.module
    directory = fitted.root / "model"
    info = json.loads((directory / EXPORT_INFO).read_text())
    assert info["stage"] == type(module).__name__ and info["global_step"] == 2
    assert info["export_dir"] == str(directory.resolve()) and len(info["export_id"]) == 32
    assert (directory / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")
    if isinstance(module, GVMModule):  # how its values were trained, which DVPO checks
        options = ("terminal_reward", "gamma", "lam", "train_final_value", "ranking_weight", "inner_epochs")
        options += (
            "final_consistency_weight",
            "td_consistency_weight",
            "value_form",
            "reward_subset_probability",
        )
        assert info["value_training"] == {option: getattr(module, option) for option in options}
    else:
        assert "value_training" not in info
    trained = getattr(module, module.exported_model).eval()
    batch = batch_for(module, batches)
    sequences = sft_sequences(batch) if module.data_mode in ("sft", "unpaired") else pair_sequences(batch)
    spec = ModelSpec(name_or_path=str(directory))
    with torch.no_grad():
        if isinstance(module, PolicyModule):
            expected = policy_logprobs(trained, sequences)[0]
            loaded = policy_logprobs(build_policy(spec, tokenizer), sequences)[0]
        else:
            expected = state_values(trained, sequences)
            loaded = state_values(build_value_model(spec, tokenizer), sequences)
    assert torch.count_nonzero(expected) > 0
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)


def test_precomputed_reference_without_a_data_module_says_what_it_needs(tokenizer, cache, tmp_path):
    module = build_stage("dpo_precompute_reference", tokenizer)
    data = topics_data(cache, mode="pairs")
    data.setup("fit")
    with pytest.raises(ValueError, match="precompute_reference=true .* needs a data module"):
        quick_trainer(tmp_path, max_steps=1).fit(module, train_dataloaders=data.train_dataloader())
