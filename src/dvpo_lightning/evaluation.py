"""Evaluate exported policies on held-out prompts (gold reward, KL to a reference, win rate) and exported value
models (reward models, GVMs, critics) on held-out pairs and on a policy's samples.

Every policy is judged the same way: the same prompts (the data module's validation split), the same sampling
and the same seed, so numbers of different algorithms and runs compare directly. The gold reward needs a
built-in task; the KL is the sequence-level KL to the reference estimated on the policy's own samples. Where no
gold reward exists (real data), `judge_policy` scores the same answers with reward models instead, e.g. one trained
on pairs the policy's own reward model never saw (the proxy-gold setup of arXiv 2210.10760).

A value model is judged as the DVPO paper judges it: its pairwise accuracy on held-out preference pairs (chosen
valued above rejected), by its mean value over a response's states and by its value of the complete response;
on a built-in task also by how its values of sampled responses agree with the gold reward, response by response
and token by token.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from dvpo_lightning.algos import get_advantage, last_token_values, masked_mean, sequence_kl
from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy, build_value_model, freeze
from dvpo_lightning.rl import (
    AdvantageConfig,
    ExperienceMaker,
    PPOConfig,
    Responses,
    SamplingConfig,
    Scorers,
    StateValues,
    generate_responses,
    gold_rewards,
    gold_token_rewards,
    pair_sequences,
    policy_logprobs,
)
from dvpo_lightning.rl.experience import ValueScorer


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
    for responses in held_out_responses(policy, datamodule, sampling, seed, device):
        gold, fraction = gold_rewards(task, tokenizer, responses)
        k1, k3 = sequence_kls(policy, reference, responses, temperature)
        golds.append(gold)
        fractions.append(fraction)
        kl_k1.append(k1)
        kl_k3.append(k3)
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


def sequence_kls(
    policy: torch.nn.Module, reference: torch.nn.Module, responses: Responses, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response `[B]` (on CPU), the summed per-token k1 and k3 estimates of KL(policy || reference)."""
    logprobs = policy_logprobs(policy, responses, temperature)[0]
    ref_logprobs = policy_logprobs(reference, responses, temperature)[0]
    mask = responses.response_mask
    return tuple(sequence_kl(logprobs, ref_logprobs, mask, kind).cpu() for kind in ("k1", "k3"))


@dataclass
class JudgedReport:
    """A policy's answers to the held-out prompts as judged by value models (reward models) instead of a gold
    reward: the proxy-gold setup of Gao et al. 2022 (arXiv 2210.10760) where no gold reward exists."""

    per_prompt: dict[
        str, list[float]
    ]  # judge name -> its score of each answer, in prompt order (for win rates)
    kl_ref: float  # mean over responses of the summed per-token k1 estimate
    response_length: float
    finished_rate: float

    def summary(self) -> dict:
        return {
            **{
                f"{name}_reward": float(torch.tensor(scores).mean())
                for name, scores in self.per_prompt.items()
            },
            "kl_ref": self.kl_ref,
            "response_length": self.response_length,
            "finished_rate": self.finished_rate,
        }


@torch.no_grad()
def judge_policy(
    policy_dir: str,
    reference_dir: str,
    datamodule: RLHFDataModule,
    sampling: SamplingConfig,
    judges: dict[str, ValueScorer],
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> JudgedReport:
    """Sample one answer per validation prompt from the policy (as `evaluate_policy` does) and score it with each
    of `judges` (e.g. `value_scorer` of a reward model): its value of the complete answer."""
    tokenizer = datamodule.tokenizer
    policy = build_policy(ModelSpec(name_or_path=policy_dir), tokenizer, role="policy").to(device).eval()
    reference = (
        build_policy(ModelSpec(name_or_path=reference_dir), tokenizer, role="reference").to(device).eval()
    )
    temperature = sampling.temperature if sampling.do_sample else 1.0
    scores = {name: [] for name in judges}
    kl, lengths, finished = [], [], []
    for responses in held_out_responses(policy, datamodule, sampling, seed, device):
        for name, judge in judges.items():
            scores[name].append(judge(responses)[1].cpu())  # the value of the complete answer
        kl.append(sequence_kls(policy, reference, responses, temperature)[0])
        lengths.append(responses.lengths.float().cpu())
        finished.append(responses.finished.float().cpu())
    return JudgedReport(
        per_prompt={name: torch.cat(parts).tolist() for name, parts in scores.items()},
        kl_ref=float(torch.cat(kl).mean()),
        response_length=float(torch.cat(lengths).mean()),
        finished_rate=float(torch.cat(finished).mean()),
    )


@torch.no_grad()
def held_out_responses(
    policy: torch.nn.Module,
    datamodule: RLHFDataModule,
    sampling: SamplingConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[Responses]:
    """One sampled answer of `policy` per validation prompt of a prompts-mode data module, a `Responses` per
    batch; sampled from `seed` without touching the caller's random streams."""
    cuda_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    samples = []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for batch in datamodule.val_dataloader():
            samples.append(
                generate_responses(
                    policy,
                    batch["prompt_input_ids"].to(device),
                    batch["prompt_attention_mask"].to(device),
                    sampling,
                    datamodule.tokenizer,
                )
            )
    return samples


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


@dataclass
class ValueAccuracy:
    """How often a value model values the chosen response of a held-out pair above the rejected one."""

    mean_value: float  # by its mean value over the response's states (the DVPO paper's value accuracy)
    final_value: float  # by its value of the complete response (a reward model's score)
    pairs: int


def value_scorer(
    directory: str, datamodule: RLHFDataModule, device: str | torch.device = "cpu"
) -> StateValues:
    """The value scorer of a value model export (a GVM, a reward model, a critic), on `device`."""
    spec = ModelSpec(name_or_path=directory)
    return StateValues(build_value_model(spec, datamodule.tokenizer, role="value model").to(device).eval())


@torch.no_grad()
def pairwise_value_accuracy(
    scorer: ValueScorer, datamodule: RLHFDataModule, device: str | torch.device = "cpu"
) -> ValueAccuracy:
    """Pairwise accuracy (chosen valued strictly above rejected) of a value scorer (`value_scorer(export)`, or
    `rl.GoldValues`: the labels' agreement with the gold reward) on the validation pairs of a pairs-mode data
    module."""
    wins = {"mean_value": [], "final_value": []}
    for batch in datamodule.val_dataloader():
        responses = pair_responses(
            {key: value.to(device) for key, value in batch.items()}, datamodule.tokenizer
        )
        values, final = scorer(responses)  # [2B, R], [2B]
        for key, value in zip(wins, (masked_mean(values, responses.response_mask, dim=-1), final)):
            chosen, rejected = value.chunk(2)
            wins[key].append((chosen > rejected).float().cpu())
    mean_value, final_value = (torch.cat(parts) for parts in wins.values())
    return ValueAccuracy(float(mean_value.mean()), float(final_value.mean()), len(mean_value))


def pair_responses(batch: dict, tokenizer) -> Responses:
    """A pairs batch as `Responses`: chosen rows then rejected, finished where the response ends with EOS."""
    sequences = pair_sequences(batch)
    last = last_token_values(sequences.response_input_ids, sequences.response_mask)  # [2B]
    return Responses(
        sequences.prompt_input_ids,
        sequences.prompt_attention_mask,
        sequences.response_input_ids,
        sequences.response_mask,
        last == tokenizer.eos_token_id,
    )


@dataclass
class GoldAgreement:
    """How a value model's judgement of sampled responses agrees with a built-in task's gold reward."""

    final_value_pearson: float  # of the complete response's value with the response's gold reward
    token_credit_pearson: float  # of its TD errors V(s_t+1) - V(s_t) with the gold reward of token t
    # the same within each token: both centred on their mean over the occurrences of the token (its id), so that
    # what the token is, alone, explains nothing; a value model blind to the context (a bag of words) scores ~0
    contextual_credit_pearson: float
    # the mean TD error of the tokens of each gold token reward (keyed "1", "-0.5", ...): what a value model credits
    # a topic asked for, one off the prompt, a filler, the end
    credit_by_gold_reward: dict[str, float]
    responses: int


@torch.no_grad()
def gold_agreement(
    scorer: ValueScorer, samples: list[Responses], datamodule: RLHFDataModule
) -> GoldAgreement:
    """Pearson correlations, over `samples` (e.g. `held_out_responses`), of a value scorer's values with the gold
    reward of the data module's built-in task.

    The token-level credit is what DVPO's advantages are built from: the TD errors of the value model with no
    reward but its value of the complete response after the last token (the `gvm` estimator at lambda 0), against
    the gold reward each token earned (`rl.gold_token_rewards`); the oracle `rl.GoldValues` scores 1. The contextual
    credit is that correlation within each token (`within_token_pearson`): whether the value model credits a token
    by what it does where it stands (a topic named for the first time or again), not by what token it is.
    """
    finals, golds, credits, token_golds, token_ids = [], [], [], [], []
    for responses in samples:
        mask = responses.response_mask
        values, final = scorer(responses)  # [B, R], [B]
        td_errors, _ = get_advantage("gvm")(
            token_rewards=torch.zeros_like(values),
            values=values,
            mask=mask,
            gamma=1.0,
            lam=0.0,
            final_values=final,
        )
        finals.append(final.cpu())
        golds.append(gold_rewards(datamodule.task, datamodule.tokenizer, responses)[0])
        credits.append(td_errors[mask].cpu())
        token_golds.append(gold_token_rewards(datamodule.task, datamodule.tokenizer, responses)[mask.cpu()])
        token_ids.append(responses.response_input_ids[mask].cpu())
    credit, token_gold, token_id = torch.cat(credits), torch.cat(token_golds), torch.cat(token_ids)
    gold_values, credit_means, _ = group_means(credit, token_gold)
    return GoldAgreement(
        _pearson(torch.cat(finals), torch.cat(golds)),
        _pearson(credit, token_gold),
        within_token_pearson(credit, token_gold, token_id),
        {f"{gold:g}": mean for gold, mean in zip(gold_values.tolist(), credit_means.tolist())},
        sum(len(final) for final in finals),
    )


def group_means(values: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct `keys` `[K]` (sorted), the mean of `values` `[N]` over the entries of each `[K]`, and each
    entry's group `[N]`."""
    groups, group_of = keys.unique(return_inverse=True)
    counts = torch.zeros(len(groups)).index_add_(0, group_of, torch.ones(len(values)))
    sums = torch.zeros(len(groups)).index_add_(0, group_of, values.float())
    return groups, sums / counts, group_of


def within_token_pearson(x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor) -> float:
    """Pearson's correlation of `x` and `y` `[N]` after centring each on its mean over the entries of the same
    token id `[N]`: the part of their agreement that the token's identity does not explain."""

    def centred(values: torch.Tensor) -> torch.Tensor:
        _, means, group_of = group_means(values, token_ids)
        return values.float() - means[group_of]

    return _pearson(centred(x), centred(y))


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation of two `[N]` tensors; nan when either is constant."""
    return float(torch.corrcoef(torch.stack([x.float(), y.float()]))[0, 1])
