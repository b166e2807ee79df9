"""`python -m benchmarks.real --quick` on a tiny local model: every stage runs and the report lists every target.

Timings are never asserted: they are benchmark numbers, not properties of the code.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import real
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from tests.helpers.tiny import TINY_ARCH


@pytest.mark.slow  # about 30 s on 2 busy cores: 15 configurations, TRL included
def test_quick_real_benchmark_measures_every_stage_and_marks_every_target(tmp_path):
    tokenizer = RLHFDataModule("builtin:topics").tokenizer
    model = export_model(
        build_policy(ModelSpec(arch=dict(TINY_ARCH)), tokenizer), tokenizer, str(tmp_path / "model")
    )
    threads = torch.get_num_threads()
    try:
        path = real.main(["--model", model, "--quick", "--threads", "1", "--output", str(tmp_path / "out")])
    finally:
        torch.set_num_threads(threads)
    markdown = path.read_text()
    assert "- command: `python -m benchmarks.real --model" in markdown
    record = json.loads((tmp_path / "out" / "real.json").read_text())["results"]
    measured = {(row["stage"], row["lora"]) for row in record["results"]}
    assert measured == {(stage, lora) for stage in real.STAGES for lora in (True, False)} | {
        ("dpo-long", True)
    }
    assert all(row["step_s"] > 0 and row["peak_gb"] > 0 for row in record["results"])
    # Every target has its row, judged only at full scale: per fine-tuning, DPO's speed, peak and peak against TRL
    # with malloc fixed as ours, without and with checkpointing; RM's and GVM's time; and the 8 x 512 peak.
    verdicts = [line for line in markdown.splitlines() if line.endswith("| not judged (quick scale) |")]
    assert len(verdicts) == 2 * 8 + 1
    assert not [line for line in markdown.splitlines() if line.endswith(("| met |", "| missed |"))]
