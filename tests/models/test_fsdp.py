"""Sharded data parallelism (FSDP2): two CPU processes (gloo) train to the weights of one, every
example accelerate config launches, checkpoints cross process counts, and what is not supported
says so."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import fsdp
from rlhfkit.cli import COMMANDS, main
from rlhfkit.config import ConfigError, OptimConfig, TrainConfig, parse_args
from rlhfkit.trainers.loop import run, start_run

ACCELERATE = Path(__file__).parents[2] / "examples" / "accelerate"
TRAIN = ["--train.batch_size", "8", "--train.log_every", "1", "--train.tensorboard", "false", "--optim.lr", "3e-3"]
FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY",
            "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING", "ACCELERATE_USE_DEEPSPEED",
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")


# --------------------------------------------------------------------------- the mode and the clear errors


@pytest.mark.parametrize("env, expected", [
    ({}, "off"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}, "full_shard"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, "shard_grad_op"),
    # FSDP1 configs: the strategy in fsdp_sharding_strategy (older) or fsdp_reshard_after_forward (newer)
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"},
     "shard_grad_op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_RESHARD_AFTER_FORWARD": "shard_grad_op"},
     "shard_grad_op"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}, "full_shard"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, "off"),
])
def test_the_accelerate_fsdp_config_chooses_the_mode(launcher_env, env, expected):
    launcher_env(**env)
    assert fsdp.mode("auto") == expected
    assert fsdp.mode("off") == "off"  # train.fsdp, when set, wins over the launcher
    assert fsdp.mode("shard_grad_op") == "shard_grad_op"


@pytest.mark.parametrize("env, message", [
    ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD .* is not supported; use FULL_SHARD"),
    ({"FSDP_SHARDING_STRATEGY": "FULL_SHARDING"}, "unknown FSDP sharding strategy 'FULL_SHARDING'"),
    ({"FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true"),
    ({"FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "fsdp_activation_checkpointing: true"),
])
def test_unsupported_fsdp_options_are_refused_naming_the_fix(launcher_env, env, message):
    launcher_env(ACCELERATE_USE_FSDP="true", **env)
    with pytest.raises(ConfigError, match=message):
        fsdp.mode("auto")


@pytest.mark.parametrize("engine, option, launch, printed", [
    ("fsdp", "full_shard", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, r"FSDP sharding \(full_shard"),
    ("deepspeed", "zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
     r"DeepSpeed \(zero3"),
])
@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_rollout_trainers_refuse_sharding_saying_what_is_supported(launcher_env, command, tmp_path, engine, option,
                                                                   launch, printed):
    make_cls = COMMANDS[command][0]
    cls = make_cls if isinstance(make_cls, type) else make_cls()
    cfg = parse_args(cls, [f"--train.{engine}", option, "--train.out", str(tmp_path)])
    with pytest.raises(ConfigError, match=f"supported for sft, rm, dpo, orpo, simpo and kto, not .*train.{engine} off"):
        start_run(cfg)
    launcher_env(**launch)  # the same from an accelerate FSDP or DeepSpeed config
    with pytest.raises(ConfigError, match=printed):
        start_run(parse_args(cls, ["--train.out", str(tmp_path)]))


def test_sharding_needs_equal_micro_batches_on_every_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig(batch_size=6, grad_accum=2, fsdp="full_shard", max_steps=1)
    with pytest.raises(ValueError, match=r"batch_size 6 must be divisible by processes \(2\) x train.grad_accum"):
        run(model=torch.nn.Linear(2, 2), loss_fn=None, n_examples=100, cfg=cfg, optim=OptimConfig(), logger=None)


# --------------------------------------------------------------------------- two processes


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher: str, args: list[str], out: Path) -> str:
    """Run the rlhfkit command ``args`` in 2 processes: ``launcher`` is 'torchrun' or an accelerate
    config in examples/accelerate. Returns its stdout."""
    from test_distributed import port_taken

    env = {k: v for k, v in os.environ.items() if k not in FSDP_ENV}
    for _ in range(3):  # the free port may be taken between finding it and the launcher binding it: try another
        if launcher == "torchrun":
            start = ["torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                     "--master_port", _free_port()]
        else:
            start = ["accelerate.commands.launch", "--config_file", str(ACCELERATE / launcher), "--num_processes",
                     "2", "--main_process_port", _free_port()]
        result = subprocess.run([sys.executable, "-m", *start, "-m", "rlhfkit.cli", *args, "--out", str(out)],
                                capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
        if not port_taken(result.stderr):
            break
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _one_process(args: list[str], out: Path) -> None:
    assert main([*args, "--out", str(out)]) == 0


def _assert_same_weights(one: Path, two: Path, tol: float = 1e-5) -> dict[str, torch.Tensor]:
    """The model (or adapter) saved in ``one`` and in ``two`` agree within ``tol`` (relative norm of the
    difference, per tensor); returns ``one``'s tensors."""
    first, second = ({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
                     for out in (one, two))
    assert first and first.keys() == second.keys()
    worst = max((((second[k] - v).norm() / v.norm().clamp(min=1e-12)).item(), k) for k, v in first.items())
    assert worst[0] <= tol, worst
    return first


@pytest.fixture(scope="module")
def sft_args(tiny_model_dir, task_dir):
    return ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction", "0",
            *TRAIN, "--train.save_every", "2"]


@pytest.fixture(scope="module")
def sft_one(sft_args, tmp_path_factory):
    """4 steps in one process (checkpoints at steps 2 and 4); all inside the 10-step warm-up, so a run
    stopped earlier has the same learning rates."""
    out = tmp_path_factory.mktemp("sft-one")
    _one_process([*sft_args, "--train.max_steps", "4"], out)
    return out


def test_the_ddp_config_trains_as_one_process(sft_args, sft_one, tmp_path):
    stdout = _launch("ddp.yaml", [*sft_args, "--train.max_steps", "4"], tmp_path)
    assert "fsdp" not in stdout  # replicas: nothing sharded
    _assert_same_weights(sft_one, tmp_path)


def test_a_checkpoint_moves_between_one_process_and_the_fsdp_config(sft_args, sft_one, tmp_path):
    # 1 process → steps 1-2 (sft_one's checkpoint), 2 sharded processes → step 3, 1 process → step 4
    stdout = _launch("fsdp.yaml", [*sft_args, "--train.max_steps", "3", "--train.resume",
                                   str(sft_one / "checkpoints" / "step-2")], tmp_path)
    assert "fsdp full_shard over 2 processes (the trained model): units = 1 decoder layers + the root" in stdout
    step3 = tmp_path / "checkpoints" / "step-3"
    assert (step3 / "model.safetensors").is_file() and not list(step3.glob("*shard*"))  # full tensors, one file
    _one_process([*sft_args, "--train.max_steps", "4", "--train.resume", str(step3)], tmp_path)
    _assert_same_weights(sft_one, tmp_path)


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_dpo_with_the_fsdp_grad_op_config_equals_one_process(tiny_model_dir, task_dir, tmp_path, reference):
    # the reference is a second, frozen model, sharded too (gathered layer by layer for its forwards only);
    # precomputed from another model directory, it is loaded, sharded, used once before training and dropped
    ref = ["--ref_model", tiny_model_dir("llama")] if reference == "precomputed" else []
    args = ["dpo", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--beta", "0.5",
            "--reference", reference, *ref, *TRAIN, "--train.max_steps", "4"]
    _one_process(args, tmp_path / "one")
    printed = _launch("fsdp_grad_op.yaml", args, tmp_path / "two")
    assert "fsdp shard_grad_op over 2 processes (the trained model)" in printed
    assert "fsdp full_shard over 2 processes (the frozen reference)" in printed
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


def test_lora_dpo_sharded_by_train_fsdp_equals_one_process(tiny_model_dir, task_dir, tmp_path):
    # frozen base and trainable adapters in the same units; the head (tied to the embeddings) adapted too;
    # the reference is the sharded policy with its adapters switched off
    args = ["dpo", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--beta", "0.5",
            "--lora.enabled", "true", "--lora.target_modules", "all-linear+head", "--reference", "adapter",
            *TRAIN, "--train.max_steps", "4"]
    _one_process(args, tmp_path / "one")
    assert "fsdp full_shard" in _launch("torchrun", [*args, "--train.fsdp", "full_shard"], tmp_path / "two")
    one = _assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # the adapters really trained
