"""The GVM's training options beyond the paper: the ranking term, TCRM's consistency terms, inner epochs on fixed
targets, and values read as the running sum of learned token rewards (value_form "earned"), fitted over random
subsets of the tokens (reward_subset_probability)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from dvpo_lightning.models import LoraSpec, ModelSpec, build_value_model, value_form
from dvpo_lightning.modules import GVMModule, OptimConfig, export
from dvpo_lightning.rl import (
    Sequences,
    final_values,
    pair_sequences,
    state_mask,
    state_values,
    terminal_rewards,
)
from tests.helpers.stages import first_batch, quick_trainer, tiny, topics_data

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def gvm(tokenizer, **options) -> GVMModule:
    module = GVMModule(tiny(init_seed=5), optim=OptimConfig(lr=1e-2), tokenizer=tokenizer, **options)
    module.configure_model()
    with torch.no_grad():  # a non-zero head: the values differ between responses
        module.value_model.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    return module


def test_the_ranking_term_adds_the_weighted_bradley_terry_loss_of_the_final_values(tokenizer, cache):
    batch = first_batch(topics_data(cache, "pairs"))
    plain, ranked = (
        gvm(tokenizer).training_step(batch, 0),
        gvm(tokenizer, ranking_weight=0.5).training_step(batch, 0),
    )
    with torch.no_grad():
        sequences = pair_sequences(batch)
        final = final_values(state_values(gvm(tokenizer).value_model, sequences), sequences.response_mask)
    chosen, rejected = final.chunk(2)
    expected = 0.5 * F.softplus(rejected - chosen).mean()
    assert expected > 1e-3
    torch.testing.assert_close(ranked - plain, expected)


def test_the_consistency_terms_add_their_weighted_losses_on_the_trained_states(tokenizer, cache):
    """Each row's trained states s_1..s_T and the complete response, written out: every value towards the last's,
    and towards the next's."""
    batch = first_batch(topics_data(cache, "pairs"))
    weights = {"final_consistency_weight": 0.5, "td_consistency_weight": 0.25}
    module = gvm(tokenizer, **weights)
    consistent, plain = module.training_step(batch, 0), gvm(tokenizer).training_step(batch, 0)
    with torch.no_grad():
        sequences = pair_sequences(batch)
        values = state_values(gvm(tokenizer).value_model, sequences)
    mask = state_mask(sequences.response_mask, include_final=True)
    rows = [row_values[row_mask].tolist() for row_values, row_mask in zip(values, mask)]
    states = sum(len(row) for row in rows)
    to_last = sum((value - row[-1]) ** 2 for row in rows for value in row) / (2 * states)
    to_next = sum((row[i] - row[i + 1]) ** 2 for row in rows for i in range(len(row) - 1)) / (2 * states)
    assert min(to_last, to_next) > 1e-4
    torch.testing.assert_close(consistent - plain, torch.tensor(0.5 * to_last + 0.25 * to_next))
    assert weights.items() <= module.export_info()["value_training"].items()


class RecordSteps(Callback):
    """The gradient norm at each optimiser step (after clipping) and the batches the module trained on."""

    def __init__(self):
        self.norms, self.batches = [], 0

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches += 1


def test_inner_epochs_take_several_clipped_steps_per_batch_on_targets_fixed_at_its_start(
    tokenizer, cache, tmp_path, monkeypatch
):
    module = gvm(tokenizer, inner_epochs=3, max_grad_norm=0.01)
    recorded = []
    loss = module.loss

    def recording_loss(sequences, values, targets, training):
        recorded.append((values.detach().clone(), targets))
        return loss(sequences, values, targets, training)

    monkeypatch.setattr(module, "loss", recording_loss)
    steps = RecordSteps()
    trainer = quick_trainer(tmp_path, max_steps=6, callbacks=[steps])
    trainer.fit(module, datamodule=topics_data(cache))
    assert (trainer.global_step, steps.batches) == (6, 2)  # max_steps counts optimiser steps: 2 batches of 3
    assert max(steps.norms) <= 0.01 * (1 + 1e-4)
    for first in range(0, 6, 3):  # each batch: one set of targets, values that move between its steps
        (values, targets), *later = recorded[first : first + 3]
        for later_values, later_targets in later:
            assert later_targets is targets
            assert not torch.equal(later_values, values)
    assert not torch.equal(recorded[0][1], recorded[3][1])  # a new batch, new targets
    assert module.export_info()["value_training"]["inner_epochs"] == 3


def test_inner_epochs_stop_where_the_budget_ends(tokenizer, cache, tmp_path):
    trainer = quick_trainer(tmp_path, max_steps=4)
    trainer.fit(gvm(tokenizer, inner_epochs=3), datamodule=topics_data(cache))
    assert trainer.global_step == 4


@pytest.mark.parametrize(
    "options, message",
    [
        ({"inner_epochs": 0}, "inner_epochs must be >= 1"),
        ({"max_grad_norm": 1.0}, "set trainer.gradient_clip_val instead"),
    ],
)
def test_bad_inner_epoch_options_are_named(tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        GVMModule(tiny(), tokenizer=tokenizer, **options)


# ------------------------------------------------------------------------------------------ value_form: earned
def test_an_earned_gvm_reads_each_state_as_the_sum_of_the_outputs_so_far_and_fits_only_the_sum(
    tokenizer, cache
):
    """Its outputs, taken raw from the model, summed by hand: V(s_t) is the prompt's output plus each response
    token's up to s_t, and the loss is the complete responses' squared error to the terminal reward (+1 / -1)."""
    batch = first_batch(topics_data(cache, "pairs"))
    module = gvm(tokenizer, value_form="earned")
    sequences = pair_sequences(batch)
    with torch.no_grad():
        values = state_values(module.value_model, sequences)  # [2B, R + 1]
        module.value_model.config.dvpo_value_form = "return"  # the raw outputs, for the hand-made sums
        raw = state_values(module.value_model, sequences)
        module.value_model.config.dvpo_value_form = "earned"
    lengths = sequences.response_mask.sum(-1).tolist()
    for row, length in enumerate(lengths):
        for t in range(length + 1):  # s_0 .. s_T: the complete response is column T
            torch.testing.assert_close(values[row, t], raw[row, : t + 1].sum())
    final = final_values(values, sequences.response_mask)
    rewards = terminal_rewards(batch, sequences, "preference")
    expected = 0.5 * ((final - rewards) ** 2).mean()
    torch.testing.assert_close(module.training_step(batch, 0), expected)
    assert module.export_info()["value_training"]["value_form"] == "earned"


def test_padding_changes_no_earned_value(tokenizer, cache):
    """A row's states read the same sums alone, with no padding column, as beside longer rows (its padding columns
    are never summed)."""
    batch = first_batch(topics_data(cache, "pairs"))
    module = gvm(tokenizer, value_form="earned")
    sequences = pair_sequences(batch)
    lengths = sequences.response_mask.sum(-1)
    short = int(lengths.argmin())
    assert lengths[short] < sequences.response_length  # the batch pads it
    length = int(lengths[short])
    row = sequences.select(slice(short, short + 1))
    alone = Sequences(
        row.prompt_input_ids,
        row.prompt_attention_mask,
        row.response_input_ids[:, :length],
        row.response_mask[:, :length],
    )
    with torch.no_grad():
        together = state_values(module.value_model, sequences)[short, : length + 1]
        torch.testing.assert_close(together, state_values(module.value_model, alone)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4)], ids=["full", "lora"])
def test_an_earned_gvm_is_saved_and_read_back_as_earned(lora, tokenizer, cache, tmp_path):
    trainer = quick_trainer(tmp_path, max_steps=2)
    module = GVMModule(
        tiny(init_seed=5, lora=lora),
        value_form="earned",
        tokenizer=tokenizer,
        export_dir=str(tmp_path / "gvm"),
    )
    trainer.fit(module, datamodule=topics_data(cache))  # exports at the end
    path = str(tmp_path / "gvm")
    loaded = build_value_model(ModelSpec(name_or_path=path), tokenizer)
    assert value_form(loaded) == "earned"
    with pytest.raises(ValueError, match="value_form='return', but the value model .* value_form='earned'"):
        GVMModule(ModelSpec(name_or_path=path), tokenizer=tokenizer).configure_model()


def test_a_sharded_lora_gvm_is_exported_earned_through_its_unsharded_twin(tokenizer, monkeypatch, tmp_path):
    """Rank zero rebuilds a sharded LoRA model from its spec to merge it: the twin takes what training set on the
    model's config, so the export reads as earned (here the gathered state is the model's own)."""
    module = GVMModule(tiny(init_seed=5, lora=LoraSpec(r=4)), value_form="earned", tokenizer=tokenizer)
    module.configure_model()
    monkeypatch.setattr(export, "is_sharded", lambda model: True)
    monkeypatch.setattr(export, "full_state_dict", lambda model: model.state_dict())
    export.export_stage(module, str(tmp_path / "gvm"))
    assert value_form(build_value_model(ModelSpec(name_or_path=str(tmp_path / "gvm")), tokenizer)) == "earned"


def test_an_earned_gvm_fits_a_random_subsets_sum_in_training_and_the_whole_sum_in_validation(
    tokenizer, cache
):
    """With reward_subset_probability p, a training step's loss is the squared error of the prompt's output plus the
    outputs of the tokens drawn (the same draw, by seed), over p; validation fits the plain sum."""
    batch = first_batch(topics_data(cache, "pairs"))
    module = gvm(tokenizer, value_form="earned", reward_subset_probability=0.5)
    sequences = pair_sequences(batch)
    with torch.no_grad():
        module.value_model.config.dvpo_value_form = "return"  # the raw outputs: prompt value, token rewards
        raw = state_values(module.value_model, sequences)  # [2B, R + 1]
        module.value_model.config.dvpo_value_form = "earned"
    torch.manual_seed(3)
    keep = torch.rand_like(raw[:, 1:]) < 0.5  # [2B, R]: the draw the step makes after the same seed
    drawn = keep & sequences.response_mask.bool()
    assert 0 < drawn.sum() < sequences.response_mask.sum()
    subset_sum = raw[:, 0] + torch.where(drawn, raw[:, 1:], 0).sum(-1) / 0.5  # [2B]
    rewards = terminal_rewards(batch, sequences, "preference")
    torch.manual_seed(3)
    torch.testing.assert_close(module.training_step(batch, 0), 0.5 * ((subset_sum - rewards) ** 2).mean())
    whole_sum = raw[:, 0] + torch.where(sequences.response_mask.bool(), raw[:, 1:], 0).sum(-1)
    with torch.no_grad():
        values = state_values(module.value_model, sequences)
        targets = module.targets(batch, sequences, values)
        loss, _ = module.loss(sequences, values, targets, training=False)
    torch.testing.assert_close(loss, 0.5 * ((whole_sum - rewards) ** 2).mean())
    assert module.export_info()["value_training"]["reward_subset_probability"] == 0.5


@pytest.mark.parametrize(
    "options, message",
    [
        ({"value_form": "sum"}, "value_form must be one of"),
        ({"value_form": "earned", "train_final_value": False}, "needs train_final_value: true"),
        ({"value_form": "earned", "td_consistency_weight": 1.0}, "set td_consistency_weight: 0"),
        ({"value_form": "earned", "final_consistency_weight": 1.0}, "set final_consistency_weight: 0"),
        (
            {"value_form": "earned", "reward_subset_probability": 0.0},
            r"reward_subset_probability must be in \(0, 1\]",
        ),
        (
            {"reward_subset_probability": 0.5},
            "value_form='return' has none: set reward_subset_probability: 1",
        ),
    ],
)
def test_bad_value_form_options_are_named(tokenizer, options, message):
    with pytest.raises(ValueError, match=message):
        GVMModule(tiny(), tokenizer=tokenizer, **options)
