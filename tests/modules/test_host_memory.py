"""glibc's moving mmap threshold left a CPU run's resident memory several times what its tensors hold; stages that
train on the CPU fix it (`modules.host_memory`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from dvpo_lightning.modules import DPOModule, OptimConfig, host_memory
from tests.helpers.stages import tiny, topics_data

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

#: a checkpointed forward and backward of a small Llama; prints its resident peak above the start (GiB)
CHECKPOINTED_STEP = textwrap.dedent(
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from dvpo_lightning.callbacks.memory_probes import make_probe
    from dvpo_lightning.modules.host_memory import fix_mmap_threshold

    torch.set_num_threads(1)
    fix_mmap_threshold()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 256, (16, 256))
    probe = make_probe(torch.device("cpu"))
    probe.start()
    model(input_ids=ids, labels=ids).loss.backward()
    print(probe.peak()["peak_rss_above_baseline_gb"])
    """
)


@glibc
def test_the_fixed_threshold_halves_a_checkpointed_steps_resident_memory():
    def growth(setting: str) -> float:
        env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
        env[host_memory.OPTION] = setting
        result = subprocess.run(
            [sys.executable, "-c", CHECKPOINTED_STEP], env=env, capture_output=True, text=True, check=True
        )
        return float(result.stdout.split()[-1])

    moving, fixed = growth("dynamic"), growth("")
    assert fixed < 0.7 * moving, (fixed, moving)  # measured: 0.22 vs 0.54-0.69 GiB


@glibc
def test_the_threshold_is_4_mib_unless_the_environment_chooses(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv(host_memory.OPTION, raising=False)
    assert host_memory.chosen_mmap_threshold() == 4 * 2**20
    monkeypatch.setenv(host_memory.OPTION, "1048576")
    assert host_memory.chosen_mmap_threshold() == 2**20
    monkeypatch.setenv(host_memory.OPTION, "dynamic")
    assert host_memory.chosen_mmap_threshold() is None
    monkeypatch.setenv(host_memory.OPTION, "")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # glibc's own variable: the user's choice
    assert host_memory.chosen_mmap_threshold() is None


@pytest.mark.parametrize("value", ["4M", "0", "-1", str(64 * 2**20)])
def test_a_bad_threshold_names_the_variable(monkeypatch, value):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.35"))
    monkeypatch.setenv(host_memory.OPTION, value)
    with pytest.raises(ValueError, match=f"{host_memory.OPTION} must be a number of bytes .* got '{value}'"):
        host_memory.chosen_mmap_threshold()


def test_a_stage_fixes_the_threshold_when_it_builds_its_models_on_the_cpu(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("dvpo_lightning.modules.base.fix_mmap_threshold", lambda: calls.append(True))
    data = topics_data(tmp_path / "cache", mode="pairs", size=40)
    module = DPOModule(
        policy=tiny(), optim=OptimConfig(lr=1e-4), tokenizer=data.tokenizer, export_dir=str(tmp_path / "dpo")
    )
    module.configure_model()
    assert calls == [True]
