"""Fixtures of the on-policy module tests: the frozen models they load by path, and each configuration of
`tests.helpers.onpolicy.ONPOLICY` fitted at most once per test file (one RL iteration, two optimiser steps, a
large learning rate)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.onpolicy import Run, build_onpolicy, export_frozen_models
from tests.helpers.stages import quick_trainer, topics_data


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer):
    return export_frozen_models(tmp_path_factory.mktemp("exports"), tokenizer)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache, tokenizer, exports):
    """`runs(name)`: configuration `name` after one iteration on the built-in task (fitted on first use)."""
    fitted: dict[str, Run] = {}

    def run(name: str) -> Run:
        if name not in fitted:
            module = build_onpolicy(name, tokenizer, exports)
            module.configure_model()
            before = {key: parameter.detach().clone() for key, parameter in module.named_parameters()}
            trainer = quick_trainer(tmp_path_factory.mktemp(name), max_steps=2)
            torch.manual_seed(0)
            trainer.fit(module, datamodule=topics_data(cache))
            fitted[name] = Run(module, trainer, before)
        return fitted[name]

    return run
