"""Two processes on the CPU (gloo, launched by torchrun) train to the weights of one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import distributed


def test_shards_cover_the_batch_in_order_once():
    items = list(range(7))
    parts = [distributed.shard(items, 3, r) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.shard(items, 1, 0) == items


def test_one_process_gradients_are_divided_by_the_units():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 6.0])
    distributed.average_gradients([p], 3.0)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args, out, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "rlhfkit.cli"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "rlhfkit.cli"]
    result = subprocess.run(launch + args + ["--out", str(out)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("command, data, extra", [
    ("sft", "sft.jsonl", ["--eval_fraction", "0"]),  # a mean over completion tokens: the split must not reweight it
    ("dpo", "preference.jsonl", ["--beta", "0.5"]),  # the reference: a second copy of the model, in each process
])
def test_two_processes_equal_one_with_the_same_global_batch(tiny_model_dir, task_dir, tmp_path, command, data,
                                                            extra):
    args = [command, "--model", tiny_model_dir("llama"), "--data", str(task_dir / data), "--train.max_steps", "4",
            "--train.batch_size", "8", "--train.log_every", "1", "--train.tensorboard", "false", "--optim.lr", "3e-3",
            *extra]
    one = _train(args, tmp_path / "one", 1)
    two = _train(args, tmp_path / "two", 2)
    base = load_file(str(Path(tiny_model_dir("llama")) / "model.safetensors"))
    assert one.keys() == two.keys()
    moved = 0
    for name, value in one.items():
        diff = (two[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert diff <= 1e-5, (name, diff.item())
        moved += not torch.equal(value, base[name])
    assert moved  # training changed the weights, so the comparison means something
    logs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "train/loss" in r] == [1, 2, 3, 4]  # rank 0 alone writes
