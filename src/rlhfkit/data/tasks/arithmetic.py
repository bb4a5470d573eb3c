"""A second built-in task, with a verifiable reward: single-digit addition (DESIGN.md §3, critic-free RL).

    User: What is 7 + 5?
    Assistant: The answer is 12.

Rewards are plain Python functions of the kind `rlhfkit grpo --rewards module:function` loads
(``rlhfkit.rewards``): called with the prompts, the completions and the dataset's other columns as
keyword lists, they return one float per completion.

* ``exact_answer``: 1 when the first number in the completion equals the row's ``answer`` column, else 0;
* ``answer_format``: 1 when the completion is exactly the answer sentence " The answer is N.", else 0.

Held-out accuracy (the evaluation) is the mean ``exact_answer`` on the test prompts.
Every (a, b) pair with digits 0-9 is asked in six phrasings; the 600 prompts are shuffled and split
into disjoint train / valid / test prompt sets, so a test prompt is never seen in training, although
the same sum may be asked there in other words. Demonstrations are of mixed quality (a share of wrong
sums, some answers in another form), so an SFT model lands mid-range and RL has room to climb.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhfkit.data.tasks import write_splits

ASKS = ("What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?", "Add {a} and {b}.",
        "What do you get when you add {a} and {b}?", "Tell me the sum of {a} and {b}.")
PROMPT_FORMAT = "User: {ask}\nAssistant:"
ANSWER_FORMAT = " The answer is {n}."
SLOPPY_FORMATS = (" It is {n}.", " {n}", " I think it is {n}.")  # right or wrong, not the asked-for sentence
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")  # a decimal whole: 8.5 is not 8
_FORMAT_RE = re.compile(r"^ ?The answer is -?\d+\.$")


def all_prompts() -> list[dict]:
    """Every prompt of the task with its ``answer`` (10 × 10 pairs × 6 phrasings = 600 rows)."""
    return [{"prompt": PROMPT_FORMAT.format(ask=ask.format(a=a, b=b)), "answer": a + b}
            for a in range(10) for b in range(10) for ask in ASKS]


def first_number(text: str) -> int | None:
    """The first number written in ``text`` when it is a whole one (8, 08, 8.0; 8. is 8 and a full stop), else
    None: no number, a fraction, or one too long to read (Python's 4,300-digit limit)."""
    match = _NUMBER_RE.search(text)
    if not match:
        return None
    whole, _, fraction = match.group().partition(".")
    try:
        return int(whole) if not fraction.strip("0") else None
    except ValueError:
        return None


def exact_answer(prompts: list, completions: list[str], answer: list, **columns) -> list[float]:
    """1.0 where the first number in the completion equals ``answer``, else 0.0."""
    return [float(first_number(c) == int(a)) for c, a in zip(completions, answer)]


def answer_format(prompts: list, completions: list[str], **columns) -> list[float]:
    """1.0 where the completion is exactly the answer sentence " The answer is N.", else 0.0."""
    return [float(bool(_FORMAT_RE.match(c.rstrip()))) for c in completions]


@dataclass
class TaskSpec:
    """How much of the task to generate, and how good the demonstrations are."""

    seed: int = 0
    n_test: int = 150          # held-out prompts for reported accuracy only
    n_valid: int = 75          # held-out prompts for choosing settings
    sft_per_prompt: int = 2    # demonstrations per training prompt
    sft_correct: float = 0.5   # share of demonstrations with the right sum
    sft_sloppy: float = 0.2    # share written in another form than the answer sentence


def demonstration(rng: random.Random, answer: int, spec: TaskSpec) -> str:
    """One demonstration: the right sum with probability ``sft_correct``, else off by 1-3."""
    n = answer if rng.random() < spec.sft_correct else max(0, answer + rng.choice((-3, -2, -1, 1, 2, 3)))
    form = rng.choice(SLOPPY_FORMATS) if rng.random() < spec.sft_sloppy else ANSWER_FORMAT
    return form.format(n=n)


def generate(spec: TaskSpec = TaskSpec()) -> dict[str, list[dict]]:
    """All splits in the standard columns (DESIGN.md §4): ``sft`` (prompt, completion, answer) and
    ``prompts_train`` / ``prompts_valid`` / ``prompts_test`` (prompt, answer); the three prompt sets
    are disjoint."""
    rng = random.Random(spec.seed)
    rows = all_prompts()
    rng.shuffle(rows)
    test, valid = rows[: spec.n_test], rows[spec.n_test: spec.n_test + spec.n_valid]
    train = rows[spec.n_test + spec.n_valid:]
    sft = [{"prompt": r["prompt"], "completion": demonstration(rng, r["answer"], spec), "answer": r["answer"]}
           for r in train for _ in range(spec.sft_per_prompt)]
    return {"sft": sft, "prompts_train": train, "prompts_valid": valid, "prompts_test": test,
            "meta": [asdict(spec)]}


def write(out_dir: str | Path, spec: TaskSpec = TaskSpec()) -> dict[str, Path]:
    """Write every split as ``<name>.jsonl`` (and ``meta.json``) under ``out_dir``; returns name → path."""
    return write_splits(generate(spec), out_dir)
