"""The built-in task: "describe a thing", generated from a seed (DESIGN.md §6).

A user asks for a description of a thing; the assistant answers with one sentence
built from adjectives::

    User: Describe the garden you saw today.
    Assistant: The garden is calm, lovely and bright.

The *gold reward* (the "human", seen only by evaluation) likes answers that

* talk about the thing that was asked about (relevance),
* use pleasant words (sentiment: each adjective is positive, neutral or negative),
* read well: one well-formed sentence, 2–3 distinct adjectives (fluency).

    gold = fluency · (0.3 · relevance + 0.7 · sentiment)      ∈ [0, 1]

Demonstrations pick adjectives at random, so a model that imitates them lands in the
middle of the scale. Preference pairs are labelled from the gold reward by
Bradley–Terry sampling plus label noise, like human annotators. Both sides of a pair
are ordinary answers of 2–3 adjectives (off-topic ones included), so a reward model
learned from them sees sentiment but hardly ever sees repetition or long lists: a
policy that maximises such a proxy without a KL leash drifts to "lovely, lovely, bright,
warm and wonderful", which the proxy likes and the gold reward punishes through fluency.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhfkit.data.tasks import write_splits

TOPICS = (
    "cat", "dog", "garden", "river", "city", "song", "book", "kitchen", "forest", "bicycle",
    "market", "lake", "teacher", "movie", "beach", "bridge", "hotel", "train", "island", "museum",
    "village", "coffee", "house", "park", "school", "painting", "festival", "library", "bakery",
    "mountain", "street", "concert",
)
POSITIVE = ("lovely", "bright", "calm", "warm", "friendly", "charming", "clean", "elegant",
            "cheerful", "gentle", "pleasant", "wonderful")
NEUTRAL = ("old", "large", "small", "quiet", "busy", "simple", "plain", "tall")
NEGATIVE = ("dull", "noisy", "dirty", "gloomy", "rude", "broken", "cold", "ugly", "boring",
            "awful", "shabby", "grim")
VALENCE = {**{w: 1.0 for w in POSITIVE}, **{w: 0.0 for w in NEUTRAL}, **{w: -1.0 for w in NEGATIVE}}

ASKS = ("Describe the {t}.", "Write a sentence about the {t}.", "Tell me about the {t}.",
        "Give me your opinion of the {t}.", "Say something about the {t}.", "What is the {t} like?")
WHEN = ("", " you saw today", " you visited last week", " in your town", " from your childhood",
        " near the station")
OPENERS = ("The {t} is {a}.", "I think the {t} is {a}.", "This {t} is {a}.")

PROMPT_FORMAT = "User: {ask}\nAssistant:"
_PROMPT_RE = re.compile(r"the (\w+)")
_ANSWER_RE = re.compile(r"^(?:The|I think the|This) (\w+) is ([a-z]+(?:, [a-z]+)*(?: and [a-z]+)?)\.$")


def _ask(topic: str, ask: str, when: str) -> str:
    return PROMPT_FORMAT.format(ask=ask.format(t=topic + when))


def all_prompts() -> list[str]:
    """Every distinct prompt of the task (32 topics × 6 asks × 6 contexts = 1152)."""
    return [_ask(t, a, w) for t in TOPICS for a in ASKS for w in WHEN]


def prompt_topic(prompt: str) -> str | None:
    """The thing a prompt asks about (the first known topic after 'the'), or None."""
    return next((w for w in _PROMPT_RE.findall(prompt) if w in TOPICS), None)


def gold_reward(prompt: str, response: str) -> float:
    """The hidden "human" score of a response in [0, 1] (see the module docstring)."""
    text = response.strip()
    words = re.findall(r"[a-z]+", text.lower())
    adjectives = [w for w in words if w in VALENCE]
    if not adjectives:
        return 0.0
    sentiment = 0.5 * (1.0 + sum(VALENCE[w] for w in adjectives) / len(adjectives))
    relevance = 1.0 if prompt_topic(prompt) in words else 0.0
    match = _ANSWER_RE.match(text)
    form = 1.0 if match and all(w in VALENCE for w in re.split(r", | and ", match.group(2))) else 0.5
    distinct = len(set(adjectives)) / len(adjectives)
    n = len(adjectives)
    length = 1.0 if n in (2, 3) else 0.8 if n in (1, 4) else 0.5
    return form * distinct * length * (0.3 * relevance + 0.7 * sentiment)


def _adjective_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def sample_response(rng: random.Random, prompt: str, off_topic: float = 0.1, repeat: float = 0.1) -> str:
    """A demonstration-quality answer: random adjectives, sometimes a little sloppy.

    With probability ``off_topic`` the answer talks about another topic, and with
    probability ``repeat`` it repeats an adjective, so imitation does not reach the ceiling.
    """
    topic = prompt_topic(prompt) or rng.choice(TOPICS)
    if rng.random() < off_topic:
        topic = rng.choice([t for t in TOPICS if t != topic])
    words = rng.sample(list(VALENCE), rng.choice((2, 2, 3)))
    if rng.random() < repeat:
        words[-1] = words[0]
    return " " + rng.choice(OPENERS).format(t=topic, a=_adjective_list(words))


@dataclass
class TaskSpec:
    """How much of the task to generate; the defaults are what the quickstart uses."""

    seed: int = 0
    n_test: int = 256            # held-out prompts for reported figures only
    n_valid: int = 128           # held-out prompts for choosing settings and checkpoints
    sft_per_prompt: int = 2      # demonstrations per training prompt
    pairs_per_prompt: int = 3    # preference pairs per training prompt
    bt_temperature: float = 0.1  # Bradley–Terry: P(a ≻ b) = σ((gold_a − gold_b) / temperature)
    label_noise: float = 0.1     # then each label is flipped with this probability
    pair_off_topic: float = 0.3  # annotators see off-topic answers often enough to judge them ...
    pair_repeat: float = 0.02    # ... but hardly ever see repetition: the proxy's blind spot
    kto_threshold: float = 0.6   # an unpaired completion is desirable when its gold reward ≥ this


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def generate(spec: TaskSpec = TaskSpec()) -> dict[str, list[dict]]:
    """All splits of the task as lists of records in the standard columns (DESIGN.md §4).

    Returns ``sft`` (prompt, completion), ``preference`` (prompt, chosen, rejected) with
    held-out ``preference_valid`` / ``preference_test`` pairs on those splits' prompts,
    ``unpaired`` (prompt, completion, label), ``prompts_train`` / ``prompts_valid`` /
    ``prompts_test`` (prompt). Test and validation prompts never appear in training data.
    """
    rng = random.Random(spec.seed)
    prompts = all_prompts()
    rng.shuffle(prompts)
    test, valid = prompts[: spec.n_test], prompts[spec.n_test: spec.n_test + spec.n_valid]
    train = prompts[spec.n_test + spec.n_valid:]

    sft = [{"prompt": p, "completion": sample_response(rng, p)}
           for p in train for _ in range(spec.sft_per_prompt)]

    def label_pairs(prompts: list[str]) -> tuple[list[dict], float]:
        """Pairs labelled like annotators would; also the best accuracy those labels allow."""
        pairs, ceiling = [], 0.0
        for p in prompts:
            for _ in range(spec.pairs_per_prompt):
                a, b = (sample_response(rng, p, spec.pair_off_topic, spec.pair_repeat) for _ in range(2))
                while b == a:
                    b = sample_response(rng, p, spec.pair_off_topic, spec.pair_repeat)
                p_a = _sigmoid((gold_reward(p, a) - gold_reward(p, b)) / spec.bt_temperature)
                p_a = p_a * (1 - spec.label_noise) + (1 - p_a) * spec.label_noise
                ceiling += max(p_a, 1 - p_a)
                chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
                pairs.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        return pairs, ceiling / len(pairs)

    preference, agree_ceiling = label_pairs(train)

    unpaired = []
    for p in train:
        c = sample_response(rng, p)
        unpaired.append({"prompt": p, "completion": c, "label": gold_reward(p, c) >= spec.kto_threshold})

    preference_valid, valid_ceiling = label_pairs(valid)
    preference_test, test_ceiling = label_pairs(test)
    return {
        "sft": sft,
        "preference": preference,
        "preference_valid": preference_valid,  # pairs on held-out prompts, for choosing settings
        "preference_test": preference_test,    # and for reported reward-model accuracy
        "unpaired": unpaired,
        "prompts_train": [{"prompt": p} for p in train],
        "prompts_valid": [{"prompt": p} for p in valid],
        "prompts_test": [{"prompt": p} for p in test],
        # the best pairwise accuracy any model can reach against these noisy labels
        "meta": [{**asdict(spec), "label_accuracy_ceiling": agree_ceiling,
                  "label_accuracy_ceiling_valid": valid_ceiling, "label_accuracy_ceiling_test": test_ceiling}],
    }


def corpus(spec: TaskSpec = TaskSpec()) -> list[str]:
    """Text a tokenizer is trained on: every prompt, and answers using every word."""
    rng = random.Random(spec.seed + 1)
    texts = all_prompts()
    texts += [p + sample_response(rng, p) for p in texts]
    texts += [f" The {t} is {a}." for t in TOPICS for a in VALENCE]
    return texts


def write(out_dir: str | Path, spec: TaskSpec = TaskSpec()) -> dict[str, Path]:
    """Write every split as ``<name>.jsonl`` (and ``meta.json``) under ``out_dir``; returns name → path."""
    return write_splits(generate(spec), out_dir)
