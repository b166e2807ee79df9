"""`dvpo generate` on tiny exported policies: prompts from the command line and files, the chat template where
the tokenizer has one, several samples per prompt, greedy decoding, prompts longer than the context, mistakes."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest

from dvpo_lightning.cli import main
from dvpo_lightning.models import ModelSpec, build_policy, export_model
from tests.helpers.stages import TINY_GPT2, tiny
from tests.helpers.tiny import TINY_ARCH

README = Path(__file__).resolve().parents[2] / "README.md"

TEMPLATE = "{% for m in messages %}<{{ m.role }}> {{ m.content }} {% endfor %}{% if add_generation_prompt %}<bot>{% endif %}"


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tokenizer) -> str:
    return export_model(build_policy(tiny(), tokenizer), tokenizer, str(tmp_path_factory.mktemp("policy")))


def generate(capsys, *args: str) -> tuple[list[dict], str]:
    output = args[args.index("--output") + 1]
    main(["generate", *args])
    return [json.loads(line) for line in open(output)], capsys.readouterr().out


def test_prompts_from_the_command_line_and_a_file_get_their_samples(policy_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about : apple . answer :\n\ntell me about : river . answer :\n")
    options = ["--prompts-file", str(prompts), "--num-samples", "2", "--max-new-tokens", "5", "--seed", "3"]
    answers, printed = generate(
        capsys,
        policy_dir,
        "--prompt",
        "tell me about : moon . answer :",
        *options,
        "--output",
        str(tmp_path / "a.jsonl"),
    )
    assert [(answer["prompt"].split(" : ")[1], answer["sample"]) for answer in answers] == [
        (f"{topic} . answer :", sample) for topic in ("moon", "apple", "river") for sample in (0, 1)
    ]
    assert all(answer["response"] for answer in answers)
    assert printed.count("### prompt: ") == 6 and "--- sample 2: " in printed
    again, _ = generate(
        capsys,
        policy_dir,
        "--prompt",
        "tell me about : moon . answer :",
        *options,
        "--output",
        str(tmp_path / "b.jsonl"),
    )
    assert again == answers  # the seed fixes the samples


def test_greedy_decoding_gives_one_answer_however_many_samples(policy_dir, tmp_path, capsys):
    answers, _ = generate(
        capsys, policy_dir, "--prompt", "tell me about : sun . answer :", "--greedy", "--num-samples", "3",
        "--max-new-tokens", "5", "--output", str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    assert len({answer["response"] for answer in answers}) == 1


def test_a_tokenizer_with_a_chat_template_renders_prompts_and_conversations(tokenizer, tmp_path, capsys):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = TEMPLATE
    directory = export_model(build_policy(tiny(), chat), chat, str(tmp_path / "chat"))
    conversation = tmp_path / "prompts.jsonl"
    conversation.write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "apple"}]}
        )
        + "\n"
    )
    answers, _ = generate(
        capsys, directory, "--prompt", "river", "--prompts-file", str(conversation), "--max-new-tokens", "3",
        "--output", str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    assert [answer["prompt"] for answer in answers] == [
        "<user> river <bot>",
        "<system> be brief <user> apple <bot>",
    ]
    raw, _ = generate(
        capsys,
        directory,
        "--prompt",
        "river",
        "--raw",
        "--max-new-tokens",
        "3",
        "--output",
        str(tmp_path / "b.jsonl"),
    )
    assert raw[0]["prompt"] == "river"


def test_a_prompt_longer_than_the_context_keeps_its_end_and_room_for_the_answer(tokenizer, tmp_path, capsys):
    # Learned positions: a sequence past its 16 positions would fail inside the embedding.
    directory = export_model(
        build_policy(ModelSpec(arch={**TINY_GPT2, "n_positions": 16}), tokenizer),
        tokenizer,
        str(tmp_path / "gpt2"),
    )
    long_prompt = " ".join(["apple river"] * 12)
    answers, _ = generate(
        capsys,
        directory,
        "--prompt",
        long_prompt,
        "--max-new-tokens",
        "6",
        "--output",
        str(tmp_path / "a.jsonl"),
    )
    assert len(answers) == 1


def test_no_prompts_and_a_missing_prompt_file_are_one_line_errors(policy_dir, tmp_path, capsys):
    for extra in ([], ["--prompts-file", str(tmp_path / "missing.txt")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", policy_dir, *extra])
        assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dvpo: error: no prompts: pass --prompt TEXT or --prompts-file FILE" in err
    assert f"dvpo: error: --prompts-file {tmp_path / 'missing.txt'} does not exist" in err


def test_the_readmes_generate_command_runs_on_a_policy_with_the_built_in_models_context(
    tokenizer, tmp_path, monkeypatch, capsys
):
    command = re.search(r"`(dvpo generate outputs/builtin/dvpo/model [^`]*)`", README.read_text()).group(1)
    builtin_context = {**TINY_ARCH, "max_position_embeddings": 64}  # configs/sft.yaml's
    monkeypatch.chdir(tmp_path)
    export_model(
        build_policy(ModelSpec(arch=builtin_context), tokenizer), tokenizer, "outputs/builtin/dvpo/model"
    )
    main(shlex.split(command)[1:])
    printed = capsys.readouterr().out
    assert printed.startswith("### prompt: tell me about : horse forest . answer :\n--- sample 1: "), printed


def test_a_conversation_without_a_chat_template_is_rendered_as_training_renders_it(
    policy_dir, tmp_path, capsys
):
    conversation = tmp_path / "prompts.jsonl"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": "apple"}]}) + "\n")
    answers, _ = generate(
        capsys, policy_dir, "--prompts-file", str(conversation), "--max-new-tokens", "3",
        "--output", str(tmp_path / "a.jsonl"),
    )  # fmt: skip
    assert answers[0]["prompt"] == "\n\nHuman: apple\n\nAssistant:"  # ChatRenderer's default, as in training
