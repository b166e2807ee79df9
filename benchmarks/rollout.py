"""`rollout`: generated tokens per second of the engine's rollout backends against a bare `model.generate` call.

All sample from the same random Llama policy, the same prompt batch (the built-in task's, left-padded) and the same
settings (temperature 1, no top-k / top-p, min_new_tokens = max_new_tokens so every row generates exactly
`new_tokens` tokens). The engine's `generate` backend (`rl.generate_responses`) adds what RL needs on top of the
bare call: the pad token suppressed at every step, and the split layout (response mask cut after the first EOS,
finished flags). The `compiled` backend (`rl.compiled_rollout`: static KV cache, one `torch.compile`d decoding step)
does the same with a compiled step; its compile and warm-up time is reported on its own. Runs alternate between the
three (one warm-up run of each first, which compiles) and the median is reported, with each one's model FLOP/s as a
fraction of the machine's measured matmul peak (`benchmarks.flops`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.cost import llama
from benchmarks.flops import LinearWork, describe_peak, fraction_of_peak, matmul_peak, percent
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import alternating, synchronize
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy
from dvpo_lightning.rl import SamplingConfig, generate_responses, warmup_seconds

TARGET = 0.95  # engine tokens/s over bare generate tokens/s
COMPILED_TARGET = 2.0  # compiled backend tokens/s over bare generate tokens/s, after its warm-up
CALLS = ("engine", "bare", "compiled")


@dataclass(frozen=True)
class Scale:
    sizes: dict[str, dict]  # name -> architecture
    batch: int
    new_tokens: int
    runs: int  # timed runs of each, after one warm-up run
    compile_backend: str  # of the compiled backend; "eager" traces the graph without generating code


FULL = Scale(
    sizes={"h256-l4": llama(256, 4), "h512-l8": llama(512, 8)},
    batch=32,
    new_tokens=16,
    runs=21,
    compile_backend="inductor",
)
# Quick: the compiled backend's graph is traced, not compiled (inductor takes tens of seconds even on this model).
QUICK = Scale(sizes={"h32-l2": llama(32, 2)}, batch=4, new_tokens=4, runs=2, compile_backend="eager")


def run(quick: bool, device: torch.device) -> Report:
    scale = QUICK if quick else FULL
    data = RLHFDataModule("builtin:topics", mode="prompts", batch_size=scale.batch, builtin_size=1000)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    prompt_ids = batch["prompt_input_ids"].to(device)  # [B, P]
    prompt_mask = batch["prompt_attention_mask"].to(device)  # [B, P]
    tokenizer = data.tokenizer
    sampling = SamplingConfig(max_new_tokens=scale.new_tokens, min_new_tokens=scale.new_tokens)
    compiled = SamplingConfig(
        max_new_tokens=scale.new_tokens,
        min_new_tokens=scale.new_tokens,
        backend="compiled",
        backend_options={"compile_backend": scale.compile_backend},
    )
    peak = matmul_peak(device, quick=quick)
    prompt_tokens = int(prompt_mask.sum())
    generated = scale.batch * scale.new_tokens
    table = Table(
        f"Tokens/s, batch {scale.batch}, {scale.new_tokens} new tokens, median of {scale.runs} runs",
        [
            "model",
            "engine (tokens/s)",
            "bare generate (tokens/s)",
            "ratio",
            f"target >= {TARGET}",
            "compiled (tokens/s)",
            "compiled / bare",
            f"target >= {COMPILED_TARGET}",
            "compile + warm-up (s)",
            "% of matmul peak (engine / bare / compiled)",
        ],
    )
    raw = {"matmul_peak_flops": peak}
    for size, arch in scale.sizes.items():
        print(
            f"[rollout] {size}: {scale.runs} runs each of the engine, bare generate and the compiled backend"
        )
        policy = build_policy(ModelSpec(arch=dict(arch)), tokenizer).to(device).eval()
        calls = {
            "engine": partial(engine_tokens, policy, prompt_ids, prompt_mask, sampling, tokenizer),
            "bare": partial(bare_tokens, policy, prompt_ids, prompt_mask, sampling, tokenizer),
            "compiled": partial(engine_tokens, policy, prompt_ids, prompt_mask, compiled, tokenizer),
        }
        rates = {name: [] for name in calls}
        for run_index in range(scale.runs + 1):
            for name in alternating(calls, run_index):
                rate = tokens_per_second(calls[name], device)
                if run_index > 0:  # the first run of each is a warm-up (the compiled backend compiles in it)
                    rates[name].append(rate)
        medians = {name: statistics.median(values) for name, values in rates.items()}
        # Each run's calls follow each other, so their ratios are the least disturbed by a busy machine.
        ratio, compiled_ratio = (
            statistics.median(fast / bare for fast, bare in zip(rates[name], rates["bare"]))
            for name in ("engine", "compiled")
        )
        # FLOPs of a rollout: the prompts' real tokens and every generated token through the policy.
        flops = LinearWork.of(policy).forward(prompt_tokens + generated, logit_tokens=generated)
        fractions = {name: fraction_of_peak(flops, generated / medians[name], peak) for name in CALLS}
        compile_seconds = warmup_seconds(policy)
        table.rows.append(
            [
                size,
                f"{medians['engine']:.0f}",
                f"{medians['bare']:.0f}",
                f"{ratio:.3f}",
                verdict(ratio, TARGET, at_least=True, quick=quick),
                f"{medians['compiled']:.0f}",
                f"{compiled_ratio:.2f}",
                verdict(compiled_ratio, COMPILED_TARGET, at_least=True, quick=quick),
                f"{compile_seconds:.1f}",
                " / ".join(percent(fractions[name]) for name in CALLS),
            ]
        )
        raw[size] = {
            **{f"{name}_tokens_per_s": rates[name] for name in CALLS},
            "ratio": ratio,
            "compiled_ratio": compiled_ratio,
            "compile_and_warmup_seconds": compile_seconds,
            "flops_per_rollout": flops,
            "fraction_of_matmul_peak": fractions,
        }
    notes = [
        "Same model, prompts and sampling settings for all; the engine also suppresses the pad token and builds "
        "the split layout (response mask, finished flags) from the output.",
        f"compiled: `sampling.backend: compiled` with torch.compile's {scale.compile_backend!r} backend (static KV "
        "cache, the decoding step compiled once per shape bucket); its first run compiles, and that time is the "
        "'compile + warm-up' column, not counted in its tokens/s.",
        "Runs alternate between the three after one warm-up run of each; tokens/s = generated tokens / wall time "
        "(median over runs); ratios = median over runs of a backend's rate over the bare rate of the same run.",
        describe_peak(peak, device),
    ]
    return Report("rollout", "rollout: the engine's backends vs bare generate", [table], raw, notes)


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
