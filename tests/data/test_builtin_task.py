"""The built-in `topics` task: gold reward, demonstrator, preference pairs, tokenizer."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoTokenizer

from dvpo_lightning.data.builtin import TASKS, BuiltinTask, LongTopicsTask, TopicsTask, get_task

PROMPT = "write about : river cat apple . answer :"


@pytest.fixture(scope="module")
def task() -> BuiltinTask:
    return get_task("topics", seed=0)


@pytest.fixture(scope="module")
def pairs(task):
    return task.preference_dataset(600, split_seed=1)


def test_registry_knows_topics_and_names_known_tasks_on_error():
    assert TASKS["topics"] is TopicsTask
    task = get_task("topics", seed=3)
    assert isinstance(task, TopicsTask) and task.name == "topics" and task.seed == 3
    with pytest.raises(ValueError, match="unknown built-in task 'nope'.*topics"):
        get_task("nope")


# --- gold reward, hand-computed (filler words cost 1/16 = 0.0625) ---------------------------


@pytest.mark.parametrize(
    "response, finished, expected_token_scores",
    [
        # each prompt topic once, then EOS: the optimum
        ("cat river apple", True, [1, 1, 1, 0]),
        # the second "cat" is a repeat; "the", "and", "the", "." are fillers
        ("the cat and the cat .", True, [-0.0625, 1, -0.0625, -0.0625, -0.5, -0.0625, 0]),
        # "dog" is a topic, but not this prompt's: off-topic
        ("cat dog", True, [1, -0.5, 0]),
        # no EOS within the budget
        ("cat river", False, [1, 1, -1]),
        # unknown words cost like fillers; case and glued punctuation are split like the tokenizer
        ("Cat. zebra", True, [1, -0.0625, -0.0625, 0]),
        ("", True, [0]),
        ("", False, [-1]),
    ],
)
def test_gold_reward_hand_computed(task, response, finished, expected_token_scores):
    assert task.token_scores(PROMPT, response, finished) == expected_token_scores
    assert task.score([PROMPT], [response], [finished]) == [sum(expected_token_scores)]


def test_hand_computed_totals(task):
    prompts = [PROMPT] * 4
    responses = ["cat river apple", "the cat and the cat .", "cat dog", "cat river"]
    assert task.score(prompts, responses, [True, True, True, False]) == [3.0, 0.25, 0.5, 1.0]


def test_token_scores_sum_to_score_on_demonstrator_answers(task, pairs):
    budget = task.recommended_max_response_length
    for row in pairs.select(range(100)):
        for response in (row["chosen"], row["rejected"]):
            finished = len(response.split()) < budget
            assert sum(task.token_scores(row["prompt"], response, finished)) == pytest.approx(
                task.score([row["prompt"]], [response], [finished])[0]
            )


def test_optimum_is_the_number_of_topics_and_the_ideal_response_attains_it(task):
    prompts = ["describe : moon boat . answer :", PROMPT, "tell me about : cow lamp fish book . answer :"]
    assert task.optimum(prompts) == [2.0, 3.0, 4.0]
    ideal = [task.ideal_response(prompt) for prompt in prompts]
    assert ideal[1] == "river cat apple"
    assert task.score(prompts, ideal, [True] * 3) == [2.0, 3.0, 4.0]


def test_no_demonstrator_answer_beats_the_optimum(task, pairs):
    for row in pairs:
        optimum = task.optimum([row["prompt"]])[0]
        assert row["chosen_score"] <= optimum and row["rejected_score"] <= optimum


def test_score_rejects_mismatched_lengths(task):
    with pytest.raises(ValueError, match="2 prompts, 1 responses, 1 finished"):
        task.score([PROMPT, PROMPT], ["cat"], [True])


# --- demonstrator and datasets --------------------------------------------------------------


def test_demonstrator_is_mediocre(task):
    prompts = task.prompt_dataset(2000, split_seed=7)["prompt"]
    rng = task._rng("test", 7)
    answers = [task.demonstrate(rng, prompt) for prompt in prompts]
    scores = task.score(prompts, [text for text, _ in answers], [done for _, done in answers])
    fraction = sum(score / best for score, best in zip(scores, task.optimum(prompts))) / len(prompts)
    assert 0.3 < fraction < 0.5
    unfinished = sum(not done for _, done in answers) / len(answers)
    assert 0.1 < unfinished < 0.3


def test_unfinished_answers_fill_the_budget_and_finished_ones_leave_room_for_eos(task, tmp_path):
    tokenizer = task.tokenizer(tmp_path)
    rng = task._rng("test", 0)
    budget = task.recommended_max_response_length
    lengths = {True: set(), False: set()}
    for prompt in task.prompt_dataset(300)["prompt"]:
        text, finished = task.demonstrate(rng, prompt)
        lengths[finished].add(len(tokenizer(text)["input_ids"]))
    assert lengths[False] == {budget}
    assert max(lengths[True]) <= budget - 1


def test_pair_columns_and_scores_match_the_gold_reward(task, pairs):
    assert pairs.column_names == ["prompt", "chosen", "rejected", "chosen_score", "rejected_score"]
    assert len(pairs) == 600
    budget = task.recommended_max_response_length
    rows = pairs.select(range(50))
    for column in ("chosen", "rejected"):
        finished = [len(text.split()) < budget for text in rows[column]]
        assert task.score(rows["prompt"], rows[column], finished) == rows[f"{column}_score"]
    assert all(task.eos_token not in text for text in [*pairs["chosen"], *pairs["rejected"]])


def test_preference_labels_follow_the_gold_reward_noisily(pairs):
    margins = [c - r for c, r in zip(pairs["chosen_score"], pairs["rejected_score"])]
    agree = sum(m > 0 for m in margins) / len(margins)
    disagree = sum(m < 0 for m in margins) / len(margins)
    assert 0.7 < agree < 0.92
    assert disagree > 0.05


def test_no_pair_has_identical_responses(pairs, monkeypatch):
    assert all(c != r for c, r in zip(pairs["chosen"], pairs["rejected"]))
    # A demonstrator with two answers draws identical ones half the time: none may become a pair.
    task = get_task("topics")
    monkeypatch.setattr(task, "demonstrate", lambda rng, prompt: (rng.choice(["cat .", "dog ."]), True))
    two_answers = task.preference_dataset(40)
    assert len(two_answers) == 40
    assert all({c, r} == {"cat .", "dog ."} for c, r in zip(two_answers["chosen"], two_answers["rejected"]))
    monkeypatch.setattr(task, "demonstrate", lambda rng, prompt: ("cat .", True))
    with pytest.raises(RuntimeError, match="keeps answering identically"):
        task.preference_dataset(1)


def test_prompts_list_two_to_four_distinct_topics_and_fit_the_budget(task, tmp_path):
    tokenizer = task.tokenizer(tmp_path)
    for prompt in task.prompt_dataset(300)["prompt"]:
        assert prompt.endswith(" answer :")
        assert 2 <= task.optimum([prompt])[0] <= 4
        ids = tokenizer(prompt)["input_ids"]
        assert len(ids) <= task.recommended_max_prompt_length
        assert tokenizer.unk_token_id not in ids


def test_datasets_are_deterministic_in_seed_and_split_seed():
    first, again, other_seed = get_task("topics", 0), get_task("topics", 0), get_task("topics", 1)
    assert first.preference_dataset(50).to_dict() == again.preference_dataset(50).to_dict()
    assert first.prompt_dataset(50)["prompt"] == again.prompt_dataset(50)["prompt"]
    assert first.preference_dataset(50).to_dict() != other_seed.preference_dataset(50).to_dict()
    assert first.prompt_dataset(50, split_seed=1)["prompt"] != first.prompt_dataset(50)["prompt"]


def test_counts_are_checked(task):
    assert len(task.preference_dataset(0)) == 0
    assert task.prompt_dataset(0).column_names == ["prompt"]
    with pytest.raises(ValueError, match="num_pairs must be a non-negative integer, got -1"):
        task.preference_dataset(-1)
    with pytest.raises(ValueError, match="num_prompts"):
        task.prompt_dataset(2.5)


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_round_trips_text_and_has_distinct_pad_and_eos(task, tmp_path):
    tokenizer = task.tokenizer(tmp_path)
    assert (tokenizer.pad_token, tokenizer.eos_token) == ("<pad>", "<eos>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert len(tokenizer) == 3 + len(task.words())
    text = "tell me about : moon cat . answer : the big moon and my cat ."
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.split())  # one token per word, no special tokens added
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, 0, 0], skip_special_tokens=True) == text
    assert tokenizer("zebra")["input_ids"] == [tokenizer.unk_token_id]
    # split and lowercased exactly as the gold reward reads words
    assert tokenizer.decode(tokenizer("My Cat.")["input_ids"]) == "my cat ."


def test_tokenizer_is_a_normal_directory_loadable_by_auto_tokenizer(task, tmp_path):
    tokenizer = task.tokenizer(tmp_path)
    directory = tmp_path / "builtin" / "topics-v1" / "tokenizer"
    assert os.path.samefile(tokenizer.name_or_path, directory)
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert task.tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()  # served from the cache
    assert [path.name for path in directory.parent.iterdir()] == ["tokenizer"]  # no staging left
    assert get_task("topics", seed=5).tokenizer(tmp_path).get_vocab() == tokenizer.get_vocab()


def test_tokenizer_cache_dir_defaults_to_dvpo_cache(task, tmp_path, monkeypatch):
    monkeypatch.setenv("DVPO_CACHE", str(tmp_path))
    task.tokenizer()
    assert (tmp_path / "builtin" / "topics-v1" / "tokenizer" / "tokenizer.json").is_file()


def test_losing_the_write_race_keeps_the_winners_directory(task, tmp_path):
    directory = tmp_path / "tokenizer"
    task._write_tokenizer(directory)
    winner = (directory / "tokenizer.json").read_text()
    task._write_tokenizer(directory)  # another process finished first: rename fails, no error
    assert (directory / "tokenizer.json").read_text() == winner
    assert [path.name for path in tmp_path.iterdir()] == ["tokenizer"]


def test_a_stale_cached_vocabulary_is_refused(task, tmp_path):
    directory = tmp_path / "builtin" / "topics-v1" / "tokenizer"
    task._write_tokenizer(directory)
    config = json.loads((directory / "tokenizer.json").read_text())
    config["model"]["vocab"]["kitten"] = len(config["model"]["vocab"])
    (directory / "tokenizer.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="different vocabulary.*delete that directory"):
        task.tokenizer(tmp_path)


# --- topics-long ------------------------------------------------------------------------------


def test_topics_long_asks_for_more_topics_in_longer_answers(tmp_path):
    task = get_task("topics-long", seed=0)
    assert isinstance(task, LongTopicsTask) and TASKS["topics-long"] is LongTopicsTask
    tokenizer = task.tokenizer(tmp_path)
    assert tokenizer.get_vocab() == get_task("topics").tokenizer(tmp_path).get_vocab()  # the same world
    rng = task._rng("test", 0)
    lengths = {True: [], False: []}
    for prompt in task.prompt_dataset(300)["prompt"]:
        assert 4 <= task.optimum([prompt])[0] <= 8
        assert len(tokenizer(prompt)["input_ids"]) <= task.recommended_max_prompt_length
        text, finished = task.demonstrate(rng, prompt)
        lengths[finished].append(len(tokenizer(text)["input_ids"]))
    assert set(lengths[False]) == {task.recommended_max_response_length}
    assert max(lengths[True]) < task.recommended_max_response_length
    assert sum(lengths[True]) / len(lengths[True]) > 12  # about twice the topics task's 8 words
    assert task.prompt_dataset(5)["prompt"] != get_task("topics").prompt_dataset(5)["prompt"]
