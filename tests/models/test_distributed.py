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
from rlhfkit.cli import main


def test_shards_cover_the_batch_in_order_once():
    items = list(range(7))
    parts = [distributed.shard(items, 3, r) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert distributed.shard(items, 1, 0) == items


def test_micro_batches_are_as_many_in_every_process_and_spare_ones_are_marked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.micro_splits(8, 8, 3) == [(slice(0, 3), True), (slice(3, 6), True), (slice(6, 8), True)]
    assert distributed.micro_splits(8, 8, 0) == [(slice(0, 8), True)]  # 0: the whole share
    assert distributed.micro_splits(8, 8, 8) == distributed.micro_splits(8, 8, 100) == [(slice(0, 8), True)]
    monkeypatch.setenv("WORLD_SIZE", "2")
    # 5 rows over 2 processes: shares 3 and 2, micro-batches of at most 1 row: three in each process, the
    # smaller share's third a spare (its first row again, to be weighed 0)
    assert distributed.micro_splits(3, 5, 1) == [(slice(0, 1), True), (slice(1, 2), True), (slice(2, 3), True)]
    assert distributed.micro_splits(2, 5, 1) == [(slice(0, 1), True), (slice(1, 2), True), (slice(0, 1), False)]
    assert distributed.micro_splits(2, 5, 2) == [(slice(0, 1), True), (slice(1, 2), True)]  # at most 2: 2 of 1


def test_splits_that_leave_a_process_without_rows_are_refused_naming_the_setting(monkeypatch):
    from rlhfkit.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for buffer, mini in ((8, 4), (8, 3), (8, 64), (2, 2)):  # mini-batches 4+4, 3+3+2, the whole 8, 2
        distributed.check_shares(buffer, mini, rollout_batch_size=buffer)
    with pytest.raises(ConfigError, match="mini_batch_size 1 leaves some of the 2 processes without rows"):
        distributed.check_shares(8, 1, rollout_batch_size=8)
    with pytest.raises(ConfigError, match="prompts_per_step 1 leaves some of the 2 processes without rows"):
        distributed.check_shares(8, 8, prompts_per_step=1)
    with pytest.raises(ConfigError, match=r"prompts_per_step 1 \(p.jsonl holds 1 usable prompts\) leaves"):
        distributed.check_shares(8, 8, "p.jsonl", 1, prompts_per_step=1)
    with pytest.raises(ConfigError, match="whose last holds 1, fewer than the 2 processes: choose a mini_batch_size "
                                          "that divides 8"):
        distributed.check_shares(8, 7, rollout_batch_size=8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check_shares(1, 1, rollout_batch_size=1)


@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_a_prompts_file_smaller_than_the_processes_is_refused_in_every_process(tiny_model_dir, task_dir, tmp_path,
                                                                              command):
    # the batch is the whole file when it holds fewer rows than the setting: one prompt for two processes
    # (before: process 1 sampled nothing and crashed in pad_batch, and process 0 waited on it)
    (tmp_path / "one.jsonl").write_text((task_dir / "prompts_train.jsonl").read_text().splitlines()[0] + "\n")
    args = [command, "--model", tiny_model_dir("llama"), "--prompts", str(tmp_path / "one.jsonl"),
            "--train.tensorboard", "false", "--out", str(tmp_path / "run")]
    reward = "rlhfkit.data.tasks.arithmetic:answer_format"
    args += ["--reward_model", "unused"] if command == "ppo" else ["--rewards", reward]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(_free_port()), "-m", "rlhfkit.cli", *args]
    result = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert said.count(f"({tmp_path / 'one.jsonl'} holds 1 usable prompts) leaves some of the 2 processes") == 2


def test_one_process_gradients_are_divided_by_the_units():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 6.0])
    distributed.average_gradients([p], 3.0)
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0]))


def test_gradient_buckets_keep_order_and_cover_every_tensor():
    tensors = [torch.zeros(n) for n in (3, 4, 10, 2, 2)]
    groups = distributed._buckets(tensors, 8)
    assert [[t.numel() for t in g] for g in groups] == [[3, 4], [10], [2, 2]]
    assert distributed._buckets([], 8) == []


def port_taken(stderr: str) -> bool:
    """Whether a launch failed because its rendezvous port was in use."""
    return "EADDRINUSE" in stderr or "Address already in use" in stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args, out, processes, weights="model.safetensors"):
    """Train in this process (``processes`` 1: no interpreter to start) or in ``processes`` launched by torchrun."""
    if processes == 1:
        assert main([*args, "--out", str(out)]) == 0
    else:
        _launch(args, out, processes)
    if weights is None:
        return None
    if weights == "all":  # every safetensors file of the run (adapters, critic, value head), checkpoints aside
        return {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors"))
                if "checkpoints" not in p.parts for k, v in load_file(str(p)).items()}
    return load_file(str(out / weights))


def _launch(args, out, processes, env=None, fails=False) -> subprocess.CompletedProcess:
    """``rlhfkit args --out out`` in ``processes`` launched by torchrun (``env``: the environment, os.environ's by
    default); asserts it succeeded, or failed with ``fails``."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # the free port may be taken between finding it and the launcher binding it: try another
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                  "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "rlhfkit.cli"]
        result = subprocess.run(launch + args + ["--out", str(out)], capture_output=True, text=True, env=env,
                                timeout=300)
        if not port_taken(result.stderr):
            break
    assert (result.returncode != 0) == fails, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("command, data, extra", [
    ("sft", "sft.jsonl", ["--eval_fraction", "0"]),  # a mean over completion tokens: the split must not reweight it
    # each process packs its share of each micro-batch into rows of its own
    ("sft", "sft.jsonl", ["--eval_fraction", "0", "--packing", "true", "--train.grad_accum", "2",
                          "--max_length", "64"]),
    # the reference: a second copy of the model, in each process; each process packs its share's sequences
    ("dpo", "preference.jsonl", ["--beta", "0.5", "--packing", "true", "--max_length", "64"]),
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
    # every logged metric is the whole batch's, not process 0's share (DPO's reward accuracy and margins)
    first = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(first, logs):
        for key in a:
            if key.startswith("train/") and "seconds" not in key and "per_s" not in key:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_kto_with_two_processes_equals_one(tiny_model_dir, task_dir, tmp_path):
    """KTO's reference point z is the KL estimate of the whole step's batch, summed over the processes' shares.
    A reference unlike the policy keeps z > 0 (a z of 0 is clamped away and would hide a per-process z)."""
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.load import load_tokenizer

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    reference.save_pretrained(tmp_path / "ref")
    load_tokenizer(tiny_model_dir("llama")).save_pretrained(tmp_path / "ref")
    args = ["kto", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "unpaired.jsonl"), "--beta", "0.5",
            "--ref_model", str(tmp_path / "ref"), "--train.max_steps", "3", "--train.batch_size", "8",
            "--train.log_every", "1", "--train.tensorboard", "false", "--optim.lr", "3e-3"]
    one, two = _train(args, tmp_path / "one", 1), _train(args, tmp_path / "two", 2)
    logs = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/kl"] > 0.1 for r in logs if "train/kl" in r)
    for name, value in one.items():
        diff = (two[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert diff <= 1e-4, (name, diff.item())  # float noise through Adam; a z per process gave 2.7e-3


def _assert_close(one: dict, two: dict) -> None:
    assert one and one.keys() == two.keys()
    for name, value in one.items():
        diff = (two[name] - value).norm() / value.norm().clamp(min=1e-12)
        assert diff <= 1e-5, (name, diff.item())


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, task_dir, tmp_path_factory):
    # trained enough that its scores spread: scores are standardised and PPO's advantages whitened, so near-equal
    # scores (at lr 1e-5 two steps hardly move it) would divide float noise by a tiny std, and 2 vs 1 process
    # would compare noise (1e-4 apart in the critic seen), not the method (4e-6 apart with this one)
    out = tmp_path_factory.mktemp("rm")
    _train(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
            "--train.max_steps", "2", "--train.batch_size", "8", "--optim.lr", "1e-3", "--train.tensorboard", "false"],
           out, 1)
    return out


@pytest.mark.parametrize("updates", [
    ["--mini_batch_size", "4", "--ppo_epochs", "2"],
    ["--mini_batch_size", "8", "--ppo_epochs", "1"],  # one update: values from the learn pass, advantages whitened
])                                                    # over both processes' shares
def test_ppo_with_two_processes_equals_one(tiny_model_dir, task_dir, reward_dir, tmp_path, updates):
    # each process samples half of every rollout batch (per-prompt seeds), the buffer is gathered, and each
    # mini-batch is split over the processes: the adapters, critic and value head end as in one process
    args = ["ppo", "--model", tiny_model_dir("llama"), "--reward_model", str(reward_dir),
            "--prompts", str(task_dir / "prompts_train.jsonl"), "--train.max_steps", "3", "--rollout_batch_size", "8",
            *updates, "--optim.lr", "1e-2", "--generation.max_new_tokens", "8", "--train.tensorboard", "false"]
    one = _train(args, tmp_path / "one", 1, weights="all")
    two = _train(args, tmp_path / "two", 2, weights="all")
    _assert_close(one, two)
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # the actor really trained
    logs = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == len(first) == 3
    assert logs[0]["rollout/kl"] == pytest.approx(first[0]["rollout/kl"], abs=1e-5)  # metrics over both halves
    # and the learn pass's: every process's token means weighted by its share, not the logging rank's shard
    learned = ["loss/policy", "loss/value", "grad_norm/actor", "policy/clip_frac", "policy/approx_kl",
               "policy/ratio_mean", "value/value_clip_frac", "rollout/advantage_mean"]
    for step in range(3):
        for key in learned:
            if "clip_frac" in key and step:  # after an update a token near the clip edge may fall either side
                continue
            assert logs[step][key] == pytest.approx(first[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_rollout_metrics_over_unequal_shares_are_the_whole_batch_s(tiny_model_dir, task_dir, reward_dir, tmp_path):
    # 7 prompts over 2 processes: shares of 4 and 3 rows. The logged means were plain means of the two shares'
    # means; each is now weighted by its rows (the entropy by its tokens), as one process computes them
    args = ["ppo", "--model", tiny_model_dir("llama"), "--reward_model", str(reward_dir),
            "--prompts", str(task_dir / "prompts_train.jsonl"), "--train.max_steps", "1", "--rollout_batch_size", "7",
            "--mini_batch_size", "7", "--ppo_epochs", "1", "--beta", "0.1", "--critic_in_learn", "false",
            "--generation.max_new_tokens", "8", "--train.tensorboard", "false"]
    _train(args, tmp_path / "one", 1, weights="all")
    _train(args, tmp_path / "two", 2, weights="all")
    one, two = (json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0]) for run in ("one", "two"))
    for key in ("rollout/score", "rollout/response_length", "rollout/eos_share", "rollout/entropy", "rollout/kl"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_grpo_with_two_processes_equals_one(tiny_model_dir, tmp_path, monkeypatch):
    from rlhfkit.data.tasks import arithmetic

    arithmetic.write(tmp_path / "data")
    # a reward an untrained model already earns unevenly (the task's own give it zeros: nothing would train)
    (tmp_path / "length_reward.py").write_text(
        "def length(prompts, completions, **columns):\n    return [len(c) / 20 for c in completions]\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))  # the 1-process run's, in this process
    args = ["grpo", "--model", tiny_model_dir("llama"), "--prompts", str(tmp_path / "data" / "prompts_train.jsonl"),
            "--rewards", "length_reward:length", "--train.max_steps", "3", "--prompts_per_step", "4",
            "--group_size", "4", "--mini_batch_size", "8", "--optim.lr", "1e-2", "--generation.max_new_tokens", "8",
            "--train.tensorboard", "false", "--log_samples", "12"]
    weights = _train(args, tmp_path / "one", 1, weights="all")
    _assert_close(weights, _train(args, tmp_path / "two", 2, weights="all"))
    # micro-batches of 3 rows: each process's 4 rows of a mini-batch in two forwards and backwards
    _assert_close(weights, _train([*args, "--micro_batch_size", "3"], tmp_path / "micro", 2, weights="all"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # the policy really trained
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert all(r["grad_norm"] > 0 for r in one)
    # the learn pass's metrics over both processes' rows, not the logging rank's shard
    for key in ("loss/policy", "grad_norm", "policy/approx_kl", "rollout/entropy"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
    assert two[0]["policy/clip_frac"] == pytest.approx(one[0]["policy/clip_frac"], abs=1e-6)
    # the logged samples: the step's first 12, 8 from process 0 and 4 from process 1, as one process logs them
    one, two = ([json.loads(line) for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert len(one) == 3 * 12 and [r["prompt"] for r in two] == [r["prompt"] for r in one]
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    assert [r["reward"] for r in two] == pytest.approx([r["reward"] for r in one], abs=1e-6)


def test_a_checkpoint_resumes_on_another_number_of_processes(tiny_model_dir, task_dir, tmp_path):
    args = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction", "0",
            "--train.batch_size", "8", "--train.tensorboard", "false", "--optim.lr", "3e-3", "--train.save_every", "2"]
    whole = _train(args + ["--train.max_steps", "4"], tmp_path / "whole", 1)
    # the 1-process run's step-2 checkpoint, resumed by 2 processes to the end of the same run
    resumed = _train(args + ["--train.max_steps", "4", "--train.resume", str(tmp_path / "whole" / "checkpoints" /
                                                                               "step-2")], tmp_path / "split", 2)
    _assert_close(whole, resumed)


def test_two_processes_with_dropout_resume_to_the_weights_of_the_run_unstopped(tiny_model_dir, task_dir, tmp_path):
    # each process draws dropout masks as large as its own share's padded rows, so their generators part after a
    # step: every process's RNG is saved, and each resumes its own (process 1 had resumed process 0's)
    args = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction", "0",
            "--train.batch_size", "8", "--train.tensorboard", "false", "--optim.lr", "3e-3", "--train.save_every", "2",
            "--train.max_steps", "4", "--lora.enabled", "true", "--lora.dropout", "0.3"]
    adapter = "adapter_model.safetensors"
    whole = _train(args, tmp_path / "whole", 2, weights=adapter)
    step2 = tmp_path / "whole" / "checkpoints" / "step-2"
    saved = torch.load(step2 / "trainer_state.pt", weights_only=True)["rng_by_rank"]
    assert len(saved) == 2 and not torch.equal(saved[0]["torch"], saved[1]["torch"])  # they did part
    resumed = _train([*args, "--train.resume", str(step2)], tmp_path / "resumed", 2, weights=adapter)
    assert whole.keys() == resumed.keys()
    for name, value in whole.items():
        assert torch.equal(resumed[name], value), name


def test_a_step_batch_smaller_than_the_processes_trains_and_logs_the_whole_batch(tiny_model_dir, task_dir,
                                                                                  tmp_path):
    # a batch of 1 over 2 processes: one has no rows. Its metrics had no keys, so the processes' metric
    # collectives fell out of step and the run hung
    (tmp_path / "pairs.jsonl").write_text("".join((task_dir / "preference.jsonl").read_text().splitlines(True)[:8]))
    args = ["dpo", "--model", tiny_model_dir("llama"), "--data", str(tmp_path / "pairs.jsonl"), "--train.batch_size",
            "1", "--train.max_steps", "2", "--train.log_every", "1", "--train.tensorboard", "false"]
    logs = {}
    for processes in (1, 2):
        _train(args, tmp_path / str(processes), processes, weights=None)
        logs[processes] = [json.loads(line) for line in (tmp_path / str(processes) / "metrics.jsonl").read_text()
                           .splitlines()]
    for a, b in zip(logs[1], logs[2]):
        for key in ("train/loss", "train/rewards/accuracy", "train/rewards/margin"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
