"""The supervised loop's throughput metrics: tokens per second and seconds per step per logging window."""

import json
import time

import pytest
import torch

from rlhfkit.config import OptimConfig, TrainConfig
from rlhfkit.trainers.loop import Logger, batch_indices, run


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
