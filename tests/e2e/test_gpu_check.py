"""`make gpu-check`: the CPU dry run runs every stage and variant the GPU run does, and reports them honestly.

The dry run is the real command (`python -m benchmarks.gpu_check --device cpu`) in a fresh process, at toy size.
What only a GPU runs (bf16, FSDP1, the 1B model's memory) is checked here as far as a CPU allows: the GPU runs'
configs parse against the current code with the settings they promise, and the stand-in model has
Llama-3.2-1B's exact parameter count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from torch import nn
from transformers import AutoTokenizer

from benchmarks import gpu_check
from benchmarks.gpu_plan import (
    CPU_SCALE,
    GPU_SCALE,
    LLAMA_3_2_1B,
    STAGES,
    VARIANTS,
    config_files,
    plan,
    write_tokenizer,
)
from benchmarks.gpu_report import TRAINED_COPIES, model_states
from dvpo_lightning.cli import run_cli
from dvpo_lightning.models import ModelSpec, build_policy

REPO = Path(__file__).resolve().parents[2]
ON_POLICY = [name for name, stage in STAGES.items() if stage.on_policy]
ALL_RUNS = [run.name for run in plan(list(STAGES), list(VARIANTS))]
LLAMA_3_2_1B_PARAMETERS = 1_235_814_400  # tied embeddings: 128256 x 2048 + 16 layers of 60,821,504 + a norm


def _dry_run(tmp: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--output", str(tmp / "out")]
    command += ["--workdir", str(tmp / "work"), "--keep-workdir", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = tmp / "out" / "gpu.json"
    assert report.exists(), f"no report:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done, json.loads(report.read_text())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    done, report = _dry_run(tmp)
    return tmp, done, report, {record["run"]: record for record in report["results"]["runs"]}


def test_dry_run_passes_and_runs_what_the_gpu_run_does(dry_run):
    _, done, report, runs = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list(runs) == ALL_RUNS  # the same plan as on a GPU: every stage, single and FSDP2, DVPO's variants
    assert {name: record["status"] for name, record in runs.items() if record["status"] != "ok"} == {
        "dvpo/fsdp1": "skipped"  # Lightning runs FSDP1 on CUDA only
    }
    assert report["results"]["failed"] == []
    assert f"gpu-check: {len(ALL_RUNS) - 1} runs ok, 1 skipped, 0 failed or not run, in" in done.stdout


def test_every_run_has_its_per_step_peak_memory_and_times(dry_run):
    _, _, _, runs = dry_run
    for name, record in runs.items():
        if record["status"] != "ok":
            continue
        on_policy = record["stage"] in ON_POLICY
        batches = CPU_SCALE.iterations if on_policy else CPU_SCALE.steps
        assert record["training_batches"] == batches, name
        steps = CPU_SCALE.iterations * CPU_SCALE.steps_per_iteration if on_policy else CPU_SCALE.steps
        assert record["optimizer_steps"] == steps, name
        # One PeakMemoryMonitor value per step, as logged to the run's metrics.csv.
        assert record["peak_metric"] == "peak_rss_above_baseline_gb"
        assert len(record["peak_gb_per_step"]) == batches, name
        assert record["peak_gb"] == max(record["peak_gb_per_step"])
        assert len(record["step_seconds"]) == batches and record["step_seconds_median"] > 0
        if on_policy:
            assert sorted(record["rl_stage_seconds"]) == ["generate", "score", "update"], name
            assert all(len(values) == batches for values in record["rl_stage_seconds"].values())
            assert sorted(record["rl_stage_peak_gb"]) == ["generate", "score", "update"], name
        else:
            assert record["rl_stage_seconds"] == {}


def test_floors_count_each_models_states(dry_run):
    _, _, report, runs = dry_run
    gib = 2**30

    def floor(record: dict, trained: tuple[str, ...]) -> float:
        models = record["models"]
        return sum((16 if name in trained else 4) * models[name]["parameters"] for name in models) / gib

    dvpo, ppo = runs["dvpo/single"], runs["ppo/single"]
    assert sorted(dvpo["models"]) == ["policy", "reference", "value_model"]
    assert sorted(ppo["models"]) == ["critic_model", "policy", "reference", "reward_model"]
    assert dvpo["floor_gb"] == pytest.approx(floor(dvpo, ("policy",)))
    assert ppo["floor_gb"] == pytest.approx(floor(ppo, ("policy", "critic_model")))
    ratios = report["results"]["dvpo_ppo_ratios"]
    assert sorted(ratios) == ["fsdp2", "single"]
    assert ratios["single"]["floor_gb"] == pytest.approx(dvpo["floor_gb"] / ppo["floor_gb"])
    assert ratios["single"]["peak_gb"] == pytest.approx(dvpo["peak_gb"] / ppo["peak_gb"])


def test_dvpo_variants_run_what_they_say(dry_run):
    tmp, _, _, runs = dry_run

    def config(folder: str) -> dict:
        return yaml.safe_load((tmp / "work" / folder / "logs" / "version_0" / "config.yaml").read_text())

    lora = runs["dvpo/lora"]["models"]
    assert "reference" not in lora  # the policy with its adapter disabled is the reference
    assert 0 < lora["policy"]["trained_parameters"] < lora["policy"]["parameters"]
    assert config("dvpo-lora")["model"]["init_args"]["reference_as_disabled_adapter"] is True
    assert config("dvpo-single")["model"]["init_args"]["policy"]["gradient_checkpointing"] is True
    assert config("dvpo-no-gc")["model"]["init_args"]["policy"]["gradient_checkpointing"] is False
    for stage in STAGES:
        strategy = config(f"{stage}-fsdp2")["trainer"]["strategy"]
        assert strategy["class_path"].endswith("ModelParallelStrategy")
        assert strategy["init_args"]["data_parallel_size"] == 1


def test_report_shows_ratios_runs_and_where_it_ran(dry_run):
    tmp, _, report, _ = dry_run
    markdown = (tmp / "out" / "gpu.md").read_text()
    for column in (
        "memory ratio",
        "time ratio",
        "model-state floor ratio",
        "peak memory per step, max (GiB)",
        "generate / score / update (s)",
        "model-state floor (GiB)",
    ):
        assert f"| {column} |" in markdown, column
    assert "- command: `python -m benchmarks.gpu_check --device cpu" in markdown
    assert (
        report["machine"]["device"] == "cpu" and report["results"]["versions"]["torch"] == torch.__version__
    )
    assert not (tmp / "work" / "dvpo-single" / "model").exists()  # only the providers' exports are kept
    assert (tmp / "work" / "gvm-single" / "model" / "config.json").exists()


def test_a_failing_run_is_reported_and_named_in_the_exit_status(tmp_path, monkeypatch, capsys):
    def broken_cli(args):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(gpu_check, "run_cli", broken_cli)
    threads = torch.get_num_threads()
    options = ["--device", "cpu", "--only", "rm", "--variants", "single"]
    status = gpu_check.main([*options, "--output", str(tmp_path / "out"), "--workdir", str(tmp_path / "w")])
    torch.set_num_threads(threads)
    transformers.utils.logging.enable_progress_bar()
    assert status == 1
    out = capsys.readouterr().out
    assert "gpu-check: sft/single FAILED: RuntimeError: out of memory" in out
    assert "gpu-check: rm/single NOT RUN: needs the export of sft/single" in out
    assert "0 runs ok, 0 skipped, 2 failed or not run (sft/single, rm/single)" in out
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())["results"]
    assert report["failed"] == ["sft/single", "rm/single"]
    assert "broken_cli" in report["runs"][0]["traceback"]
    assert "**sft/single failed**: RuntimeError: out of memory" in (tmp_path / "out" / "gpu.md").read_text()


def test_gpu_runs_configs_parse_with_the_settings_they_promise(tmp_path, capsys):
    for run in plan(list(STAGES), list(VARIANTS)):
        files = config_files(run, GPU_SCALE, tmp_path, cuda=True)
        with pytest.raises(SystemExit) as exited:
            run_cli(["fit", *(arg for path in files for arg in ("--config", str(path))), "--print_config"])
        assert exited.value.code in (0, None), run.name
        config = yaml.safe_load(capsys.readouterr().out)
        trainer, model = config["trainer"], config["model"]["init_args"]
        strategy = trainer.get("strategy")
        strategy = strategy["class_path"] if isinstance(strategy, dict) else strategy
        expected = {"fsdp2": "ModelParallelStrategy", "fsdp1": "FSDPStrategy"}.get(run.variant, "auto")
        assert strategy.endswith(expected), run.name
        assert (trainer["accelerator"], trainer["devices"]) == ("gpu", 1), run.name
        assert trainer["precision"] == ("32-true" if run.variant == "fsdp2" else "bf16-mixed"), run.name
        if run.variant == "fsdp2":
            assert model["fsdp"]["param_dtype"] == "bfloat16"
        trained = model.get("policy") or model["model"]
        assert trained["gradient_checkpointing"] is (run.variant != "no-gc"), run.name
        frozen = [
            model[name]
            for name in ("reference", "value_model", "reward_model", "dpo_model")
            if model.get(name)
        ]
        assert all(spec["dtype"] == ("float32" if run.variant == "fsdp1" else "bfloat16") for spec in frozen)
        if run.stage == "sft":
            assert trained["arch"]["hidden_size"] == 2048 and trained["arch"]["num_hidden_layers"] == 16


def test_the_stand_in_model_has_llama_3_2_1b_parameter_count(tmp_path):
    write_tokenizer(tmp_path / "tokenizer", GPU_SCALE.vocab_size, tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert len(tokenizer) == 128256
    # The task's text tokenises as with the task's own tokenizer.
    ids = tokenizer("tell me about : cat river . answer :")["input_ids"]
    assert max(ids) < 100 and tokenizer.unk_token_id not in ids
    with torch.device("meta"):
        model = build_policy(ModelSpec(arch=LLAMA_3_2_1B), tokenizer)
    assert sum(p.numel() for p in model.parameters()) == LLAMA_3_2_1B_PARAMETERS


def test_model_states_count_copies_in_each_parameters_dtype():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.trained = nn.Linear(3, 2)  # 8 fp32 parameters
            self.frozen = nn.Linear(4, 4, bias=False).to(torch.bfloat16).requires_grad_(False)
            self.tied = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, bias=False))
            self.tied[1].weight = self.tied[0].weight  # 10 fp32 parameters, shared

        def hf_models(self):
            return {"trained": self.trained, "frozen": self.frozen, "tied": self.tied}

    states = model_states(Stage())
    assert states["trained"] == {
        "parameters": 8,
        "trained_parameters": 8,
        "state_bytes": 8 * 4 * TRAINED_COPIES,
    }
    assert states["frozen"] == {"parameters": 16, "trained_parameters": 0, "state_bytes": 16 * 2}
    assert states["tied"]["state_bytes"] == 10 * 4 * TRAINED_COPIES


@pytest.mark.slow
def test_devices_2_runs_every_stage_sharded_over_two_processes(tmp_path):
    done, report = _dry_run(tmp_path, "--variants", "fsdp2", "--devices", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = {record["run"]: record for record in report["results"]["runs"]}
    for stage in STAGES:
        one, two = runs[f"{stage}/fsdp2"], runs[f"{stage}/fsdp2x2"]
        assert two["status"] == "ok" and len(two["peak_gb_per_step"]) == one["training_batches"]
        assert two["floor_gb"] == pytest.approx(one["floor_gb"] / 2)  # model states sharded over two ranks
    assert sorted(report["results"]["dvpo_ppo_ratios"]) == ["fsdp2", "fsdp2x2"]
