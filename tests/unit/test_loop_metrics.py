"""The supervised loop's metrics: each a mean over the step's whole batch, and the throughput (tokens per
second and seconds per step per logging window)."""

import json
import math
import time

import pytest
import torch

from rlhfkit.config import OptimConfig, TrainConfig
from rlhfkit.trainers.loop import (Logger, add_metrics, batch_indices, build_optimizer, metric_means, run,
                                   split_eval)


def test_tokens_per_second_counts_each_window_s_tokens_and_leaves_evaluation_out(tmp_path):
    lengths = [3 * i + 1 for i in range(10)]  # tokens of example i
    model = torch.nn.Linear(2, 1)

    def evaluate():
        time.sleep(0.5)  # far longer than the steps: it must not count as training time
        return {"eval/loss": 0.0}

    logger = Logger(tmp_path, tensorboard=False)
    cfg = TrainConfig(out=str(tmp_path), max_steps=6, batch_size=4, log_every=2, eval_every=2, seed=3)
    run(model=model, loss_fn=lambda idx: (model(torch.ones(len(idx), 2)).pow(2).mean(), len(idx), {}),
        n_examples=len(lengths), cfg=cfg, optim=OptimConfig(lr=0.1), logger=logger, evaluate=evaluate,
        tokens_of=lambda idx: sum(lengths[i] for i in idx))
    logger.close()
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        window = range(r["step"] - 2, r["step"])  # the two steps since the last log
        tokens = sum(lengths[i] for s in window for i in batch_indices(s, len(lengths), 4, 3))
        assert r["train/tokens_per_s"] * r["train/step_seconds"] * 2 == pytest.approx(tokens, rel=1e-9)
        assert r["train/step_seconds"] < 0.2  # the evaluations at steps 2 and 4 are not in any window


def test_without_a_token_count_only_step_seconds_are_logged(tmp_path):
    model = torch.nn.Linear(2, 1)
    logger = Logger(tmp_path, tensorboard=False)
    last = run(model=model, loss_fn=lambda idx: (model(torch.ones(len(idx), 2)).pow(2).mean(), len(idx), {}),
               n_examples=8, cfg=TrainConfig(out=str(tmp_path), max_steps=2, batch_size=4, log_every=1),
               optim=OptimConfig(lr=0.1), logger=logger)
    logger.close()
    assert "train/tokens_per_s" not in last and last["train/step_seconds"] > 0


def test_a_metric_is_a_mean_over_the_units_or_the_count_it_comes_with():
    sums = {}
    add_metrics(sums, {"accuracy": 1.0, "rewards/chosen": (2.0, 1)}, weight=4)  # 4 pairs, 1 desirable
    add_metrics(sums, {"accuracy": 0.5, "rewards/chosen": (-1.0, 0)}, weight=2)  # a count of 0 adds nothing
    add_metrics(sums, {"accuracy": 0.0, "rewards/chosen": (5.0, 3)}, weight=2)
    assert metric_means(sums) == {"accuracy": pytest.approx((4 + 1) / 8), "rewards/chosen": pytest.approx(17 / 4)}
    empty = {}
    add_metrics(empty, {"rewards/rejected": (0.0, 0)}, weight=3)
    assert set(empty) == {"rewards/rejected"} and metric_means(empty) == {}  # entered, but nothing to average


def test_a_step_s_metric_weighs_each_micro_batch_by_its_units(tmp_path):
    # micro-batches of 1 and 3 units: the step's metric is their units-weighted mean, not the plain mean of two
    model = torch.nn.Linear(1, 1)
    units = {0: 1.0, 1: 3.0}

    def loss_fn(idx):
        n = units[idx[0] % 2]
        return model(torch.ones(1, 1)).sum() * 0, n, {"hit": float(idx[0] % 2)}

    logger = Logger(tmp_path, tensorboard=False)
    run(model=model, loss_fn=loss_fn, n_examples=2, cfg=TrainConfig(out=str(tmp_path), max_steps=1, batch_size=2,
                                                                      grad_accum=2, log_every=1),
        optim=OptimConfig(lr=0.1), logger=logger)
    logger.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["train/hit"] == pytest.approx(3 / 4)


def test_a_metric_without_a_value_is_written_as_json_null(tmp_path):
    # a reward that applied to no sample of a window has a NaN mean: bare NaN is not JSON (jq, JavaScript refuse it)
    logger = Logger(tmp_path, tensorboard=False)
    logger.rewind(0)
    logger.log(1, {"rollout/reward/math": float("nan"), "train/loss": 0.5})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "step": 1, "rollout/reward/math": None, "train/loss": 0.5}


def test_a_warmup_as_long_as_the_run_is_pointed_out(recwarn):
    # 6 updates under the default 10 warm-up steps: the rate would peak at 6/11 of optim.lr and never decay
    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer, scheduler = build_optimizer(params, OptimConfig(lr=1.0, warmup_steps=10), 11)
    assert not recwarn.list  # a run longer than its warm-up
    with pytest.warns(UserWarning, match=r"optim.warmup_steps 10 is not below the run's 6 updates: the learning "
                                         r"rate stays under optim.lr 1.0"):
        optimizer, scheduler = build_optimizer(params, OptimConfig(lr=1.0, warmup_steps=10), 6)
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    assert max(rates) == pytest.approx(6 / 11)
    # a ratio that rounds up to the whole run: ceil(0.7 x 3) = 3 warm-up updates of 3
    with pytest.warns(UserWarning, match=r"optim.warmup_ratio 0.7 \(3 updates\) is not below the run's 3 updates.*"
                                         r"set optim.warmup_ratio lower"):
        build_optimizer(params, OptimConfig(lr=1.0, warmup_ratio=0.7), 3)


def test_a_floor_for_a_schedule_without_decay_is_refused():
    with pytest.raises(ValueError, match="min_lr_ratio 0.1 is where a decay ends; the constant schedule has none"):
        OptimConfig(schedule="constant", min_lr_ratio=0.1)


@pytest.mark.parametrize("schedule, warmup, expected", [
    # 10 updates, 2 of warm-up at 1/3, 2/3; then 8 of decay from 1 towards min_lr_ratio 0.1 (progress k/8)
    ("constant", dict(warmup_steps=2), [1 / 3, 2 / 3] + [1.0] * 8),
    ("linear", dict(warmup_steps=2), [1 / 3, 2 / 3] + [0.1 + 0.9 * (1 - k / 8) for k in range(8)]),
    ("cosine", dict(warmup_steps=2), [1 / 3, 2 / 3] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 8))
                                                       for k in range(8)]),
    # warmup_ratio 0.15 of 10 updates: 1.5, rounded up to 2 (replacing warmup_steps)
    ("linear", dict(warmup_steps=5, warmup_ratio=0.15), [1 / 3, 2 / 3] + [0.1 + 0.9 * (1 - k / 8) for k in range(8)]),
])
def test_the_learning_rate_schedules_step_by_step(schedule, warmup, expected):
    params = [torch.nn.Parameter(torch.ones(2))]
    floor = 0.0 if schedule == "constant" else 0.1  # a floor is where a decay ends: constant has none
    optimizer, scheduler = build_optimizer(params, OptimConfig(lr=2.0, schedule=schedule, min_lr_ratio=floor, **warmup),
                                           10)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    assert rates == pytest.approx([2.0 * f for f in expected])
    assert scheduler.get_last_lr()[0] == pytest.approx(2.0 * (1.0 if schedule == "constant" else 0.1))  # past the end


def test_a_file_too_small_to_hold_rows_out_says_so(capsys):
    train, held = split_eval(lambda path: list(range(16)), "small.jsonl", "", 0.05, seed=0)
    assert sorted(train) == list(range(16)) and held == []
    assert "small.jsonl: 16 rows, none held out for evaluation" in capsys.readouterr().err
    train, held = split_eval(lambda path: list(range(100)), "big.jsonl", "", 0.05, seed=0)
    assert len(held) == 5 and not set(held) & set(train) and capsys.readouterr().err == ""
    split_eval(lambda path: list(range(16)), "small.jsonl", "", 0.0, seed=0)  # none asked for: nothing to say
    assert capsys.readouterr().err == ""


def test_samples_are_written_whatever_their_columns_hold_and_a_cut_off_line_is_dropped_on_rewind(tmp_path):
    import datetime
    import json

    from rlhfkit.trainers.loop import Logger, sample_records

    logger = Logger(tmp_path, tensorboard=False)
    prompts = [[{"role": "user", "content": "Hi", "sent": datetime.date(2026, 12, 6)}], "plain"]
    logger.samples(1, sample_records(prompts, ["a", "b"], 4, reward=[float("inf"), float("nan")], ended=[True, False]))
    logger.log(1, {"loss": 1.0})
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"][0]["sent"] == "2026-12-06" and rows[0]["reward"] is None and rows[1]["reward"] is None
    with open(tmp_path / "samples.jsonl", "ab") as f:  # a run killed in the middle of a line, and of a character
        f.write('{"step": 2, "prompt": "答'.encode()[:-1])
    logger.rewind(1)
    assert [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 1]
    logger.close()


def test_weight_decay_shrinks_matrices_and_leaves_biases_and_norm_weights(tmp_path):
    # AdamW with zero gradients moves a tensor by its decay alone: w <- w (1 - lr wd), here 1 - 0.1 x 0.5 = 0.95
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, _ = build_optimizer(model.parameters(), OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0), 1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    assert torch.allclose(after["0.weight"], 0.95 * before["0.weight"])
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[name], before[name]), name
    # no decay: one group, as checkpoints from before the split hold
    assert len(build_optimizer(model.parameters(), OptimConfig(lr=0.1, warmup_steps=0), 1)[0].param_groups) == 1
