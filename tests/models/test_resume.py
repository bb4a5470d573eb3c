"""Reliability: a run killed at any moment resumes to the very weights of an uninterrupted run."""

import json
import os
import shutil
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
def whole_run(tiny_model_dir, task_dir, tmp_path_factory):
    """The directory of an uninterrupted SFT run of ``_sft_cmd`` (checkpoints of steps 38 and 40)."""
    out = tmp_path_factory.mktemp("whole")
    subprocess.run(_sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


@pytest.fixture(scope="module")
def uninterrupted(whole_run):
    return _weights(whole_run)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_sft_resumes_to_identical_weights(tiny_model_dir, task_dir, tmp_path, uninterrupted, sig,
                                                     whole_run):
    out = tmp_path / "run"
    # resume auto: one command for the first start (no checkpoint: afresh) and every restart
    auto = ["--train.resume", "auto"] if sig == signal.SIGKILL else []
    cmd = _sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out, *auto)
    code, stderr = _start_and_interrupt(cmd, out, sig, tmp_path / "stderr.txt")
    assert code != 0, "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:  # a clean stop: a checkpoint at the step it finished, how to resume, and the
        assert "--train.resume latest" in stderr  # shell's status for the signal (a scheduler sees it unfinished)
        assert code == 128 + signal.SIGTERM, stderr[-2000:]
    assert not (out / "model.safetensors").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < STEPS
    subprocess.run(cmd + ([] if auto else ["--train.resume", "latest"]), check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    resumed = _weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name  # bitwise, on CPU
    # and its log: a checkpoint inside a logging window (every 5 steps; saved every 2) carries that window's steps
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        assert _logged(out, key) == _logged(whole_run, key), key


def _records(out):
    """``out``'s metrics records less their timings (which differ from run to run)."""
    return [{k: v for k, v in r.items() if not k.startswith("time/") and "seconds" not in k and "per_s" not in k}
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _logged(out, key):
    return [(r["step"], r[key]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def _with(cmd: list[str], **options: str) -> list[str]:
    """``cmd`` with the value of each ``--option`` replaced (a repeated flag would make a list)."""
    cmd = list(cmd)
    for name, value in options.items():
        cmd[cmd.index(f"--{name}") + 1] = value
    return cmd


def test_a_resume_with_another_learning_rate_is_refused_before_anything_is_written(tiny_model_dir, task_dir,
                                                                                    whole_run, tmp_path, capsys):
    from rlhfkit.cli import main

    out = tmp_path / "run"
    shutil.copytree(whole_run, out)
    record = (out / "rlhfkit_config.yaml").read_text()
    cmd = _sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out, "--train.resume", "latest")
    assert main(_with(cmd[3:], **{"optim.lr": "1e-6"})) == 2
    error = capsys.readouterr().err
    assert f"cannot resume {out / 'checkpoints' / 'step-40'}" in error and "optim.lr: 0.003 → 1e-06" in error
    assert (out / "rlhfkit_config.yaml").read_text() == record  # still the settings the weights were trained with


def test_a_fresh_run_into_an_earlier_run_s_directory_is_refused_unless_told_to_delete_it(tiny_model_dir, task_dir,
                                                                                         whole_run, tmp_path,
                                                                                         capsys):
    # a shorter run there would save step-2 and step-4, and prune them at once as older than the earlier
    # run's step-38 and step-40; --train.resume latest would then load the other run's weights
    from rlhfkit.cli import main

    out = tmp_path / "run"
    shutil.copytree(whole_run, out)
    cmd = _with(_sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out)[3:], **{"train.max_steps": "4"})
    assert main(cmd) == 2
    error = capsys.readouterr().err
    assert f"{out / 'checkpoints'} holds an earlier run's checkpoints (newest: step-40)" in error
    assert main([*cmd, "--train.overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_a_fresh_run_over_an_earlier_run_s_final_model_is_refused_unless_told_to_replace_it(tiny_model_dir, task_dir,
                                                                                             whole_run, tmp_path,
                                                                                             capsys):
    # a finished run saved without checkpoints (train.save_every 0, the default): its model is all there is
    from rlhfkit.cli import main

    out = tmp_path / "run"
    shutil.copytree(whole_run, out)
    shutil.rmtree(out / "checkpoints")
    saved = (out / "model.safetensors").read_bytes()
    cmd = _with(_sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out)[3:], **{"train.max_steps": "2"})
    assert main(cmd) == 2
    error = capsys.readouterr().err
    assert f"--train.out {out} holds the model an earlier run saved (model.safetensors)" in error
    assert (out / "model.safetensors").read_bytes() == saved
    assert main([*cmd, "--train.resume", "auto"]) == 2  # a job restarted after its end: it says the run finished
    assert "(that run finished, saving its model: --train.resume auto resumes from checkpoints" in (
        capsys.readouterr().err)
    assert main([*cmd, "--train.overwrite_output_dir", "true"]) == 0
    assert (out / "model.safetensors").read_bytes() != saved
    # a run that stopped before saving its model (its config alone) is no finished run: started afresh
    (out / "model.safetensors").unlink()
    shutil.rmtree(out / "checkpoints")
    assert main(cmd) == 0 and (out / "model.safetensors").is_file()


def test_a_resume_mid_run_keeps_the_records_at_its_step_whatever_it_now_logs(tiny_model_dir, task_dir, tmp_path):
    # the records a run logged at its end only (helper-53: a mid-run resume with another log_every had deleted
    # the step's train and eval records) are told by the checkpoint's own run, not by the resumed one's settings
    from rlhfkit.cli import main

    out = tmp_path / "run"
    cmd = _with(_sft_cmd(tiny_model_dir("llama"), task_dir / "sft.jsonl", out)[3:],
                **{"train.max_steps": "6", "train.log_every": "1", "train.save_every": "3"})
    assert main([*cmd, "--train.eval_every", "3"]) == 0
    before = [r for r in _records(out) if r["step"] <= 3]
    assert [r["step"] for r in before] == [1, 2, 3, 3]  # step 3's training record and its evaluation
    resumed = _with(cmd, **{"train.log_every": "2"})
    assert main([*resumed, "--train.eval_every", "0", "--train.resume", str(out / "checkpoints" / "step-3")]) == 0
    assert [r for r in _records(out) if r["step"] <= 3] == before


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path):
    model = torch.nn.Linear(2, 1)

    calls = []

    def loss_fn(indices):  # one micro-batch per step: the third step's loss is NaN
        calls.append(len(indices))
        value = model(torch.ones(len(indices), 2)).mean()
        return (value * float("nan") if len(calls) == 3 else value), len(indices), {}

    logger = Logger(tmp_path, tensorboard=False)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3; last good checkpoint: none"):
        run(model=model, loss_fn=loss_fn, n_examples=8, cfg=TrainConfig(out=str(tmp_path), max_steps=5, batch_size=4),
            optim=OptimConfig(lr=0.1), logger=logger)
    logger.close()


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from rlhfkit.trainers.checkpoint import find_checkpoint

    with pytest.raises(FileNotFoundError, match="no checkpoint.*auto starts afresh when there is none"):
        find_checkpoint(tmp_path, "latest")
    assert find_checkpoint(tmp_path, "auto") is None and find_checkpoint(tmp_path, "") is None


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


def _all_weights(out):
    """Every safetensors file a finished run wrote (checkpoints aside), by relative path."""
    return {str(p.relative_to(out)): load_file(str(p)) for p in sorted(out.rglob("*.safetensors"))
            if "checkpoints" not in p.parts}


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "rm", "--model", tiny_model_dir("llama"), "--data",
                    str(task_dir / "preference.jsonl"), "--out", str(out), "--train.max_steps", "2",
                    "--train.batch_size", "8", "--train.tensorboard", "false"], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def _ppo_cmd(model, reward, task_dir, out, *extra):
    # adaptive β and two PPO epochs: the KL controller and the shuffling generator must come back too
    return [sys.executable, "-m", "rlhfkit.cli", "ppo", "--model", model, "--reward_model", str(reward),
            "--prompts", str(task_dir / "prompts_train.jsonl"), "--out", str(out), "--train.max_steps", "8",
            "--rollout_batch_size", "8", "--mini_batch_size", "4", "--optim.lr", "1e-2", "--adaptive_kl", "true",
            "--kl_horizon", "50", "--generation.max_new_tokens", "8", "--train.save_every", "2",
            "--train.tensorboard", "false", *extra]


def _grpo_cmd(model, reward, task_dir, out, *extra):
    # a reward model's scores, which differ within a group (the arithmetic rewards gave the tiny model all zeros:
    # no advantage, nothing trained, and any restore would have passed)
    return [sys.executable, "-m", "rlhfkit.cli", "grpo", "--model", model,
            "--prompts", str(task_dir / "prompts_train.jsonl"), "--rewards", str(reward),
            "--out", str(out), "--train.max_steps", "8", "--prompts_per_step", "4", "--group_size", "4",
            "--mini_batch_size", "8", "--epochs", "2", "--optim.lr", "1e-2", "--generation.max_new_tokens", "8",
            "--train.save_every", "2", "--train.tensorboard", "false", *extra]


@pytest.mark.parametrize("trainer, sig", [("ppo", signal.SIGKILL), ("ppo", signal.SIGTERM), ("grpo", signal.SIGKILL)],
                         ids=["ppo-SIGKILL", "ppo-SIGTERM", "grpo-SIGKILL"])
def test_interrupted_rollout_trainers_resume_to_identical_weights(tiny_model_dir, task_dir, reward_dir, tmp_path,
                                                                  trainer, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = tiny_model_dir("llama")

    def cmd(out):
        if trainer == "ppo":
            return _ppo_cmd(model, reward_dir, task_dir, out)
        return _grpo_cmd(model, reward_dir, task_dir, out)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(cmd(whole), check=True, capture_output=True, env=env)
    code, stderr = _start_and_interrupt(cmd(cut), cut, sig, tmp_path / "stderr.txt")
    assert code != 0, "the run finished before it could be interrupted"
    if sig == signal.SIGTERM:
        assert "--train.resume latest" in stderr
    subprocess.run(cmd(cut) + ["--train.resume", "latest"], check=True, capture_output=True, env=env)
    records = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in records]
    assert logged == sorted(set(logged)) and logged[-1] == 8  # one record per step, the killed run's extras gone
    final = cut / "checkpoints" / "step-8"  # a checkpoint at the end too, with the config it ran with
    assert (final / "trainer_state.pt").is_file() and (final / "rlhfkit_config.yaml").is_file()
    expected, resumed = _all_weights(whole), _all_weights(cut)
    assert expected and resumed.keys() == expected.keys()
    # it trained (LoRA's B starts at zero): a restore that lost anything would show
    assert any(value.abs().max() > 1e-4 for tensors in expected.values() for name, value in tensors.items()
               if "lora_B" in name)
    for file, tensors in expected.items():
        for name, value in tensors.items():
            assert torch.equal(resumed[file][name], value), (file, name)  # bitwise, on CPU


def _nan_after(calls: int):
    """A reward that turns NaN from its ``calls``-th call on (a broken reward model, say)."""
    seen = []

    def score(prompts, texts):
        seen.append(1)
        return torch.full((len(texts),), float("nan") if len(seen) >= calls else 0.5)

    return score


def _ppo_config(model, task_dir, out, **train):
    from rlhfkit.config import from_dict
    from rlhfkit.trainers.ppo import PPOConfig

    return from_dict(PPOConfig, {
        "model": {"path": model}, "prompts": str(task_dir / "prompts_train.jsonl"), "rollout_batch_size": 8,
        "mini_batch_size": 4, "generation": {"max_new_tokens": 6},
        "train": {"out": str(out), "max_steps": 4, "tensorboard": False, "save_every": 1, **train}})


def test_a_nan_reward_stops_ppo_naming_the_step_and_the_last_checkpoint(tiny_model_dir, task_dir, tmp_path):
    from rlhfkit.trainers import ppo

    cfg = _ppo_config(tiny_model_dir("llama"), task_dir, tmp_path)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3; last good checkpoint: .*step-2"):
        ppo.train(cfg, score_fn=_nan_after(3))


def test_on_nan_skip_counts_the_skipped_updates_and_keeps_the_weights_finite(tiny_model_dir, task_dir, tmp_path):
    from rlhfkit.trainers import ppo

    cfg = _ppo_config(tiny_model_dir("llama"), task_dir, tmp_path, on_nan="skip", save_every=0)
    metrics = ppo.train(cfg, score_fn=_nan_after(3))
    assert metrics["train/skipped_updates"] == 2 * 2 * 2  # steps 3 and 4 × 2 epochs × 2 mini-batches
    for name, value in load_file(str(tmp_path / "adapter_model.safetensors")).items():
        assert torch.isfinite(value).all(), name


def test_on_nan_skip_in_the_supervised_loop_leaves_that_step_out(tmp_path):
    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    calls = []

    def loss_fn(indices):  # d loss / d bias = 1 every step; the second step's loss is NaN
        calls.append(1)
        value = model(torch.ones(len(indices), 2)).mean()
        return (value * float("nan") if len(calls) == 2 else value), len(indices), {}

    logger = Logger(tmp_path, tensorboard=False)
    cfg = TrainConfig(out=str(tmp_path), max_steps=3, batch_size=4, on_nan="skip", log_every=1)
    metrics = run(model=model, loss_fn=loss_fn, n_examples=8, cfg=cfg,
                  optim=OptimConfig(lr=0.1, betas=[0.0, 0.999], weight_decay=0.0, warmup_steps=0,
                                                          schedule="constant"), logger=logger)
    logger.close()
    # Adam with β1 = 0 moves each weight by lr·sign(g) per applied step: two steps applied, not three
    torch.testing.assert_close(model.bias.detach(), torch.tensor([-0.2]), rtol=0, atol=1e-6)
    assert metrics["train/skipped_steps"] == 1


def test_a_fresh_run_in_an_old_directory_does_not_append_to_its_metrics(tmp_path):
    def once():
        model = torch.nn.Linear(2, 1)
        logger = Logger(tmp_path, tensorboard=False)
        run(model=model, loss_fn=lambda idx: (model(torch.ones(len(idx), 2)).pow(2).mean(), len(idx), {}),
            n_examples=8, cfg=TrainConfig(out=str(tmp_path), max_steps=3, batch_size=4, log_every=1),
            optim=OptimConfig(lr=0.1), logger=logger)
        logger.close()
        return [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]

    assert once() == [1, 2, 3]
    assert once() == [1, 2, 3]


def test_a_resumed_run_s_tensorboard_hides_the_steps_it_logs_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = Logger(tmp_path)
    for step in range(1, 5):
        first.log(step, {"loss": float(step)})
    first.close()  # "killed" after step 4; its last checkpoint was step 2
    resumed = Logger(tmp_path)
    resumed.rewind(2)
    for step in (3, 4, 5):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0),
                                                                    (5, 50.0)]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_a_full_sft_checkpoint_loads_as_a_model(tiny_model_dir, task_dir, tmp_path):
    # the tokenizer is saved beside the weights: the checkpoint is what --model takes to start a fresh run
    from rlhfkit.cli import main

    out = tmp_path / "sft"
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
                 "--train.max_steps", "2", "--train.save_every", "1", "--train.batch_size", "4",
                 "--train.tensorboard", "false", "--eval_fraction", "0"]) == 0
    step = out / "checkpoints" / "step-1"
    assert (step / "tokenizer_config.json").is_file()
    assert main(["sft", "--model", str(step), "--data", str(task_dir / "sft.jsonl"), "--out", str(tmp_path / "next"),
                 "--train.max_steps", "1", "--train.batch_size", "4", "--train.tensorboard", "false",
                 "--eval_fraction", "0"]) == 0


def test_a_constant_schedule_run_resumed_for_more_steps_is_the_longer_run(tiny_model_dir, task_dir, reward_dir,
                                                                          tmp_path, capsys):
    # PPO's default schedule is constant: the run's length sets no update, so "train 4 more steps" resumes
    from rlhfkit.cli import main

    model = tiny_model_dir("llama")
    whole, short = tmp_path / "whole", tmp_path / "short"
    # logged every 3 steps and evaluated every 3: the short run's end (4) is on neither grid, so it logged a
    # shorter last window and its final evaluation there, which the longer run does not
    logs = ["--train.log_every", "3", "--train.eval_every", "3",
            "--eval_prompts", str(task_dir / "prompts_valid.jsonl")]
    assert main(_ppo_cmd(model, reward_dir, task_dir, whole, *logs)[3:]) == 0
    assert main(_with(_ppo_cmd(model, reward_dir, task_dir, short, *logs)[3:], **{"train.max_steps": "4"})) == 0
    assert [r["step"] for r in _records(short)] == [3, 4, 4]
    assert main(_ppo_cmd(model, reward_dir, task_dir, short, *logs, "--train.resume", "latest")[3:]) == 0
    expected, resumed = _all_weights(whole), _all_weights(short)
    assert expected and resumed.keys() == expected.keys()
    for file, tensors in expected.items():
        for name, value in tensors.items():
            assert torch.equal(resumed[file][name], value), (file, name)
    # and the records are the longer run's: the window across the short run's end (steps 4 to 6) logged whole
    assert _records(short) == _records(whole)
    assert [r["step"] for r in _records(whole)] == [3, 6, 8, 8]
    # under a cosine schedule the length is part of every step's learning rate: refused, saying why
    capsys.readouterr()
    cosine = _with(_ppo_cmd(model, reward_dir, task_dir, tmp_path / "cosine")[3:], **{"train.max_steps": "2"})
    assert main([*cosine, "--optim.schedule", "cosine"]) == 0
    assert main([*_with(cosine, **{"train.max_steps": "4"}), "--optim.schedule", "cosine",
                 "--train.resume", "latest"]) == 2
    error = capsys.readouterr().err
    assert "train.max_steps: 2 → 4" in error
    assert "--optim.schedule constant and its warm-up in warmup_steps may be resumed for more steps" in error
