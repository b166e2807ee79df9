"""SmolLM2-135M-Instruct, the packaged real model: the README's commands. The real-model recipes (`configs/real/`) on
HH-RLHF each run two optimiser steps on CPU with short lengths and few rows and export a model, and the exported
policies answer in English through `dvpo generate`; `dvpo models fetch` on the fetched model checks it again; the
converted model gives the GGUF-loaded model's greedy answer and per-token log-probabilities. Skipped until
`dvpo models fetch smollm2-135m-instruct` has run (nothing is downloaded here) or where the HH-RLHF file is
absent."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from dvpo_lightning.cli import main
from dvpo_lightning.data.cache import default_cache_dir
from dvpo_lightning.data.model_files import resolve_model_path
from dvpo_lightning.data.model_files.gguf import load_gguf
from dvpo_lightning.data.model_files.packaged import packaged_gguf
from dvpo_lightning.models.export import EXPORT_INFO
from tests.conftest import HH_FILE
from tests.e2e.test_configs import CONFIGS, Chain, read_config

pytestmark = [pytest.mark.slow, pytest.mark.real]

REAL = {config.name: config for config in map(read_config, sorted(CONFIGS.glob("real/*.yaml")))}
POLICIES = ("real/dpo", "real/dvpo", "real/ppo", "real/grpo")
QUESTION = "How do I make a cup of tea?"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    if not HH_FILE.exists():
        pytest.skip(f"real HH-RLHF data not found at {HH_FILE}")
    if not packaged_gguf("smollm2-135m-instruct").is_file():
        pytest.skip("SmolLM2-135M-Instruct not fetched: run `dvpo models fetch smollm2-135m-instruct`")
    quick = (
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        f"--data.init_args.dataset={HH_FILE}",
        "--data.init_args.max_samples=48",
        "--data.init_args.val_size=4",
        "--data.init_args.max_prompt_length=64",
        "--data.init_args.max_response_length=32",
    )
    return Chain(tmp_path_factory.mktemp("real"), REAL, quick, cache=default_cache_dir())


def test_every_stage_has_a_real_recipe():
    assert set(REAL) == {"real/rm", "real/gvm", *POLICIES}


@pytest.mark.parametrize("name", list(REAL))
def test_real_recipe_runs_and_exports(name, chain, capsys):
    chain.run(name)
    export = chain.workdir / REAL[name].root / "model"
    info = json.loads((export / EXPORT_INFO).read_text())
    assert info["stage"] == REAL[name].class_path.rsplit(".", 1)[-1]
    if name not in POLICIES:
        return
    capsys.readouterr()
    main(["generate", str(export), "--prompt", QUESTION, "--greedy"])  # the README's command
    answer = capsys.readouterr().out.split("--- sample 1:", 1)[1]
    words = re.findall(r"[A-Za-z]+", answer)
    letters = sum(len(word) for word in words)
    assert len(words) >= 4 and letters >= 0.6 * len(answer.strip()), f"not English: {answer!r}"


@pytest.fixture(scope="module")
def fetched():
    if not packaged_gguf("smollm2-135m-instruct").is_file():
        pytest.skip("SmolLM2-135M-Instruct not fetched: run `dvpo models fetch smollm2-135m-instruct`")
    return packaged_gguf("smollm2-135m-instruct")


def test_the_fetch_command_on_a_fetched_model_checks_it_and_prints_its_directory(fetched, capsys):
    main(["models", "fetch", "smollm2-135m-instruct"])  # already fetched: no download, the conversion reused
    printed = capsys.readouterr().out.strip().splitlines()
    assert "smollm2-135m-instruct: already fetched" in printed[0]
    checked = next(line for line in printed if "answers 'What is the capital of France?' with" in line)
    assert "Paris" in checked.split(" with ", 1)[1]
    assert printed[-1] == resolve_model_path("packaged:smollm2-135m-instruct")


def test_the_converted_model_answers_and_scores_as_the_gguf_loaded_one(fetched):
    from_gguf, tokenizer = load_gguf(fetched)
    converted = AutoModelForCausalLM.from_pretrained(resolve_model_path(str(fetched)), dtype=torch.float32)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = ids["input_ids"]
    answers = []
    with torch.no_grad():
        for model in (from_gguf.eval(), converted.eval()):
            output = model.generate(
                ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
            log_probs = model(output).logits[:, :-1].log_softmax(-1).gather(-1, output[:, 1:, None])
            answers.append((output, log_probs))
    (gguf_output, gguf_log_probs), (output, log_probs) = answers
    assert torch.equal(output, gguf_output)
    assert "Paris" in tokenizer.decode(output[0, ids.shape[1] :])
    torch.testing.assert_close(log_probs, gguf_log_probs, rtol=0, atol=1e-5)
