"""`builtin:topics`: write about the listed topics, each once, and stop (`builtin:topics-long`: more of them).

The world
---------
A word-level vocabulary of 61 tokens: 24 topic nouns (cat, river, apple, ...), 34 filler words and
punctuation marks, and the special tokens `<pad>` (id 0), `<eos>` (1), `<unk>` (2). A prompt lists
2-4 distinct topics in random order after one of three lead-ins and ends with the fixed separator
`answer :`, so the response boundary is clear::

    tell me about : river cat apple . answer :       (at most 11 tokens)

The gold reward
---------------
Closed form, made of events at single response words, so dense credit assignment pays off:

| response word                                        | reward       |
|------------------------------------------------------|--------------|
| a prompt topic, first mention                        | +1           |
| a prompt topic mentioned again                       | -0.5         |
| a topic that is not in the prompt (off-topic)        | -0.5         |
| any other word (filler, punctuation, unknown)        | -1/16        |
| the end: EOS within the budget / no EOS (unfinished) | 0 / -1       |

Every value is a binary fraction, so sums are exact and equal scores are exactly equal.
The optimum of a prompt is its number of topics, reached by naming each topic once and stopping
(`ideal_response`); results are reported as `score / optimum`. The small cost per filler word and the
penalty for not finishing are the length component: a policy (or a reward model it exploits) that
learns "longer covers more" is hurt by rambling past the budget.

`token_scores` returns one number per response word (words as the tokenizer splits them:
`\\w+|[^\\w\\s]+`, lowercased) and a last number for the end: the EOS token's when finished, the
unfinished penalty otherwise. Unknown words cost like fillers. Responses must be decoded without
special tokens; note that this drops a generated `<unk>` too (it then costs nothing).

The demonstrator
----------------
A deliberately mediocre sampler (not a neural model): it mentions each prompt topic with
probability 0.7 in shuffled order, sometimes wanders to an off-topic noun (0.3) or repeats one it
mentioned (0.25), wraps the nouns in readable filler ("i like the cat and a big river ."), and with
probability 0.15 rambles on past the response budget. Any answer that reaches the budget is cut to
exactly `recommended_max_response_length` words and scored unfinished: with EOS appended and the
response truncated to that budget, the model sees it without EOS (see `base`). Measured on 20,000
answers (seed 0): mean gold reward 1.14 against a mean optimum of 3.00, 36% of the optimum on
average per prompt; 17% of answers unfinished.

Preference labels use Bradley-Terry temperature 0.5: chosen has the strictly higher gold reward in
81% of pairs, the lower in 16%, an equal one in 3% (5,000 pairs, seed 0). Chosen answers average
1.67 (56% of the optimum), rejected ones 0.61, so a policy fine-tuned on chosen answers still leaves
RL room to improve.
"""

from __future__ import annotations

import random
import re

from .base import BuiltinTask

TOPICS = (
    "cat", "dog", "bird", "fish", "horse", "cow",
    "river", "lake", "forest", "garden", "mountain", "beach",
    "house", "bridge", "boat", "train", "apple", "bread",
    "cheese", "soup", "book", "lamp", "clock", "moon",
)  # fmt: skip
DETERMINERS = ("the", "a", "my", "our")
ADJECTIVES = ("big", "small", "red", "green", "old", "new", "happy", "quiet")
LINKS = ("and", "with", "near", "then")
OPENERS = (("i", "like"), ("we", "see"), ("here", "is"), ("there", "is"))
EMPTY_ANSWERS = (("i", "like", "it", "."), ("it", "is", "nice", "."), ("so", "nice", "."))
PROMPT_LEADS = (("write", "about", ":"), ("tell", "me", "about", ":"), ("describe", ":"))
PROMPT_END = (".", "answer", ":")
# Every other word that prompts and answers use, in a fixed order (it fixes the token ids).
FILLERS = tuple(
    dict.fromkeys(
        [*DETERMINERS, *ADJECTIVES, *LINKS]
        + [word for phrase in OPENERS + EMPTY_ANSWERS + PROMPT_LEADS for word in phrase]
        + list(PROMPT_END)
    )
)

COVER_REWARD = 1.0
REPEAT_PENALTY = -0.5
OFF_TOPIC_PENALTY = -0.5
FILLER_COST = -0.0625
UNFINISHED_PENALTY = -1.0

# The demonstrator's habits (tuned so its mean reward is about 36% of the optimum, see above).
P_COVER = 0.7
P_OFF_TOPIC = 0.3
P_REPEAT = 0.25
P_RAMBLE = 0.15
P_RAMBLE_ON_TOPIC = 0.5  # a rambling noun is a prompt topic (mostly a repeat), else any topic
P_OPENER = 0.4
P_DETERMINER = 0.6
P_ADJECTIVE = 0.25

_TOPIC_SET = frozenset(TOPICS)
_WORD = re.compile(r"\w+|[^\w\s]+")  # the tokenizer's pre-tokenizer


def split_words(text: str) -> list[str]:
    """Words as the task's tokenizer sees them: lowercased, punctuation apart."""
    return _WORD.findall(text.lower())


def prompt_topics(prompt: str) -> list[str]:
    """The distinct topic words of a prompt, in order of appearance."""
    return list(dict.fromkeys(word for word in split_words(prompt) if word in _TOPIC_SET))


class TopicsTask(BuiltinTask):
    """Cover each prompt topic once, stay on topic, stop in time (see the module docstring)."""

    name = "topics"
    version = "v1"
    recommended_max_prompt_length = 12
    recommended_max_response_length = 16
    label_temperature = 0.5
    topics_per_prompt = (2, 4)  # fewest and most

    def words(self) -> list[str]:
        return [*TOPICS, *FILLERS]

    def sample_prompt(self, rng: random.Random) -> str:
        topics = rng.sample(TOPICS, rng.randint(*self.topics_per_prompt))
        return " ".join([*rng.choice(PROMPT_LEADS), *topics, *PROMPT_END])

    def demonstrate(self, rng: random.Random, prompt: str) -> tuple[str, bool]:
        wanted = prompt_topics(prompt)
        nouns = [topic for topic in wanted if rng.random() < P_COVER]
        rng.shuffle(nouns)
        if rng.random() < P_OFF_TOPIC:
            off_topic = rng.choice([topic for topic in TOPICS if topic not in wanted])
            nouns.insert(rng.randint(0, len(nouns)), off_topic)
        if nouns and rng.random() < P_REPEAT:
            nouns.insert(rng.randint(1, len(nouns)), rng.choice(nouns))
        words = _answer_words(rng, nouns)
        budget = self.recommended_max_response_length
        if rng.random() < P_RAMBLE:
            words = words[:-1]  # no full stop: it keeps going, on and off topic
            while len(words) < budget:
                noun = rng.choice(wanted) if rng.random() < P_RAMBLE_ON_TOPIC else rng.choice(TOPICS)
                words += [rng.choice(LINKS), *_noun_phrase(rng, noun)]
        if len(words) >= budget:
            return " ".join(words[:budget]), False
        return " ".join(words), True

    def token_scores(self, prompt: str, response: str, finished: bool) -> list[float]:
        wanted = set(prompt_topics(prompt))
        mentioned: set[str] = set()
        scores = []
        for word in split_words(response):
            if word not in _TOPIC_SET:
                scores.append(FILLER_COST)
            elif word not in wanted:
                scores.append(OFF_TOPIC_PENALTY)
            elif word in mentioned:
                scores.append(REPEAT_PENALTY)
            else:
                mentioned.add(word)
                scores.append(COVER_REWARD)
        scores.append(0.0 if finished else UNFINISHED_PENALTY)
        return scores

    def optimum(self, prompts: list[str]) -> list[float]:
        return [COVER_REWARD * len(prompt_topics(prompt)) for prompt in prompts]

    def ideal_response(self, prompt: str) -> str:
        """A response that attains the optimum: each prompt topic once (then EOS)."""
        return " ".join(prompt_topics(prompt))


def _answer_words(rng: random.Random, nouns: list[str]) -> list[str]:
    if not nouns:
        return list(rng.choice(EMPTY_ANSWERS))
    words = list(rng.choice(OPENERS)) if rng.random() < P_OPENER else []
    for index, noun in enumerate(nouns):
        if index:
            words.append(rng.choice(LINKS))
        words += _noun_phrase(rng, noun)
    return [*words, "."]


def _noun_phrase(rng: random.Random, noun: str) -> list[str]:
    if rng.random() >= P_DETERMINER:
        return [noun]
    adjective = [rng.choice(ADJECTIVES)] if rng.random() < P_ADJECTIVE else []
    return [rng.choice(DETERMINERS), *adjective, noun]


class LongTopicsTask(TopicsTask):
    """`builtin:topics-long`: the same world with 4-8 topics per prompt and a 32-token response budget.

    A response holds about twice as many rewarded and penalised words as in `topics` (finished demonstrator answers
    average 14 words against 8), so which token earned a response its reward matters more: the setting in which a
    token-level value model (DVPO's GVM, PPO's critic) should pay off against sequence-level credit (GRPO, DPO).
    Measured on 20,000 demonstrator answers (seed 0): mean gold reward 2.82 against a mean optimum of 6.00, 46% of
    the optimum on average per prompt, 15% unfinished; in 5,000 pairs chosen has the strictly higher gold reward in
    87% and the lower in 11% (chosen 3.62, rejected 1.89). Its configs are in `configs/hard/`.
    """

    name = "topics-long"
    recommended_max_prompt_length = 15  # the longest lead-in (4 words), 8 topics, ". answer :"
    recommended_max_response_length = 32  # the longest finished demonstrator answer of 20,000 has 31 words
    topics_per_prompt = (4, 8)
