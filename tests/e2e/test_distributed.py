"""GVM, DVPO and DPO on 2 CPU processes (gloo) under DDP and FSDP2 against 1 process, and FSDP2 save/resume.

The runs are `tests/helpers/distributed_scenarios.py`, launched once per session as subprocesses (Lightning would
re-run the whole pytest session as rank 1 if a test built a multi-device Trainer in process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, export_model, value_head
from tests.helpers.distributed_scenarios import STEPS
from tests.helpers.stages import topics_data
from tests.helpers.tiny import TINY_ARCH

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "distributed_scenarios.py"
TWO_RANK_SCENARIOS = [
    "gvm-ddp",
    "gvm-fsdp2",
    "dvpo-ddp",
    "dvpo-fsdp2",
    "dpo-fsdp2",
    "gvm-fsdp2-resume",
    "dvpo-ddp-room",
    "dvpo-fsdp2-room",
]
LAUNCHER_VARIABLES = (
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _launch(command: list[str], cwd: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = topics_data(root / "cache").tokenizer
    export_model(build_policy(ModelSpec(arch=TINY_ARCH), tokenizer), tokenizer, str(root / "sft"))
    gvm = build_value_model(ModelSpec(arch=TINY_ARCH, init_seed=3), tokenizer)
    with torch.no_grad():
        value_head(gvm).weight.normal_(std=0.5)  # values that vary, so DVPO's advantages do
    export_model(gvm, tokenizer, str(root / "gvm"))
    paths = [
        "--root",
        str(root / "out"),
        "--sft",
        str(root / "sft"),
        "--gvm",
        str(root / "gvm"),
        "--cache",
        str(root / "cache"),
    ]
    repo = Path(__file__).resolve().parents[2]
    _launch(
        [sys.executable, str(SCRIPT), *paths, "gvm-single", "dvpo-single", "dpo-single", "dvpo-single-room"],
        repo,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch([*torchrun, str(SCRIPT), *paths, *TWO_RANK_SCENARIOS], repo)
    return root / "out"


def _weights(runs: Path, scenario: str) -> dict[str, torch.Tensor]:
    return load_file(runs / scenario / "model" / "model.safetensors")


def _result(runs: Path, scenario: str) -> dict:
    return json.loads((runs / scenario / "result.json").read_text())


@pytest.mark.parametrize("scenario", ["gvm-ddp", "gvm-fsdp2", "dvpo-ddp", "dvpo-fsdp2", "dpo-fsdp2"])
def test_two_ranks_train_exactly_like_one_process_on_the_same_global_batch(runs, scenario):
    algorithm = scenario.split("-")[0]
    single, sharded = _weights(runs, f"{algorithm}-single"), _weights(runs, scenario)
    result = _result(runs, scenario)
    assert (result["global_step"], result["world_size"]) == (
        _result(runs, f"{algorithm}-single")["global_step"],
        2,
    )
    assert set(sharded) == set(single)
    worst = max(float((sharded[key] - single[key]).abs().max()) for key in single)
    assert worst < 1e-6, f"{scenario} differs from the 1-process run by {worst}"


@pytest.mark.parametrize("scenario", ["dvpo-ddp-room", "dvpo-fsdp2-room"])
def test_ranks_that_drop_different_prompts_keep_step_and_train_like_one_process_on_the_kept_ones(
    runs, scenario
):
    """Rank 1 drops a prompt without room; rank 0 keeps as many prompts as rank 1, so both run the same
    optimiser steps and collectives, and the run equals one process trained on the prompts kept."""
    single, sharded = _weights(runs, "dvpo-single-room"), _weights(runs, scenario)
    result, single_result = _result(runs, scenario), _result(runs, "dvpo-single-room")
    assert result["global_step"] == single_result["global_step"] == 2
    assert result["logged"]["rollout/prompts_without_room"] == 0.5  # one prompt, averaged over the two ranks
    assert result["logged"]["rollout/prompts_dropped_to_balance"] == 0.5
    for name in ("policy/loss", "policy/grad_norm", "rollout/reward"):  # not per-rank means of token counts
        assert result["logged"][name] == pytest.approx(single_result["logged"][name], abs=1e-6), name
    worst = max(float((sharded[key] - single[key]).abs().max()) for key in single)
    assert worst < 1e-6, f"{scenario} differs from the 1-process run by {worst}"


def test_the_runs_actually_trained(runs):
    """Guards the equivalence test: identical weights must not come from weights that never moved."""
    start = load_file(runs.parent / "sft" / "model.safetensors")
    for scenario in ("dvpo-single", "dpo-single"):
        trained = _weights(runs, scenario)
        assert max(float((trained[key] - start[key]).abs().max()) for key in start) > 1e-3, scenario


def test_fsdp2_resume_continues_with_the_same_steps_optimiser_state_and_data(runs):
    """2 steps, a distributed checkpoint, then resume to step 3: bit-identical to 3 steps straight."""
    last = runs / "gvm-fsdp2-resume" / "checkpoints" / "last.ckpt"
    # a link to the newest step-named distributed checkpoint (a directory), never a directory rewritten in place
    assert last.is_symlink() and last.is_dir()
    assert last.resolve().name.endswith(f"step={STEPS}.ckpt")
    assert _result(runs, "gvm-fsdp2-resume")["global_step"] == _result(runs, "gvm-fsdp2")["global_step"]
    straight, resumed = _weights(runs, "gvm-fsdp2"), _weights(runs, "gvm-fsdp2-resume")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)


@pytest.mark.parametrize("scenario", ["gvm-fsdp2", "dvpo-fsdp2"])
def test_fsdp2_exports_an_ordinary_hf_directory(runs, scenario):
    directory = runs / scenario / "model"
    config = json.loads((directory / "config.json").read_text())
    assert not any("FSDP" in name for name in config["architectures"])
    tokenizer = topics_data(runs.parent / "cache").tokenizer
    build = build_value_model if scenario.startswith("gvm") else build_policy
    loaded = build(ModelSpec(name_or_path=str(directory)), tokenizer).eval()
    ids = torch.tensor([tokenizer("tell me about : cat river . answer :")["input_ids"]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()
