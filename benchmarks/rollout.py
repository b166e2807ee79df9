"""`rollout`: generated tokens per second of the engine's rollout against a bare `model.generate` call.

Both sample from the same random Llama policy, the same prompt batch (the built-in task's, left-padded) and the
same settings (temperature 1, no top-k / top-p, min_new_tokens = max_new_tokens so every row generates exactly
`new_tokens` tokens). The engine (`rl.generate_responses`) adds what RL needs on top of the bare
call: the pad token suppressed at every step, and the split layout (response mask cut after the first EOS,
finished flags). Runs alternate between the two (one warm-up run of each first) and the median is reported.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.cost import llama
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import alternating, synchronize
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.rl import SamplingConfig, generate_responses

TARGET = 0.95  # engine tokens/s over bare generate tokens/s


@dataclass(frozen=True)
class Scale:
    sizes: dict[str, dict]  # name -> architecture
    batch: int
    new_tokens: int
    runs: int  # timed runs of each, after one warm-up run


FULL = Scale(sizes={"h256-l4": llama(256, 4), "h512-l8": llama(512, 8)}, batch=32, new_tokens=16, runs=21)
QUICK = Scale(sizes={"h32-l2": llama(32, 2)}, batch=4, new_tokens=4, runs=2)


def run(quick: bool, device: torch.device) -> Report:
    scale = QUICK if quick else FULL
    data = RLHFDataModule("builtin:topics", mode="prompts", batch_size=scale.batch, builtin_size=1000)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    prompt_ids = batch["prompt_input_ids"].to(device)  # [B, P]
    prompt_mask = batch["prompt_attention_mask"].to(device)  # [B, P]
    tokenizer = data.tokenizer
    sampling = SamplingConfig(max_new_tokens=scale.new_tokens, min_new_tokens=scale.new_tokens)
    table = Table(
        f"Tokens/s, batch {scale.batch}, {scale.new_tokens} new tokens, median of {scale.runs} runs",
        ["model", "engine (tokens/s)", "bare generate (tokens/s)", "ratio", f"target >= {TARGET}"],
    )
    raw = {}
    for size, arch in scale.sizes.items():
        print(f"[rollout] {size}: {scale.runs} runs each of the engine and of bare generate")
        policy = build_policy(ModelSpec(arch=dict(arch)), tokenizer).to(device).eval()
        calls = {
            "engine": partial(engine_tokens, policy, prompt_ids, prompt_mask, sampling, tokenizer),
            "bare": partial(bare_tokens, policy, prompt_ids, prompt_mask, sampling, tokenizer),
        }
        rates = {name: [] for name in calls}
        for run_index in range(scale.runs + 1):
            for name in alternating(calls, run_index):
                rate = tokens_per_second(calls[name], device)
                if run_index > 0:  # the first run of each is a warm-up
                    rates[name].append(rate)
        engine_rate, bare_rate = (statistics.median(rates[name]) for name in ("engine", "bare"))
        # Each run's two calls follow each other, so their ratio is the least disturbed by a busy machine.
        ratio = statistics.median(engine / bare for engine, bare in zip(rates["engine"], rates["bare"]))
        table.rows.append(
            [
                size,
                f"{engine_rate:.0f}",
                f"{bare_rate:.0f}",
                f"{ratio:.3f}",
                verdict(ratio, TARGET, at_least=True),
            ]
        )
        raw[size] = {
            "engine_tokens_per_s": rates["engine"],
            "bare_tokens_per_s": rates["bare"],
            "ratio": ratio,
        }
    notes = [
        "Same model, prompts and sampling settings for both; the engine also suppresses the pad token and builds "
        "the split layout (response mask, finished flags) from the output.",
        "Runs alternate between the two after one warm-up run of each; tokens/s = generated tokens / wall time "
        "(median over runs); ratio = median over runs of the engine's rate over the bare rate of the same run.",
    ]
    return Report("rollout", "rollout: engine generation vs bare generate", [table], raw, notes)


def tokens_per_second(generate, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    tokens = generate()
    synchronize(device)
    return tokens / (time.perf_counter() - start)


def engine_tokens(policy, prompt_ids, prompt_mask, sampling: SamplingConfig, tokenizer) -> int:
    """The engine's rollout; returns the number of response tokens it generated."""
    responses = generate_responses(policy, prompt_ids, prompt_mask, sampling, tokenizer)
    return int(responses.response_mask.sum())


def bare_tokens(policy, prompt_ids, prompt_mask, sampling: SamplingConfig, tokenizer) -> int:
    """A bare `generate` call with the same sampling; returns the number of tokens it generated."""
    sequences = policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask.long(),
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens,
        do_sample=True,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    return (sequences.shape[1] - prompt_ids.shape[1]) * sequences.shape[0]
