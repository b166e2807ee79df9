"""Bad configuration fails at start-up, before any model is loaded, with a message naming the option and the fix:
missing paths (and the config that writes them), FSDP1 on a CPU, a model trained with another tokenizer, a
disabled-adapter reference without LoRA, a mistyped loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from dvpo_lightning.algos import PREFERENCE_LOSSES
from dvpo_lightning.cli import main, run_cli
from dvpo_lightning.models import ModelSpec, TokenizerMismatchError, build_policy, export_model
from dvpo_lightning.modules import DVPOModule
from dvpo_lightning.preflight import ConfigurationError
from tests.helpers.stages import tiny
from tests.helpers.tiny import TINY_ARCH, make_word_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SFT, DPO, DVPO = (str(CONFIGS / f"{name}.yaml") for name in ("sft", "dpo", "dvpo"))
FSDP1 = str(CONFIGS / "strategy" / "fsdp.yaml")


def refuse_loading(monkeypatch, *auto_classes) -> None:
    """Fail the test if one of `auto_classes` loads anything (from a path or the hub)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"something was loaded before the configuration was checked: {args}")

    for auto_class in auto_classes:
        monkeypatch.setattr(auto_class, "from_pretrained", refuse)


@pytest.fixture
def nothing_loads(monkeypatch):
    """No tokenizer, model config or weights are read."""
    refuse_loading(
        monkeypatch, transformers.AutoTokenizer, transformers.AutoConfig, transformers.AutoModelForCausalLM
    )


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory, tokenizer) -> str:
    directory = tmp_path_factory.mktemp("sft")
    return export_model(build_policy(tiny(), tokenizer), tokenizer, str(directory))


def fit_dpo_from(sft_export: str, root, *overrides: str) -> None:
    """`dvpo fit --config configs/dpo.yaml` from `sft_export`, writing under `root`, with `overrides`."""
    run_cli(
        [
            "fit",
            "--config",
            DPO,
            f"--trainer.default_root_dir={root}",
            f"--model.init_args.policy.name_or_path={sft_export}",
            f"--data.init_args.tokenizer={sft_export}",
            *overrides,
        ]
    )


def test_a_stage_run_before_the_stages_it_reads_names_each_missing_path_and_the_config_to_run(
    tmp_path, monkeypatch, nothing_loads
):
    monkeypatch.chdir(tmp_path)  # no outputs/ here
    with pytest.raises(ConfigurationError) as error:
        run_cli(["fit", "--config", DVPO])
    message = str(error.value)
    for option, producer in (
        ("model.init_args.policy.name_or_path", "sft"),
        ("model.init_args.value_model.name_or_path", "gvm"),
        ("data.init_args.tokenizer", "sft"),
    ):
        config = CONFIGS / f"{producer}.yaml"
        assert (
            f"- {option}: 'outputs/builtin/{producer}/model' does not exist; it is written by {config}: "
            f"run `dvpo fit --config {config}` first"
        ) in message


@pytest.mark.parametrize(
    "option, value",
    [
        ("--data.init_args.dataset", "./missing/pairs.jsonl"),
        ("--data.init_args.prompt_dataset", "/missing/prompts.parquet"),
        ("--ckpt_path", "missing/checkpoints/last.ckpt"),
    ],
)
def test_a_missing_data_or_checkpoint_path_is_named_with_its_option(
    option, value, tmp_path, monkeypatch, nothing_loads
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigurationError, match=rf"- {option[2:]}: '{value}' does not exist; correct the path"
    ):
        run_cli(["fit", "--config", SFT, f"{option}={value}"])


def test_fsdp1_on_a_cpu_points_at_fsdp2(tmp_path, nothing_loads):
    arguments = ["fit", "--config", SFT, "--config", FSDP1, "--trainer.accelerator=cpu"]
    with pytest.raises(
        ConfigurationError,
        match=r"trainer.strategy: FSDP1 .* runs on CUDA GPUs only, and "
        r"trainer.accelerator is 'cpu'; use FSDP2, which also runs on CPU: --config "
        r"configs/strategy/fsdp2.yaml",
    ):
        run_cli([*arguments, f"--trainer.default_root_dir={tmp_path}"])


def test_a_disabled_adapter_reference_without_lora_fails_before_any_model_loads(
    tmp_path, sft_export, monkeypatch
):
    # The data module loads the export's tokenizer when it is built; no model weights are read.
    refuse_loading(monkeypatch, transformers.AutoModelForCausalLM)
    with pytest.raises(
        ValueError, match=r"reference_as_disabled_adapter=true needs a LoRA policy .* set `policy.lora`"
    ):
        fit_dpo_from(sft_export, tmp_path, "--model.init_args.reference_as_disabled_adapter=true")


def test_a_value_model_of_another_tokenizer_is_refused_before_any_model_is_built(tmp_path, tokenizer):
    other = make_word_tokenizer(tmp_path / "other_tokenizer")  # other words, other ids
    gvm = export_model(build_policy(ModelSpec(arch=TINY_ARCH), other), other, str(tmp_path / "gvm"))
    module = DVPOModule(policy=tiny(), value_model=ModelSpec(name_or_path=gvm), tokenizer=tokenizer)
    with pytest.raises(
        TokenizerMismatchError, match=r"value model at .*gvm' \(option `value_model`\) was trained"
    ):
        module.configure_model()
    assert not hasattr(module, "policy")  # refused before the policy was built


def test_a_missing_model_path_given_in_python_is_refused_naming_the_option(tokenizer):
    module = DVPOModule(
        policy=tiny(), value_model=ModelSpec(name_or_path="outputs/nowhere/gvm/model"), tokenizer=tokenizer
    )
    with pytest.raises(
        FileNotFoundError, match=r"DVPOModule option `value_model`: .*'outputs/nowhere/gvm/model'"
    ):
        module.configure_model()
    assert not hasattr(module, "policy")


def test_a_mistyped_loss_fails_before_any_model_loads_listing_the_known_ones(
    tmp_path, sft_export, monkeypatch, capsys
):
    refuse_loading(monkeypatch, transformers.AutoModelForCausalLM)
    command = [
        "fit",
        "--config",
        DPO,
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.init_args.policy.name_or_path={sft_export}",
        f"--data.init_args.tokenizer={sft_export}",
        "--model.init_args.loss_type=[sigmoid,hnge]",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(command)  # as the `dvpo` command reports it: one line, exit code 2
    known = ", ".join(sorted(PREFERENCE_LOSSES))
    assert exit_info.value.code == 2
    assert f"loss_type: unknown preference loss 'hnge'; known: {known}" in capsys.readouterr().err
