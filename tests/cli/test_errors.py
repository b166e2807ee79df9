"""First contact with `dvpo`: each mistake a new user made is one message on stderr and exit code 2 (the
traceback only with `--debug`), found before anything slow runs; `dvpo --help` imports nothing heavy; torch's
thread count is a share of the machine's cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dvpo_lightning.cli import join_negative_values, main
from dvpo_lightning.cli.threads import choose_threads
from dvpo_lightning.data import RLHFDataModule

REPO = Path(__file__).resolve().parents[2]
SFT, RM = (str(REPO / "configs" / f"{name}.yaml") for name in ("sft", "rm"))
SMALL = ["--data.init_args.builtin_size=100", "--data.init_args.val_size=10", "--trainer.max_steps=1"]


def error_of(capsys, *args: str) -> str:
    """The message with which `dvpo <args>` exits with code 2: the end of stderr, from `dvpo: error:` on."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("dvpo: error:") == 1, err
    return err[err.index("dvpo: error:") :]


@pytest.fixture
def run_dir(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVPO_CACHE", str(cache))
    return f"--trainer.default_root_dir={tmp_path / 'run'}"


def test_a_misspelt_scheduler_is_one_line_naming_the_option(capsys, run_dir):
    message = error_of(capsys, "fit", "--config", SFT, "--model.init_args.optim.scheduler", "cosin", run_dir)
    assert message == (
        "dvpo: error: --model.init_args.optim: scheduler must be one of ['constant', 'cosine', 'linear']; got 'cosin' "
        "(--debug shows the traceback)\n"
    )


@pytest.mark.parametrize(
    "spelling", [["--model.init_args.optim.lr=-1e-3"], ["--model.init_args.optim.lr", "-1e-3"]]
)
def test_a_negative_learning_rate_is_refused_before_training_naming_the_option(capsys, run_dir, spelling):
    message = error_of(capsys, "fit", "--config", SFT, *spelling, run_dir)
    assert "--model.init_args.optim: lr must be a positive number; got -0.001" in message


def test_a_negative_value_after_a_space_is_joined_to_its_option():
    assert join_negative_values(["--a", "-1e-3", "--b", "-2", "--c=-.5", "-h", "--d", "x"]) == [
        "--a=-1e-3",
        "--b=-2",
        "--c=-.5",
        "-h",
        "--d",
        "x",
    ]


def test_a_bad_argument_value_is_one_line_naming_the_option(capsys, run_dir):
    message = error_of(capsys, "fit", "--config", SFT, "--model.init_args.optim.betas", "abc", run_dir)
    assert message.startswith("dvpo: error: --model.optim.betas: Expected a <class 'tuple'>. Got value: abc")


DPO, DVPO = (str(REPO / "configs" / f"{name}.yaml") for name in ("dpo", "dvpo"))


@pytest.mark.parametrize(
    "config, args, expected",
    [
        (
            DPO,
            ["--model.init_args.betaa", "0.2"],
            "--model.init_args.betaa: DPOModule has no option 'betaa'; did you mean 'beta'?",
        ),
        (
            DVPO,
            ["--model.init_args.ppo.kl_estimatr", "k3"],
            "--model.init_args.ppo.kl_estimatr: PPOConfig has no "
            "option 'kl_estimatr'; did you mean 'kl_estimator'",
        ),
        (
            DPO,
            ["--model.init_args.ppo.kl_estimator", "k3"],
            "--model.init_args.ppo.kl_estimator: DPOModule has no option 'ppo'; valid: ",
        ),
        (
            DPO,
            ["--model.class_path", "dvpo_lightning.modules.DPOModul"],
            "--model.class_path: no 'DPOModul' in "
            "dvpo_lightning.modules; did you mean 'DPOModule' or 'DVPOModule'?",
        ),
        (
            DPO,
            ["--model.class_path", "DPOModul"],
            "--model.class_path: no 'DPOModul' in dvpo_lightning.modules; "
            "did you mean 'DPOModule' or 'DVPOModule'?",
        ),
        (
            DPO,
            ["--data.init_args.max_lenght", "3"],
            "--data.init_args.max_lenght: RLHFDataModule has no option "
            "'max_lenght'; did you mean 'max_prompt_length' or 'max_response_length'?",
        ),
    ],
)
def test_a_misspelt_option_or_class_names_the_class_and_the_closest_valid_name(
    capsys, run_dir, config, args, expected
):
    message = error_of(capsys, "fit", "--config", config, *args, run_dir)
    assert message.startswith(f"dvpo: error: {expected}"), message


def test_a_misspelt_key_in_a_config_files_data_section_is_named(capsys, run_dir, tmp_path):
    (tmp_path / "mine.yaml").write_text("data:\n  init_args:\n    max_length: 10\n")
    message = error_of(capsys, "fit", "--config", SFT, "--config", str(tmp_path / "mine.yaml"), run_dir)
    assert "--data.init_args.max_length: RLHFDataModule has no option 'max_length'; did you mean " in message


def test_an_empty_data_file_is_named(capsys, run_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    message = error_of(
        capsys,
        "fit",
        "--config",
        SFT,
        "--data.init_args.dataset=empty.jsonl",
        "--data.init_args.tokenizer=bpe:300",
        run_dir,
    )
    assert "dataset file 'empty.jsonl' holds no rows (it is empty)" in message


def test_a_bare_model_directory_name_that_does_not_exist_is_not_looked_up_on_the_offline_hub(
    capsys, run_dir, tmp_path
):
    message = error_of(
        capsys,
        "fit",
        "--config",
        RM,
        "--model.init_args.model.name_or_path=mymodel",
        "--data.init_args.tokenizer=null",
        run_dir,
    )
    assert (
        f"model.init_args.model.name_or_path: 'mymodel' is not a local directory (there is no {tmp_path / 'mymodel'})"
        in message
    )
    assert "not in the Hugging Face cache while the hub is offline" in message


def test_limits_longer_than_the_models_context_are_refused_before_the_data_is_read(
    capsys, run_dir, monkeypatch
):
    def refuse(self, stage=None):
        raise AssertionError("the data was loaded before the lengths were checked")

    monkeypatch.setattr(RLHFDataModule, "setup", refuse)
    message = error_of(
        capsys, "fit", "--config", SFT, "--data.init_args.max_prompt_length=60", run_dir, *SMALL
    )
    assert (
        "--data.init_args.max_prompt_length=60 plus --data.init_args.max_response_length=16 allow 76-token sequences, "
        "but the model `policy` (inline llama) reads at most 64" in message
    )


def test_a_bad_row_under_strict_is_one_line_naming_file_and_line(capsys, run_dir, tmp_path):
    good = {"prompt": "apple river", "chosen": "apple river .", "rejected": "the ."}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(good) + "\n{oops\n")
    message = error_of(
        capsys,
        "fit",
        "--config",
        SFT,
        "--data.init_args.dataset=pairs.jsonl",
        "--data.init_args.tokenizer=bpe:300",
        "--data.init_args.strict=true",
        run_dir,
    )
    assert "pairs.jsonl" in message and "line 2" in message


def test_a_preflight_finding_is_one_message_with_exit_code_2(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/ here: the RM's SFT export is missing
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", RM])
    assert exit_info.value.code == 2
    assert "dvpo: error: The run's configuration cannot work:\n- model.init_args.model.name_or_path:" in (
        capsys.readouterr().err
    )


def test_debug_shows_the_original_error(run_dir):
    with pytest.raises(ValueError, match="scheduler must be one of"):
        main(["fit", "--config", SFT, "--model.init_args.optim.scheduler=cosin", run_dir, "--debug"])


def test_a_model_class_is_known_by_its_short_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.help", "DVPOModule"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert (
        "--model.value_model" in help_text and "--model.gold_values" in help_text
    )  # DVPOModule's own options


def test_top_level_help_and_a_mistyped_subcommand_answer_without_importing_torch():
    script = (
        "import sys\nfrom dvpo_lightning.cli import main\n"
        "for args in (['--help'], ['fitt']):\n"
        "    try:\n        main(args)\n    except SystemExit as exit:\n        print('exit', exit.code)\n"
        "print('heavy:', sorted({'torch', 'lightning', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert "{fit,validate,test,predict,generate,models}" in result.stdout
    assert "exit 0" in result.stdout and "exit 2" in result.stdout
    assert "invalid choice: 'fitt'" in result.stderr
    assert "heavy: []" in result.stdout


@pytest.mark.parametrize(
    "requested, env, trainer, expected",
    [
        (None, {}, {"accelerator": "cpu", "devices": 2}, 4),  # 8 cores, 2 CPU processes
        (None, {}, {"accelerator": "cpu", "devices": 16}, 1),  # never below one
        (None, {"LOCAL_WORLD_SIZE": "4"}, {}, 2),  # torchrun's processes on this machine
        (None, {"SLURM_NTASKS_PER_NODE": "8(x2)"}, {}, 1),
        (None, {"OMP_NUM_THREADS": "3"}, {"devices": 2}, 3),  # the user's choice
        (6, {"OMP_NUM_THREADS": "3"}, {}, 6),  # --threads wins
    ],
)
def test_threads_share_the_cores_among_the_processes_on_the_machine(
    monkeypatch, requested, env, trainer, expected
):
    for variable in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setattr("dvpo_lightning.cli.threads.available_cores", lambda: 8)
    assert choose_threads(requested, trainer)[0] == expected


def test_threads_below_one_are_refused():
    with pytest.raises(ValueError, match="--threads must be >= 1; got 0"):
        choose_threads(0, {})
