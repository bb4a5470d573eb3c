"""Reliability: a run killed at any moment resumes to the very weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import OptimConfig, TrainConfig
from rlhfkit.trainers.loop import Logger, run

STEPS = 40


def _sft_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", model, "--data", str(data), "--out", str(out),
            "--train.max_steps", str(STEPS), "--train.batch_size", "8", "--train.save_every", "2",
            "--train.tensorboard", "false", "--train.log_every", "5", "--optim.lr", "3e-3", *extra]


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def _start_and_interrupt(cmd, out, sig, log):
    """Start ``cmd``, wait for its first checkpoint, then send ``sig``; returns (exit code, its stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as err:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while not any((out / "checkpoints").glob("step-*")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(sig)
        proc.wait(timeout=120)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return _weights(out)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_sft_resumes_to_identical_weights(tiny_model_dir, task_dir, tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    cmd = _sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out)
    code, stderr = _start_and_interrupt(cmd, out, sig, tmp_path / "stderr.txt")
    assert code != 0, "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:  # a clean stop: a checkpoint at the step it finished, and how to resume
        assert "--train.resume latest" in stderr
    assert not (out / "model.safetensors").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < STEPS
    subprocess.run(cmd + ["--train.resume", "latest"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    resumed = _weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name  # bitwise, on CPU


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    model = torch.nn.Linear(2, 1)

    calls = []

    def loss_fn(indices):  # one micro-batch per step: the third step's loss is NaN
        calls.append(len(indices))
        value = model(torch.ones(len(indices), 2)).mean()
        return (value * float("nan") if len(calls) == 3 else value), {}

    logger = Logger(tmp_path, tensorboard=False)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3; last good checkpoint: none"):
        run(model=model, loss_fn=loss_fn, n_examples=8, cfg=TrainConfig(out=str(tmp_path), max_steps=5, batch_size=4),
            optim=OptimConfig(lr=0.1), logger=logger)
    logger.close()


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from rlhfkit.trainers.loop import find_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(tmp_path, "latest")


@pytest.mark.parametrize("command, data", [("rm", "preference.jsonl"), ("dpo", "preference.jsonl")])
def test_killed_reward_model_and_dpo_runs_resume_to_identical_weights(tiny_model_dir, task_dir, tmp_path, command,
                                                                     data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cmd(out):
        return [sys.executable, "-m", "rlhfkit.cli", command, "--model", tiny_model_dir("llama"),
                "--data", str(task_dir / data), "--out", str(out), "--train.max_steps", "30",
                "--train.batch_size", "8", "--train.save_every", "2", "--train.tensorboard", "false",
                "--optim.lr", "1e-3"]

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(cmd(whole), check=True, capture_output=True, env=env)
    code, _ = _start_and_interrupt(cmd(cut), cut, signal.SIGKILL, tmp_path / "stderr.txt")
    assert code != 0, "the run finished before it could be interrupted"
    subprocess.run(cmd(cut) + ["--train.resume", "latest"], check=True, capture_output=True, env=env)
    expected, resumed = _weights(whole), _weights(cut)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
