"""Numerical faults: a NaN injected into a loss, a gradient or a rollout's values is caught before the optimiser
step, the step is skipped (parameters and optimiser state unchanged) and counted, and too many in a row stop the
run with an error naming the quantity and the global step.

The NaN is injected by hooks on real modules: the GVM stage (automatic optimisation) and DVPO (manual
optimisation, several optimiser steps per rollout, a frozen value model whose outputs become NaN).
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from dvpo_lightning.callbacks import NonFiniteError, NonFiniteGuard
from dvpo_lightning.models import value_head
from tests.helpers.onpolicy import build_onpolicy, export_frozen_models
from tests.helpers.stages import build_stage, quick_trainer, topics_data


class Snapshots(pl.Callback):
    """The trained parameters and the optimiser's state before training (index 0) and after every batch."""

    def __init__(self) -> None:
        self.parameters: list[dict[str, torch.Tensor]] = []
        self.optimizer_states: list[list[dict]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.take(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.take(trainer, pl_module)

    def take(self, trainer, pl_module) -> None:
        self.parameters.append(
            {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        )
        self.optimizer_states.append(
            [
                {key: torch.as_tensor(value).clone() for key, value in state.items()}
                for state in trainer.optimizers[0].state.values()
            ]
        )


def same_parameters(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(first[name], second[name]) for name in first)


def same_optimizer_state(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(
        a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) for a, b in zip(first, second)
    )


def nan_from_step(module: pl.LightningModule, target: torch.nn.Module, steps: set[int] | range) -> None:
    """Make `target`'s output NaN while the trainer's global step is in `steps`."""

    def poison(_, inputs, output):
        step = module.trainer.global_step
        return output * float("nan") if step in steps else output

    target.register_forward_hook(poison)


def fit_gvm(root, cache, tokenizer, guard: NonFiniteGuard, max_steps: int, inject) -> Snapshots:
    """The GVM stage for `max_steps` steps with `guard`; `inject(module)` adds the fault once models exist."""
    module = build_stage("gvm_preference", tokenizer)
    module.configure_model()
    inject(module)
    snapshots = Snapshots()
    trainer = quick_trainer(root, max_steps=max_steps, callbacks=[guard, snapshots], log_every_n_steps=1)
    trainer.fit(module, datamodule=topics_data(cache, size=60))
    return snapshots


def test_a_nan_loss_skips_its_step_and_training_goes_on(tmp_path, cache, tokenizer):
    guard = NonFiniteGuard(max_consecutive_skips=2)

    def inject(module):
        nan_from_step(module, value_head(module.value_model), {1})

    with pytest.warns(
        UserWarning, match=r"Global step 1: non-finite loss, gradients of value_model; the optimiser"
    ):
        snapshots = fit_gvm(tmp_path, cache, tokenizer, guard, 3, inject)
    params, states = snapshots.parameters, snapshots.optimizer_states  # [k + 1]: after global step k
    assert not same_parameters(params[0], params[1])  # step 0 trained
    assert same_parameters(params[1], params[2])  # step 1 was skipped: nothing moved
    assert same_optimizer_state(states[1], states[2])  # nor did Adam's moments or step counts
    assert not same_parameters(params[2], params[3])  # step 2 trained again
    assert not same_optimizer_state(states[2], states[3])
    assert (guard.skipped, guard.consecutive) == (1, 0)


def test_a_nan_gradient_with_a_finite_loss_is_named_as_the_gradient(tmp_path, cache, tokenizer):
    guard = NonFiniteGuard()

    def inject(module):
        weight = value_head(module.value_model).weight
        weight.register_hook(lambda grad: grad * float("nan") if module.trainer.global_step == 0 else grad)

    with pytest.warns(
        UserWarning, match=r"Global step 0: non-finite gradients of value_model; the optimiser"
    ) as caught:
        snapshots = fit_gvm(tmp_path, cache, tokenizer, guard, 2, inject)
    assert not any("loss" in str(warning.message) for warning in caught)
    assert same_parameters(snapshots.parameters[0], snapshots.parameters[1])
    assert len(snapshots.optimizer_states[1]) == 0  # Adam never stepped a parameter at step 0
    assert len(snapshots.optimizer_states[2]) > 0  # but did at step 1
    assert guard.skipped == 1


def test_too_many_skipped_steps_in_a_row_stop_the_run_naming_quantity_and_step(tmp_path, cache, tokenizer):
    guard = NonFiniteGuard(max_consecutive_skips=3)

    def inject(module):
        nan_from_step(module, value_head(module.value_model), range(1, 100))

    with pytest.raises(
        NonFiniteError, match=r"3 optimiser steps in a row .* at global step 3: non-finite loss"
    ):
        with pytest.warns(UserWarning):
            fit_gvm(tmp_path, cache, tokenizer, guard, 10, inject)
    assert guard.skipped == 3


def test_max_consecutive_skips_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_consecutive_skips"):
            NonFiniteGuard(max_consecutive_skips=bad)


def test_nan_values_of_a_rollout_skip_every_optimiser_step_of_that_rollout(tmp_path, cache, tokenizer):
    # DVPO, 2 PPO epochs of one mini-batch: global steps 0-1 are the first rollout, 2-3 the second.
    module = build_onpolicy("dvpo_gvm", tokenizer, export_frozen_models(tmp_path, tokenizer))
    module.configure_model()
    nan_from_step(module, value_head(module.value_model), {2, 3})
    guard, snapshots = NonFiniteGuard(), Snapshots()
    trainer = quick_trainer(tmp_path, max_steps=6, callbacks=[guard, snapshots], log_every_n_steps=1)
    with pytest.warns(
        UserWarning, match=r"Global step 2: non-finite values, advantages, returns, loss"
    ) as caught:
        trainer.fit(module, datamodule=topics_data(cache, size=60))
    assert any("Global step 3: non-finite values, advantages, returns" in str(w.message) for w in caught)
    params, states = snapshots.parameters, snapshots.optimizer_states  # [k + 1]: after rollout k
    assert not same_parameters(params[0], params[1])
    assert same_parameters(params[1], params[2]) and same_optimizer_state(states[1], states[2])
    assert not same_parameters(params[2], params[3])  # the third rollout trains again
    assert (guard.skipped, guard.consecutive) == (2, 0)
    assert trainer.callback_metrics["train/skipped_steps"] == 2
