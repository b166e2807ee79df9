"""Preference pairs of a policy's own samples, scored by a built-in task's gold reward or by a GVM.

The GVM's `terminal_reward: score` mode trained on these pairs learns the values of the policy it will judge, with
the gold reward as its terminal reward: against the GVM of the task's demonstrator pairs, it measures how much of
DVPO's gap comes from distribution shift (the GVM judging responses unlike those it was trained on).

    python -m dvpo_lightning.sampled_pairs --policy outputs/builtin/sft/model --output outputs/builtin/sft_pairs.jsonl
    dvpo fit --config configs/gvm.yaml --data.init_args.dataset outputs/builtin/sft_pairs.jsonl \\
        --model.init_args.terminal_reward score

With `--value-model <GVM export>` the score is the GVM's own value of each complete response (any prompt data, no
gold reward): VC-PPO's value pretraining on the policy's samples with Monte-Carlo targets, as self-distillation.
The GVM then continues from its export on them, every state regressed on the response's score (lambda = 1):

    python -m dvpo_lightning.sampled_pairs --policy outputs/builtin/sft/model \\
        --value-model outputs/builtin/gvm/model --output outputs/builtin/gvm_samples.jsonl
    dvpo fit --config configs/gvm_self_mc.yaml --model.init_args.model.name_or_path outputs/builtin/gvm/model \\
        --data.init_args.dataset outputs/builtin/gvm_samples.jsonl

Each training prompt of the task (the prompts the data module keeps for training, none of its held-out ones) gets
two sampled answers; the one with the higher score is `chosen` (the first on a tie). Identical answers make
no pair, nor does an answer with a special token inside (a sampled `<unk>`): its text would not read back as the
tokens that were scored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dvpo_lightning.data import RLHFDataModule
from dvpo_lightning.models import ModelSpec, build_policy, build_value_model
from dvpo_lightning.rl import (
    SamplingConfig,
    StateValues,
    decode_responses,
    generate_responses,
    gold_rewards,
)


@torch.no_grad()
def write_scored_pairs(
    policy_dir: str,
    output: str | Path,
    dataset: str = "builtin:topics",
    pairs: int | None = None,
    sampling_seed: int = 0,
    device: str | torch.device = "cpu",
    value_model: str | None = None,
    **data_options,
) -> int:
    """Write up to `pairs` (None: one per training prompt) scored pairs of the policy's samples to `output`
    (JSON lines: prompt, chosen, rejected, chosen_score, rejected_score); returns how many were written. The score
    is the built-in task's gold reward, or with `value_model` (a GVM export sharing the policy's tokenizer) that
    model's value of the complete response.

    `data_options` (`builtin_size`, `val_size`, `seed`, `batch_size`, ...) are `RLHFDataModule`'s: give the ones of
    the runs that will use the pairs, so that their held-out prompts stay held out.
    """
    data = RLHFDataModule(dataset, tokenizer=policy_dir, mode="prompts", **data_options)
    data.setup("fit")
    if data.task is None and value_model is None:
        raise ValueError(
            f"gold-scored pairs need a built-in task's gold reward; got dataset={dataset!r} (score with a GVM: "
            "--value-model)"
        )
    policy = build_policy(ModelSpec(name_or_path=policy_dir), data.tokenizer, role="policy").to(device).eval()
    if value_model is not None:
        gvm = build_value_model(ModelSpec(name_or_path=value_model), data.tokenizer, role="value model")
        complete_response_value = StateValues(gvm.to(device).eval())
    sampling = SamplingConfig(max_new_tokens=data.max_response_length)
    rows = []
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(sampling_seed)
        for batch in data.train_dataloader():
            prompt_ids, prompt_mask = (
                batch[key].to(device).repeat_interleave(2, dim=0)
                for key in ("prompt_input_ids", "prompt_attention_mask")
            )
            responses = generate_responses(policy, prompt_ids, prompt_mask, sampling, data.tokenizer)
            prompts, texts = decode_responses(data.tokenizer, responses)
            if value_model is None:
                scores = gold_rewards(data.task, data.tokenizer, responses)[0].tolist()
            else:
                scores = complete_response_value(responses)[1].tolist()
            readable = (~inner_special_tokens(responses, data.tokenizer)).tolist()
            for first in range(0, len(texts), 2):
                pair = slice(first, first + 2)
                if all(readable[pair]):
                    rows += pair_row(prompts[first], texts[pair], scores[pair])
            if pairs is not None and len(rows) >= pairs:
                break
    rows = rows[:pairs]
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def inner_special_tokens(responses, tokenizer) -> torch.Tensor:
    """Whether each response `[B]` holds a special token other than its closing EOS."""
    special = [token for token in tokenizer.all_special_ids if token != tokenizer.eos_token_id]
    ids = responses.response_input_ids
    inside = torch.isin(ids, torch.tensor(special, device=ids.device)) & responses.response_mask
    return inside.any(dim=-1)


def pair_row(prompt: str, texts: list[str], scores: list[float]) -> list[dict]:
    """The pair of two answers to `prompt`, the higher-scored one chosen; none for two identical answers."""
    if texts[0] == texts[1]:
        return []
    chosen, rejected = (0, 1) if scores[0] >= scores[1] else (1, 0)
    return [
        {
            "prompt": prompt,
            "chosen": texts[chosen],
            "rejected": texts[rejected],
            "chosen_score": scores[chosen],
            "rejected_score": scores[rejected],
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--policy", required=True, help="the policy export that samples (e.g. the SFT export)"
    )
    parser.add_argument("--output", required=True, type=Path, help="the JSON lines file to write")
    parser.add_argument(
        "--dataset",
        default="builtin:topics",
        help="the prompts: a built-in task, or any data with --value-model",
    )
    parser.add_argument(
        "--value-model",
        default=None,
        help="a GVM export: score by its complete-response value, not the gold reward",
    )
    parser.add_argument(
        "--pairs", type=int, default=None, help="at most this many pairs (default: every prompt)"
    )
    parser.add_argument("--builtin-size", type=int, default=20000, help="as the configs' data.builtin_size")
    parser.add_argument("--val-size", type=float, default=500, help="as the configs' data.val_size")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts sampled at once")
    parser.add_argument("--data-seed", type=int, default=0, help="as the configs' data.seed")
    parser.add_argument("--sampling-seed", type=int, default=0, help="seed of the sampled answers")
    args = parser.parse_args(argv)
    val_size = int(args.val_size) if args.val_size >= 1 else args.val_size
    written = write_scored_pairs(
        args.policy,
        args.output,
        args.dataset,
        args.pairs,
        args.sampling_seed,
        value_model=args.value_model,
        builtin_size=args.builtin_size,
        val_size=val_size,
        seed=args.data_seed,
        batch_size=args.batch_size,
    )
    scorer = args.value_model or "gold reward"
    print(f"{written} pairs of {args.policy}'s samples, scored by {scorer}, written to {args.output}")
    return written


if __name__ == "__main__":
    main()
