"""The built-in task: gold reward by hand, splits, labels, and no leak into trainers."""

import ast
import json
from pathlib import Path

import pytest

from rlhfkit.data.tasks import describe

P = "User: Describe the garden you saw today.\nAssistant:"


@pytest.mark.parametrize("response, expected", [
    # fluency 1 (well-formed, 2 distinct adjectives); relevance 1; sentiment (1+1)/2 = 1 → 0.3 + 0.7 = 1.0
    (" The garden is lovely and calm.", 1.0),
    # sentiment: (1 + 0 - 1)/3 = 0 → 0.5 · (1 + 0) = 0.5; 0.3 + 0.7 · 0.5 = 0.65
    (" I think the garden is lovely, old and dull.", 0.65),
    # wrong topic: relevance 0 → 0.7 · 1 = 0.7
    (" The river is lovely and calm.", 0.7),
    # repetition: distinct 1/3 → (1/3) · 1.0
    (" The garden is lovely, lovely and lovely.", 1 / 3),
    # six adjectives: length factor 0.5
    (" The garden is lovely, bright, calm, warm, friendly and wonderful.", 0.5),
    # not a sentence of the expected form: form 0.5, single adjective: length 0.8 → 0.5 · 0.8 · 1.0
    ("garden lovely", 0.4),
    # no adjective at all
    (" The garden is.", 0.0),
    ("", 0.0),
])
def test_gold_reward_by_hand(response, expected):
    assert describe.gold_reward(P, response) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_is_in_unit_interval_on_samples():
    import random

    rng = random.Random(0)
    values = [describe.gold_reward(p, describe.sample_response(rng, p)) for p in describe.all_prompts()]
    assert all(0.0 <= v <= 1.0 for v in values)
    # demonstrations land mid-scale, so imitation alone is not the ceiling
    assert 0.4 < sum(values) / len(values) < 0.7


def test_generate_is_deterministic_and_splits_are_disjoint():
    a, b = describe.generate(describe.TaskSpec(seed=3)), describe.generate(describe.TaskSpec(seed=3))
    assert a == b
    assert a != describe.generate(describe.TaskSpec(seed=4))
    test = {r["prompt"] for r in a["prompts_test"]}
    valid = {r["prompt"] for r in a["prompts_valid"]}
    train = {r["prompt"] for r in a["prompts_train"]}
    assert len(test) == 256 and len(valid) == 128 and not (test & valid) and not (test & train) and not (valid & train)
    for split in ("sft", "preference", "unpaired"):
        assert {r["prompt"] for r in a[split]} <= train


def test_preference_labels_follow_gold_with_noise():
    data = describe.generate()
    agree = [describe.gold_reward(r["prompt"], r["chosen"]) >= describe.gold_reward(r["prompt"], r["rejected"])
             for r in data["preference"]]
    share = sum(agree) / len(agree)
    ceiling = data["meta"][0]["label_accuracy_ceiling"]
    # labels mostly agree with the gold ordering, but noise keeps them well below perfect
    assert 0.6 < share < 0.9 and 0.6 < ceiling < 0.9
    assert all(r["chosen"] != r["rejected"] for r in data["preference"])


def test_unpaired_labels_use_the_threshold():
    data = describe.generate()
    for r in data["unpaired"]:
        assert r["label"] == (describe.gold_reward(r["prompt"], r["completion"]) >= 0.6)
    assert 0.1 < sum(r["label"] for r in data["unpaired"]) / len(data["unpaired"]) < 0.9


def test_write_uses_standard_columns(tmp_path):
    paths = describe.write(tmp_path)
    first = json.loads(paths["sft"].read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"}
    assert set(json.loads(paths["preference"].read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}
    assert set(json.loads(paths["unpaired"].read_text().splitlines()[0])) == {"prompt", "completion", "label"}


def test_no_trainer_imports_the_gold_reward():
    """Trainers must never see the gold reward: not the task module, not evaluate (which wraps it)."""
    root = Path(describe.__file__).parents[2]
    forbidden = {"rlhfkit.data.tasks.describe", "rlhfkit.evaluate", "rlhfkit.data.tasks"}
    for path in (root / "trainers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n in forbidden or "gold" in n for n in names), f"{path.name} imports {names}"
