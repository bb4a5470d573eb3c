"""The arithmetic task: rewards by hand, disjoint splits, mixed-quality demonstrations."""

import json

import pytest

from rlhfkit.data.tasks import arithmetic
from rlhfkit.rewards import build_reward

P = "User: What is 7 + 5?\nAssistant:"


@pytest.mark.parametrize("completion, answer, exact, form", [
    (" The answer is 12.", 12, 1.0, 1.0),
    (" The answer is 13.", 12, 0.0, 1.0),   # well formed, wrong sum
    (" It is 12.", 12, 1.0, 0.0),           # right sum, not the answer sentence
    (" 12", 12, 1.0, 0.0),
    (" The answer is 1 2.", 12, 0.0, 0.0),  # the first number is 1
    (" The answer is twelve.", 12, 0.0, 0.0),
    ("", 12, 0.0, 0.0),
    (" The answer is 12. The answer is 13.", 12, 1.0, 0.0),
    (" 12.5", 12, 0.0, 0.0),                # a fraction is not the sum (its whole part once passed)
    (" 12.0", 12, 1.0, 0.0),
    (" 012", 12, 1.0, 0.0),
    (" " + "9" * 5000, 12, 0.0, 0.0),        # past Python's 4,300 digits: 0, not an error that stops a run
])
def test_rewards_by_hand(completion, answer, exact, form):
    assert arithmetic.exact_answer([P], [completion], answer=[answer]) == [exact]
    assert arithmetic.answer_format([P], [completion]) == [form]


def test_rewards_load_by_name_and_combine_with_weights():
    reward = build_reward(["rlhfkit.data.tasks.arithmetic:exact_answer", "rlhfkit.data.tasks.arithmetic:answer_format"],
                          [1.0, 0.5])
    total, parts = reward([P, P, P], [" The answer is 12.", " It is 12.", " The answer is 3."], {"answer": [12] * 3})
    assert total.tolist() == [1.5, 1.0, 0.5]
    assert parts["exact_answer"].tolist() == [1.0, 1.0, 0.0] and parts["answer_format"].tolist() == [1.0, 0.0, 1.0]


def test_prompts_carry_their_sum():
    rows = arithmetic.all_prompts()
    assert len(rows) == len({r["prompt"] for r in rows}) == 600
    assert {"prompt": P, "answer": 12} in rows


def test_splits_are_disjoint_and_sft_only_on_train(tmp_path):
    paths = arithmetic.write(tmp_path, arithmetic.TaskSpec(seed=3))
    read = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items() if k != "meta"}
    train, valid, test = ({r["prompt"] for r in read[k]} for k in ("prompts_train", "prompts_valid", "prompts_test"))
    assert len(test) == 150 and len(valid) == 75 and len(train) == 600 - 225
    assert not (train & valid) and not (train & test) and not (valid & test)
    assert {r["prompt"] for r in read["sft"]} == train
    assert set(read["prompts_test"][0]) == {"prompt", "answer"}


def test_demonstrations_are_of_mixed_quality():
    sft = arithmetic.generate(arithmetic.TaskSpec(seed=0))["sft"]
    right = sum(arithmetic.exact_answer([], [r["completion"] for r in sft], answer=[r["answer"] for r in sft]))
    formatted = sum(arithmetic.answer_format([], [r["completion"] for r in sft]))
    assert 0.4 < right / len(sft) < 0.6  # sft_correct = 0.5: imitation lands mid-range
    assert 0.7 < formatted / len(sft) < 0.9  # sft_sloppy = 0.2
