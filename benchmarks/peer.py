"""`peer`: our `DPOModule` (through a Lightning Trainer) against TRL's `DPOTrainer` on the same jobs.

Two jobs. The built-in pairs: uniform, short, on a tiny model, where both frameworks mostly measure their own
overhead. Real HH-RLHF pairs (the harmless-base test file `HH_FILE`, outside the repository; skipped when absent):
a byte-level BPE tokenizer trained on them, a Llama of 25M parameters, and the data's real length spread (prompts
of 10 to 256 tokens, responses up to 128; longer rows are left out so that neither side truncates). Our data
module draws length-grouped batches there (`group_by_length`).

Both trainers get the same policy, the same reference (a different random init, so the first loss is not log 2), the
same pairs, batch size, beta, learning rate, Adam betas, gradient clip, CPU or GPU in fp32. On the built-in pairs TRL
is fed them in the order our loader draws them (its sequential sampler), so every step of both sees the same batch;
on HH each trainer takes its own best order: ours groups prompts and responses by length (`group_by_length`), TRL's
pairs are grouped by their total length (prompt + longest response, what HF's `group_by_length` does; TRL 1.16's
DPOTrainer has no length column for it) from the same seed. Reported: samples/s over the steady-state steps (each
run's pairs over its step intervals, warm-up steps left out, so set-up and dataset preparation are not counted; the
median over runs), the step's model FLOP/s as a fraction of the machine's measured matmul peak (`benchmarks.flops`),
and both trainers' loss on our first batch with the starting weights (TRL's computed on that batch fed to it), which
must agree to 1e-5.

Matching the tokenisation. TRL (1.16, non-conversational data) appends the EOS *text* to each completion,
tokenises `prompt + completion` as one string and takes the completion to start where that diverges from the
tokenised prompt; our data module tokenises the prompt and the response separately and appends the EOS *id*.
With the built-in task's word-level tokenizer (whitespace pre-tokeniser, no BOS) the two agree when TRL's
completions start with a space: TRL gets `" " + chosen` and `" " + rejected`. HH responses start with a space after
the prompt's final "Assistant:", where the byte-level pre-tokeniser splits anyway. The benchmark checks that every
pair's token ids are identical on both sides before it trains.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from datasets import Dataset

from benchmarks.cost import llama
from benchmarks.flops import LinearWork, describe_peak, fraction_of_peak, matmul_peak, percent
from benchmarks.report import Report, Table, verdict
from benchmarks.timing import StepClock, alternating, bare_trainer, synchronize
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.data.bad_rows import BadRow
from dvpo_lightning.data.builtin import get_task
from dvpo_lightning.data.formats import ChatRenderer, get_format
from dvpo_lightning.data.resumable import LengthGroupedShuffle
from dvpo_lightning.data.tokenizers import train_bpe_tokenizer
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from dvpo_lightning.modules import DPOModule, OptimConfig

SPEED_TARGETS = {"builtin": 1.2, "hh": 1.3}  # our samples/s over TRL's
LOSS_TOLERANCE = 1e-5
BETA = 0.1
LR = 1e-4
BETAS = (0.9, 0.999)  # TRL's AdamW defaults, given to ours too
MAX_LENGTH = 64  # built-in prompt and response budgets: longer than any built-in row, so nothing is truncated
HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
HH_MAX_PROMPT, HH_MAX_RESPONSE = 256, 128  # tokens (the response's EOS included); longer HH rows are left out


class Skipped(Exception):
    """The benchmark cannot run here; the message says why and what to install."""


@dataclass(frozen=True)
class Scale:
    arch: dict
    pairs: int
    batch: int
    steps: int  # per run
    warmup: int  # step intervals of each run left out
    rounds: int  # runs of each trainer, alternating, so that a slow spell of a shared machine hits both alike
    vocab: int = 0  # HH: the BPE tokenizer's vocabulary


def long_llama(hidden: int, layers: int) -> dict:
    """`llama(hidden, layers)` with room for an HH prompt and response."""
    return {**llama(hidden, layers), "max_position_embeddings": HH_MAX_PROMPT + HH_MAX_RESPONSE}


FULL = Scale(arch=llama(64, 2), pairs=512, batch=32, steps=50, warmup=5, rounds=3)
QUICK = Scale(arch=llama(32, 2), pairs=16, batch=4, steps=4, warmup=1, rounds=1)
HH_FULL = Scale(arch=long_llama(384, 8), pairs=256, batch=8, steps=10, warmup=2, rounds=2, vocab=8192)
HH_QUICK = Scale(arch=long_llama(32, 2), pairs=16, batch=4, steps=3, warmup=1, rounds=1, vocab=512)


@dataclass(frozen=True)
class Job:
    """What both trainers get: the policy and reference exports and the pairs (ours as a data module)."""

    policy_dir: str
    reference_dir: str
    pairs: Dataset
    data: RLHFDataModule
    #: what TRL's completions need in front to tokenise as ours (see the docstring)
    completion_prefix: str = " "
    #: TRL fed the pairs grouped by their total length (its own best order) instead of in ours
    trl_grouped: bool = False

    def order(self) -> list[int]:
        """The pairs' indices in the order our loader draws them."""
        return [int(index) for batch in self.data.train_dataloader() for index in batch["index"]]

    def trl_order(self) -> list[int]:
        """The order TRL is fed the pairs in: ours, or grouped by total length (prompt and longest response) as
        HF's `group_by_length` would (TRL 1.16's DPOTrainer has no length column for it), from the same seed."""
        if not self.trl_grouped:
            return self.order()
        rows = list(self.data.train_dataset)
        totals = [
            len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])) for row in rows
        ]
        sampler = LengthGroupedShuffle(totals, self.data.batch_size, seed=self.data.seed)
        return [rows[position]["row"] for position in sampler]


def run(quick: bool, device: torch.device) -> Report:
    if importlib.util.find_spec("trl") is None:
        raise Skipped("TRL is not installed: `pip install -e '.[bench]'` (or `make install`) brings it in")
    peak = matmul_peak(device, quick=quick)
    comparisons = {"builtin": QUICK if quick else FULL}
    if HH_FILE.exists():
        comparisons["hh"] = HH_QUICK if quick else HH_FULL
    results = {}
    with TemporaryDirectory(prefix="dvpo-bench-peer-") as tmp:
        for name, scale in comparisons.items():
            root = Path(tmp) / name
            job = prepare_job(scale, root) if name == "builtin" else prepare_hh_job(scale, root, HH_FILE)
            results[name] = compare(name, job, scale, device, root, peak)
    return make_report(results, comparisons, peak, device)


def compare(name: str, job: Job, scale: Scale, device: torch.device, root: Path, peak: float) -> dict:
    """Alternating runs of both trainers on `job`; their rates, first losses and model FLOP/s."""
    trainers = {
        "ours": partial(run_ours, job, scale, device),
        "trl": partial(run_trl, job, scale, device),
    }
    runs = {trainer: [] for trainer in trainers}
    for round_index in range(scale.rounds):
        for trainer in alternating(trainers, round_index):
            print(
                f"[peer] {name}, round {round_index + 1}/{scale.rounds}: {trainer}, {scale.steps} DPO steps"
            )
            runs[trainer].append(trainers[trainer](root / f"{trainer}{round_index}"))
    work = LinearWork.of(build_policy(ModelSpec(name_or_path=job.policy_dir), job.data.tokenizer))
    steady = slice(scale.warmup + 1, scale.steps)  # the steps that end the steady intervals
    pairs = scale.batch * (scale.steps - 1 - scale.warmup)
    rates, token_rates, fractions, tokens = {}, {}, {}, {}
    for trainer, order in (("ours", job.order()), ("trl", job.trl_order())):
        tokens[trainer] = step_tokens(job, scale, order)
        steady_tokens = sum(total for total, _ in tokens[trainer][steady])
        # A DPO step's model FLOPs: the policy's forward and backward and the reference's forward.
        steady_flops = sum(work.training(*step) + work.forward(*step) for step in tokens[trainer][steady])
        seconds = [sum(run["step_seconds"][scale.warmup :]) for run in runs[trainer]]
        rates[trainer] = [pairs / total for total in seconds]
        token_rates[trainer] = [steady_tokens / total for total in seconds]
        fractions[trainer] = statistics.median(
            fraction_of_peak(steady_flops, total, peak) for total in seconds
        )
    first_losses = {"ours": runs["ours"][0]["first_loss"], "trl": trl_first_loss(job, scale, device, root)}
    return {
        "runs": runs,
        "samples_per_s": {trainer: statistics.median(values) for trainer, values in rates.items()},
        "tokens_per_s": {trainer: statistics.median(values) for trainer, values in token_rates.items()},
        # Real tokens per second: the samples/s ratio over the same pairs, whichever batches each trainer's steps
        # drew. Each round's two runs follow each other, so their ratio is the least disturbed by a busy machine.
        "speedup": statistics.median(
            ours / trl for ours, trl in zip(token_rates["ours"], token_rates["trl"])
        ),
        "first_losses": first_losses,
        "first_loss_gap": abs(first_losses["ours"] - first_losses["trl"]),
        "fraction_of_matmul_peak": fractions,
        "step_tokens": tokens,
    }


def trl_first_loss(job: Job, scale: Scale, device: torch.device, root: Path) -> float:
    """TRL's loss on our loader's first batch, with the weights both trainers start from: its first step's loss
    were it fed our order."""
    trainer = trl_trainer(
        job, job.order(), scale, device, root / "trl-first-batch", beta=BETA, loss_type=["sigmoid"]
    )
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


def step_tokens(job: Job, scale: Scale, order: list[int]) -> list[tuple[int, int]]:
    """Each step's real tokens, the pairs taken in `order`: `(all, responses')`, a prompt counted with each of its
    two responses (what a DPO step without shared prompts runs), and the responses' tokens (the LM head's)."""
    rows = {row["row"]: row for row in job.data.train_dataset}
    steps = []
    for step in range(scale.steps):
        batch = [rows[index] for index in order[step * scale.batch : (step + 1) * scale.batch]]
        responses = sum(len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in batch)
        steps.append((responses + 2 * sum(len(row["prompt_ids"]) for row in batch), responses))
    return steps


def prepare_job(scale: Scale, tmp: Path) -> Job:
    """Export a random policy (init seed 0) and reference (seed 1) of `scale.arch`, and `scale.pairs` built-in pairs."""
    tokenizer = RLHFDataModule("builtin:topics").tokenizer
    pairs = get_task("topics", 0).preference_dataset(scale.pairs)
    return make_job(scale, tmp, tokenizer, pairs, max_lengths=(MAX_LENGTH, MAX_LENGTH), completion_prefix=" ")


def prepare_hh_job(scale: Scale, tmp: Path, path: Path) -> Job:
    """The first `scale.pairs` HH pairs (of `path`) that fit the budgets untruncated, a BPE tokenizer of
    `scale.vocab` trained on every pair, and random policy and reference exports with it."""
    hh, renderer = get_format("hh"), ChatRenderer(None)
    rows = []
    with gzip.open(path, "rt") as handle:
        for line in handle:
            try:
                rows.append(hh.parse(json.loads(line), renderer))
            except BadRow:
                continue  # the few rows whose chosen and rejected transcripts differ before the last turn
    texts = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]
    tokenizer = train_bpe_tokenizer(texts, scale.vocab, cache_dir=tmp / "cache")

    def fits(row: dict) -> bool:
        lengths = [len(tokenizer(row[key])["input_ids"]) + 1 for key in ("chosen", "rejected")]
        return len(tokenizer(row["prompt"])["input_ids"]) <= HH_MAX_PROMPT and max(lengths) <= HH_MAX_RESPONSE

    kept = [row for row in rows if fits(row)][: scale.pairs]
    if len(kept) < scale.pairs:
        raise ValueError(f"{path}: only {len(kept)} pairs fit the budgets; the benchmark needs {scale.pairs}")
    return make_job(
        scale,
        tmp,
        tokenizer,
        Dataset.from_list(kept),
        max_lengths=(HH_MAX_PROMPT, HH_MAX_RESPONSE),
        completion_prefix="",
        group_by_length=True,
    )


def make_job(
    scale: Scale,
    tmp: Path,
    tokenizer,
    pairs: Dataset,
    max_lengths: tuple[int, int],
    completion_prefix: str,
    group_by_length: bool = False,
) -> Job:
    policy_dir, reference_dir = (
        export_model(
            build_policy(ModelSpec(arch=dict(scale.arch), init_seed=seed), tokenizer),
            tokenizer,
            str(tmp / name),
        )
        for seed, name in enumerate(("policy", "reference"))
    )
    data = our_data(pairs, policy_dir, scale, tmp, max_lengths, group_by_length)
    return Job(policy_dir, reference_dir, pairs, data, completion_prefix, trl_grouped=group_by_length)


def our_data(
    pairs,
    tokenizer_dir: str,
    scale: Scale,
    tmp: Path,
    max_lengths: tuple[int, int] = (MAX_LENGTH, MAX_LENGTH),
    group_by_length: bool = False,
) -> RLHFDataModule:
    """The pairs as a prompt/chosen/rejected JSON lines file, read by our data module (no validation split)."""
    path = tmp / "pairs.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in pairs:
            handle.write(json.dumps({key: row[key] for key in ("prompt", "chosen", "rejected")}) + "\n")
    data = RLHFDataModule(
        str(path),
        tokenizer=tokenizer_dir,
        mode="pairs",
        batch_size=scale.batch,
        group_by_length=group_by_length,
        val_size=0,
        max_prompt_length=max_lengths[0],
        max_response_length=max_lengths[1],
        cache_dir=str(tmp / "cache"),
    )
    data.setup("fit")
    return data


def run_ours(job: Job, scale: Scale, device: torch.device, root: Path) -> dict:
    module = DPOModule(
        policy=ModelSpec(name_or_path=job.policy_dir),
        reference=ModelSpec(name_or_path=job.reference_dir),
        beta=BETA,
        share_prompts=True,  # our fastest setting, as TRL gets its own best order
        optim=OptimConfig(lr=LR, betas=BETAS),
        tokenizer=job.data.tokenizer,
        export_dir=str(root / "model"),
    )
    clock = StepClock()
    trainer = bare_trainer(device, root, scale.steps, [clock], gradient_clip_val=1.0)
    trainer.fit(module, datamodule=job.data)
    return {"first_loss": clock.first_loss, "step_seconds": clock.intervals}


def run_trl(job: Job, scale: Scale, device: torch.device, root: Path) -> dict:
    from transformers import TrainerCallback

    class StepEnds(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.ends.append(time.perf_counter())

    step_ends = StepEnds()
    trainer = trl_trainer(
        job, job.trl_order(), scale, device, root, callbacks=[step_ends], beta=BETA, loss_type=["sigmoid"]
    )
    trainer.train()
    return {"step_seconds": [later - earlier for earlier, later in zip(step_ends.ends, step_ends.ends[1:])]}


def trl_trainer(
    job: Job,
    order: list[int],
    scale: Scale,
    device: torch.device,
    root: Path,
    callbacks: list | None = None,
    peft_config=None,
    **loss_options,
):
    """TRL's `DPOTrainer` on `job`'s pairs in `order`, with our training settings and
    `loss_options` (`beta`, `loss_type`, `loss_weights`, ...) for its `DPOConfig`; every pair's token ids are
    checked to be ours. With a peft `peft_config` the policy gets LoRA and the reference is the policy with its
    adapter disabled (no reference model is loaded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(root),
        per_device_train_batch_size=scale.batch,
        max_steps=scale.steps,
        learning_rate=LR,
        adam_beta1=BETAS[0],
        adam_beta2=BETAS[1],
        optim="adamw_torch",
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_length=None,
        train_sampling_strategy="sequential",
        bf16=False,
        fp16=False,
        use_cpu=device.type != "cuda",
        dataloader_pin_memory=False,
        report_to="none",
        save_strategy="no",
        logging_steps=scale.steps,
        disable_tqdm=True,
        seed=0,
        **loss_options,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(job.policy_dir, dtype=torch.float32),
        ref_model=None
        if peft_config is not None
        else AutoModelForCausalLM.from_pretrained(job.reference_dir, dtype=torch.float32),
        peft_config=peft_config,
        args=args,
        train_dataset=trl_rows(job, order),
        processing_class=AutoTokenizer.from_pretrained(job.policy_dir),
        callbacks=callbacks or [],
    )
    check_same_tokens(job.data, order, trainer.train_dataset)
    return trainer


def trl_rows(job: Job, order: list[int]) -> Dataset:
    """`job`'s pairs in `order` as TRL reads them: it joins prompt and completion as text, so the completions get
    `job.completion_prefix` in front."""
    prefix = job.completion_prefix
    rows = [
        {
            "prompt": job.pairs[i]["prompt"],
            "chosen": prefix + job.pairs[i]["chosen"],
            "rejected": prefix + job.pairs[i]["rejected"],
        }
        for i in order
    ]
    return Dataset.from_list(rows)


def check_same_tokens(data: RLHFDataModule, order: list[int], trl_rows) -> None:
    """Every pair must reach both trainers as the same token ids; the first mismatch is an error naming it."""
    ours = {row["row"]: row for row in data.train_dataset}
    for position, (index, theirs) in enumerate(zip(order, trl_rows)):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if list(ours[index][key]) != list(theirs[key]):
                raise AssertionError(
                    f"pair {index} (TRL row {position}): {key} differ, ours {ours[index][key]} vs TRL {theirs[key]}"
                )


TITLES = {"builtin": "built-in pairs", "hh": "HH-RLHF pairs (harmless-base test)"}


def make_report(
    results: dict[str, dict], scales: dict[str, Scale], peak: float, device: torch.device
) -> Report:
    checks = Table("Targets", ["job", "quantity", "value", "target", "verdict"])
    tables = [checks]
    for name, result in results.items():
        scale, target = scales[name], SPEED_TARGETS[name]
        checks.rows += [
            [
                TITLES[name],
                "speed ours / TRL",
                f"{result['speedup']:.2f}x",
                f">= {target}x",
                verdict(result["speedup"], target, at_least=True, quick=scale in (QUICK, HH_QUICK)),
            ],
            [
                TITLES[name],
                "first-step loss gap",
                f"{result['first_loss_gap']:.2e}",
                f"<= {LOSS_TOLERANCE:.0e}",
                verdict(result["first_loss_gap"], LOSS_TOLERANCE),
            ],
        ]
        table = Table(
            f"DPO on the {TITLES[name]}, batch {scale.batch} pairs, beta {BETA}: {scale.rounds} alternating runs of "
            f"{scale.steps} steps each ({scale.warmup} warm-up steps of each run left out)",
            [
                "trainer",
                "samples (pairs)/s",
                "real tokens/s",
                "step (ms per batch)",
                "% of matmul peak",
                "first-step loss",
            ],
        )
        for trainer, label in (("ours", "dvpo_lightning DPOModule + Lightning"), ("trl", "trl.DPOTrainer")):
            rate = result["samples_per_s"][trainer]
            table.rows.append(
                [
                    label,
                    f"{rate:.1f}",
                    f"{result['tokens_per_s'][trainer]:.0f}",
                    f"{1000 * scale.batch / rate:.1f}",
                    percent(result["fraction_of_matmul_peak"][trainer]),
                    f"{result['first_losses'][trainer]:.7f}",
                ]
            )
        tables.append(table)
    notes = [
        f"built-in: random Llama {FULL.arch['hidden_size']} x {FULL.arch['num_hidden_layers']} layers (quick: "
        f"{QUICK.arch['hidden_size']} x {QUICK.arch['num_hidden_layers']}), the task's word-level tokenizer, "
        f"{FULL.pairs} pairs (quick: {QUICK.pairs}).",
        f"HH-RLHF: random Llama {HH_FULL.arch['hidden_size']} x {HH_FULL.arch['num_hidden_layers']} layers with a "
        f"byte-level BPE of {HH_FULL.vocab} tokens trained on the file's pairs (quick: "
        f"{HH_QUICK.arch['hidden_size']} x {HH_QUICK.arch['num_hidden_layers']}, {HH_QUICK.vocab} tokens); the "
        f"first {HH_FULL.pairs} pairs (quick: {HH_QUICK.pairs}) whose prompt fits {HH_MAX_PROMPT} tokens and "
        f"responses {HH_MAX_RESPONSE}, as they come; our loader groups prompts and responses by length, TRL's pairs "
        "are grouped by total length (its own best order)."
        + ("" if "hh" in results else f" Not run: {HH_FILE} is absent."),
        "Both: policy init seed 0, reference init seed 1 (so the first loss is not log 2); fp32; AdamW lr "
        f"{LR}, betas {BETAS}, no weight decay, constant schedule, gradient clip 1.0; TRL's sequential sampler. The "
        "first-step losses are both trainers' on our loader's first batch.",
        "Tokenisation matched: TRL appends the EOS text and tokenises prompt + completion together, ours tokenises "
        "them apart and appends the EOS id; the token ids of every pair were checked identical before training. No "
        "truncation on either side.",
        "Speed: pairs of each run's steady steps over their wall time between consecutive step ends (data loading, "
        "forward, backward, optimiser step and each framework's own per-step work), set-up and dataset preparation "
        "excluded; the median over runs. The speed ratio is that of real tokens per second (a prompt counted with "
        "each of its responses), the median over rounds: on HH the trainers' steps draw different batches, and "
        "tokens/s is their samples/s over the same pairs. TRL logs once (logging_steps = steps), ours has no "
        "logger.",
        "Ours reads each prompt once for its two responses (a KV cache copied to both rows); the FLOP/s count the "
        "work of a DPO step without that sharing (each prompt with each response), so both trainers' fractions "
        "measure the same work.",
        describe_peak(peak, device),
    ]
    raw = {
        **results,
        "matmul_peak_flops": peak,
        "scales": {name: vars(scale) for name, scale in scales.items()},
    }
    return Report("peer", "peer: DPO against TRL's DPOTrainer", tables, raw, notes)
