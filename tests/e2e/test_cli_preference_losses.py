"""`dvpo fit --config configs/dpo.yaml --model.init_args.loss_type <name>` trains with every registered preference
loss (two steps of a tiny policy), a list of losses takes weights from the command line, and only the losses that
read a reference get one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from dvpo_lightning.algos import PREFERENCE_LOSSES
from dvpo_lightning.cli import run_cli
from dvpo_lightning.models import build_policy, export_model
from tests.helpers.stages import tiny

DPO = str(Path(__file__).resolve().parents[2] / "configs" / "dpo.yaml")


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, tokenizer) -> str:
    return export_model(build_policy(tiny(), tokenizer), tokenizer, str(tmp_path_factory.mktemp("sft")))


def fit_dpo_config(export: str, root: Path, monkeypatch, *overrides: str):
    """configs/dpo.yaml for two steps on a few built-in pairs, from `export`, with `overrides`."""
    monkeypatch.setenv("DVPO_CACHE", str(root / "cache"))
    return run_cli(
        [
            "fit",
            "--config",
            DPO,
            f"--trainer.default_root_dir={root}",
            f"--model.init_args.policy.name_or_path={export}",
            f"--data.init_args.tokenizer={export}",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=false",
            "--data.init_args.builtin_size=64",
            "--data.init_args.val_size=8",
            "--data.init_args.batch_size=4",
            *overrides,
        ]
    )


def models_of(module) -> list[str]:
    return [name for name, child in module.named_children() if isinstance(child, PreTrainedModel)]


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_the_dpo_config_trains_with_every_registered_loss(name, sft_export, tmp_path, monkeypatch):
    cli = fit_dpo_config(sft_export, tmp_path, monkeypatch, f"--model.init_args.loss_type={name}")
    assert cli.trainer.global_step == 2
    assert cli.model.objective.names == (name,)
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    expected = ["policy", "reference"] if name not in ("simpo", "orpo", "nll") else ["policy"]
    assert models_of(cli.model) == expected
    assert (tmp_path / "model" / "config.json").exists()


def test_losses_and_weights_combine_from_the_command_line(sft_export, tmp_path, monkeypatch):
    cli = fit_dpo_config(
        sft_export,
        tmp_path,
        monkeypatch,
        "--model.init_args.loss_type=[sigmoid,nll]",
        "--model.init_args.loss_weights=[1.0,0.5]",
    )
    metrics = cli.trainer.callback_metrics
    expected = metrics["train/loss/sigmoid"] + 0.5 * metrics["train/loss/nll"]
    assert metrics["train/loss"].item() == pytest.approx(expected.item(), rel=1e-6)
