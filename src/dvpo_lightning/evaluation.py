"""Evaluate exported policies on held-out prompts: gold reward, KL to a reference, win rate.

Every policy is judged the same way: the same prompts (the data module's validation split), the same sampling
and the same seed, so numbers of different algorithms and runs compare directly. The gold reward needs a
built-in task; the KL is the sequence-level KL to the reference estimated on the policy's own samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dvpo_lightning.algos import sequence_kl
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, freeze
from dvpo_lightning.rl import (
    AdvantageConfig,
    ExperienceMaker,
    PPOConfig,
    SamplingConfig,
    Scorers,
    StateValues,
    generate_responses,
    gold_rewards,
    policy_logprobs,
)


@dataclass
class PolicyReport:
    """What a policy's answers to the held-out prompts are worth."""

    gold_reward: float
    gold_reward_std: float
    gold_fraction: float
    kl_ref: float  # mean over responses of the summed per-token k1 estimate
    kl_ref_k3: float
    response_length: float
    finished_rate: float
    per_prompt_gold: list[float]  # in prompt order, for win rates

    def summary(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "per_prompt_gold"}


def evaluation_data(
    dataset: str = "builtin:topics", tokenizer: str | None = None, **options
) -> RLHFDataModule:
    """A prompts-mode data module whose validation split holds the evaluation prompts."""
    datamodule = RLHFDataModule(dataset=dataset, tokenizer=tokenizer, mode="prompts", **options)
    datamodule.setup("validate")
    if datamodule.task is None:
        raise ValueError(f"evaluation needs a built-in task for its gold reward; got dataset={dataset!r}")
    return datamodule


@torch.no_grad()
def evaluate_policy(
    policy_dir: str,
    reference_dir: str,
    datamodule: RLHFDataModule,
    sampling: SamplingConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> PolicyReport:
    """Sample one answer per validation prompt from the policy and score it."""
    tokenizer, task = datamodule.tokenizer, datamodule.task
    policy = build_policy(ModelSpec(name_or_path=policy_dir), tokenizer, role="policy").to(device).eval()
    reference = (
        build_policy(ModelSpec(name_or_path=reference_dir), tokenizer, role="reference").to(device).eval()
    )
    temperature = sampling.temperature if sampling.do_sample else 1.0
    golds, fractions, kl_k1, kl_k3, lengths, finished = [], [], [], [], [], []
    cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):  # the caller's random streams are left as they were
        torch.manual_seed(seed)
        for batch in datamodule.val_dataloader():
            responses = generate_responses(
                policy,
                batch["prompt_input_ids"].to(device),
                batch["prompt_attention_mask"].to(device),
                sampling,
                tokenizer,
            )
            gold, fraction = gold_rewards(task, tokenizer, responses)
            logprobs = policy_logprobs(policy, responses, temperature)[0]
            ref_logprobs = policy_logprobs(reference, responses, temperature)[0]
            mask = responses.response_mask
            golds.append(gold)
            fractions.append(fraction)
            kl_k1.append(sequence_kl(logprobs, ref_logprobs, mask, "k1").cpu())
            kl_k3.append(sequence_kl(logprobs, ref_logprobs, mask, "k3").cpu())
            lengths.append(responses.lengths.float().cpu())
            finished.append(responses.finished.float().cpu())
    gold = torch.cat(golds)
    return PolicyReport(
        gold_reward=float(gold.mean()),
        gold_reward_std=float(gold.std()),
        gold_fraction=float(torch.cat(fractions).mean()),
        kl_ref=float(torch.cat(kl_k1).mean()),
        kl_ref_k3=float(torch.cat(kl_k3).mean()),
        response_length=float(torch.cat(lengths).mean()),
        finished_rate=float(torch.cat(finished).mean()),
        per_prompt_gold=gold.tolist(),
    )


def win_rate(candidate: list[float], baseline: list[float]) -> float:
    """How often the candidate's answer beats the baseline's on the same prompt (ties count half)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(
            f"win_rate needs two equally long, non-empty lists; got {len(candidate)} and {len(baseline)}"
        )
    a, b = torch.tensor(candidate), torch.tensor(baseline)
    return float(((a > b).float() + 0.5 * (a == b).float()).mean())


@torch.no_grad()
def dvpo_token_credit(
    policy_dir: str,
    value_model_dir: str,
    reference_dir: str,
    datamodule: RLHFDataModule,
    sampling: SamplingConfig,
    count: int = 4,
    seed: int = 0,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> list[dict]:
    """Token-level view of DVPO on a few held-out prompts: per response token, the GVM's value V(s_t), DVPO's
    advantage (before whitening) and, on a built-in task, the gold reward of that token.

    Returns one dict per response: `prompt`, `tokens`, `value`, `advantage`, `gold` (lists aligned with `tokens`;
    an unfinished response gets a final "(cut)" entry carrying the gold penalty for not finishing).
    """
    tokenizer, task = datamodule.tokenizer, datamodule.task
    policy = build_policy(ModelSpec(name_or_path=policy_dir), tokenizer, role="policy").eval()
    reference = freeze(build_policy(ModelSpec(name_or_path=reference_dir), tokenizer, role="reference"))
    gvm = freeze(build_value_model(ModelSpec(name_or_path=value_model_dir), tokenizer, role="GVM"))
    ppo = PPOConfig(gamma=gamma, lam=lam, whiten_advantages=False)
    maker = ExperienceMaker(
        policy,
        reference,
        Scorers(values=StateValues(gvm)),
        ppo,
        AdvantageConfig("gvm"),
        kl_coef=lambda: ppo.kl_coef,
        temperature=sampling.temperature,
    )
    batch = next(iter(datamodule.val_dataloader()))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        responses = generate_responses(
            policy,
            batch["prompt_input_ids"][:count],
            batch["prompt_attention_mask"][:count],
            sampling,
            tokenizer,
        )
    experience = maker.make(responses)
    rows = []
    for row in range(len(responses.finished)):
        mask = responses.response_mask[row]
        ids = responses.response_input_ids[row][mask]
        prompt = tokenizer.decode(responses.prompt_input_ids[row][responses.prompt_attention_mask[row]])
        tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
        finished = bool(responses.finished[row])
        entry = {
            "prompt": prompt,
            "tokens": tokens + ([] if finished else ["(cut)"]),
            "value": experience.values[row][mask].tolist(),
            "advantage": experience.advantages[row][mask].tolist(),
        }
        if task is not None:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            entry["gold"] = task.token_scores(prompt, text, finished)
        rows.append(entry)
    return rows
