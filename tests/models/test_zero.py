"""DeepSpeed ZeRO: two CPU processes (gloo) train to the weights of one under stages 2 and 3, the
example accelerate configs launch, checkpoints cross between DeepSpeed and a 1-process run, and what
is not supported says so. The launches skip without DeepSpeed (``pip install deepspeed``)."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
from test_fsdp import TRAIN, _assert_same_weights, _launch, _one_process, _ppo_args

from rlhfkit import zero
from rlhfkit.config import ConfigError, OptimConfig, TrainConfig
from rlhfkit.trainers.loop import run

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install deepspeed)")


# --------------------------------------------------------------------------- the mode and the clear errors


def test_the_accelerate_deepspeed_config_chooses_the_stage(launcher_env, tmp_path):
    assert zero.mode("auto") == "off"
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    assert zero.mode("auto") == "zero2"
    assert zero.mode("off") == "off" and zero.mode("zero3") == "zero3"  # train.deepspeed, when set, wins
    # a deepspeed_config_file: its zero_optimization section, stage and the rest, is what counts
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "offload_param": {"device": "none"},
        "reduce_bucket_size": "auto"}}))
    launcher_env(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(file))
    assert zero.mode("auto") == "zero3"
    assert zero.settings() == {"stage": 3, "stage3_param_persistence_threshold": 0}
    launcher_env(ACCELERATE_DEEPSPEED_CONFIG_FILE="none", ACCELERATE_DEEPSPEED_ZERO_STAGE="0")
    assert zero.mode("auto") == "off"


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, r"offloads \(offload_optimizer to cpu\).*"
                                                               r"offload_optimizer_device: none"),
    ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "offload_param_device: none"),
    ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "4"}, "ZeRO stage 4 in the DeepSpeed config: choose 1, 2 or 3"),
])
def test_unsupported_deepspeed_options_are_refused_naming_the_fix(launcher_env, env, message):
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", **env)
    with pytest.raises(ConfigError, match=message):
        zero.mode("auto")
    with pytest.raises(ConfigError, match="train.deepspeed 'zero4': choose auto, off, zero1, zero2, zero3"):
        zero.mode("zero4")


def test_an_unreadable_deepspeed_config_file_names_itself(launcher_env, tmp_path):
    file = tmp_path / "ds.json"
    file.write_text("{zero_optimization: ")
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(file))
    with pytest.raises(ConfigError, match=f"{file} .*cannot be read as JSON"):
        zero.mode("auto")


def test_fsdp_and_deepspeed_together_are_refused(launcher_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = TrainConfig(batch_size=8, fsdp="full_shard", deepspeed="zero3", max_steps=1)
    with pytest.raises(ConfigError, match=r"both FSDP \(full_shard\) and DeepSpeed \(ZeRO-3\) are asked for"):
        run(model=torch.nn.Linear(2, 2), loss_fn=None, n_examples=100, cfg=cfg, optim=OptimConfig(), logger=None)
    cfg = TrainConfig(batch_size=6, grad_accum=2, deepspeed="zero2", max_steps=1)
    with pytest.raises(ValueError, match=r"DeepSpeed ZeRO-2 .* train.batch_size 6 must be divisible by processes"):
        run(model=torch.nn.Linear(2, 2), loss_fn=None, n_examples=100, cfg=cfg, optim=OptimConfig(), logger=None)


def test_ppo_and_the_online_methods_under_deepspeed_are_full_models(launcher_env, monkeypatch):
    assert zero.rollout_stage("zero3", "off", False, "") == 0  # one process: nothing to partition
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert zero.rollout_stage("zero2", "off", True, "") == 2 and zero.rollout_stage("off", "off", False, "") == 0
    launcher_env(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="1")  # from a launch
    assert zero.rollout_stage("auto", "off", True, "") == 1
    with pytest.raises(ConfigError, match="ZeRO-1 partitions full trained models only. Use replicas"):
        zero.rollout_stage("auto", "off", False, "Use replicas")
    assert zero.rollout_stage("zero3", "off", True, "") == 3
    with pytest.raises(ConfigError, match="ZeRO-3 partitions full trained models only. Use replicas"):
        zero.rollout_stage("zero3", "off", False, "Use replicas")
    with pytest.raises(ConfigError, match=r"both FSDP \(full_shard\) and DeepSpeed \(ZeRO-2\)"):
        zero.rollout_stage("zero2", "full_shard", True, "")


def test_separate_roles_hand_their_autocast_to_each_engine(monkeypatch):
    # DeepSpeed's forward turns off an autocast entered around it: the engines enter the roles' own inside
    from rlhfkit.models.roles import SeparateRoles

    made = []
    monkeypatch.setattr(zero, "Engine", lambda *args, **kwargs: made.append((args, kwargs)))
    roles = SeparateRoles.__new__(SeparateRoles)
    roles.actor, roles.critic, roles.amp = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), lambda: None
    roles.partition(2, "actor AdamW", "critic AdamW", 4, 0.5)
    assert [(args[0], args[1:], kwargs) for args, kwargs in made] == [
        (roles.actor, ("actor AdamW", 2, 1, 4, 0.5), {"amp": roles.amp, "what": "the actor"}),
        (roles.critic, ("critic AdamW", 2, 1, 4, 0.5), {"amp": roles.amp, "what": "the critic"})]


# --------------------------------------------------------------------------- two processes


def _zero3_config(tmp_path) -> str:
    """An accelerate config naming a DeepSpeed JSON file: ZeRO-3 with every weight partitioned (by default
    DeepSpeed keeps weights under 100k elements, every weight of a tiny model, whole in each process)."""
    ds = tmp_path / "ds_zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    config = tmp_path / "zero3_file.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\n"
                      "num_processes: 2\nuse_cpu: false\ndeepspeed_config:\n"
                      f"  deepspeed_config_file: {ds}\n  zero3_init_flag: false\n")
    return str(config)


@needs_deepspeed
def test_sft_with_the_zero2_config_equals_one_process(tiny_model_dir, task_dir, tmp_path):
    # evaluated by process 0 alone: under ZeRO-2 every process holds the whole weights
    args = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction",
            "0.05", "--train.eval_every", "2", *TRAIN, "--train.grad_accum", "2", "--train.max_steps", "4"]
    _one_process(args, tmp_path / "one")
    # the layers checkpointed under ZeRO-2 (their recompute in the backward feeds DeepSpeed's gradient buckets)
    # against one process without: checkpointing alone changes no weight (test_checkpointing), and ZeRO-2
    # without it runs in the PPO, GRPO and NaN tests below
    printed = _launch("zero2.yaml", [*args, "--train.gradient_checkpointing", "true"], tmp_path / "two")
    assert "deepspeed ZeRO-2 over 2 processes (the trained model): AdamW state and gradients partitioned" in printed
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


@needs_deepspeed
def test_a_checkpoint_moves_between_one_process_and_zero3(tiny_model_dir, task_dir, tmp_path):
    # 1 process → steps 1-2, 2 processes under ZeRO-3 → steps 3-4 (a checkpoint at each; layers checkpointed),
    # 1 process from step 3 → step 4; the held-out loss is evaluated by both ZeRO-3 processes (each forward
    # gathers weights from both)
    args = ["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction", "0.05",
            *TRAIN, "--train.eval_every", "1", "--train.max_steps", "4"]
    _one_process([*args, "--train.save_every", "2"], tmp_path / "one")
    printed = _launch(_zero3_config(tmp_path), [*args, "--train.save_every", "1", "--train.gradient_checkpointing",
                                                "true", "--train.resume",
                                                str(tmp_path / "one" / "checkpoints" / "step-2")], tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    held = printed.split("holds ")[1].split(" weights")[0]  # "17,696 of 35,392"
    mine, total = (int(n.replace(",", "")) for n in held.split(" of "))
    assert 0 < mine < total and abs(mine - total / 2) <= total * 0.01  # every weight split in half
    step3 = tmp_path / "two" / "checkpoints" / "step-3"
    state = torch.load(step3 / "trainer_state.pt", weights_only=False)
    one2 = torch.load(tmp_path / "one" / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=False)
    saved, before = state["optimizers"]["model"]["optimizer"], one2["optimizers"]["model"]["optimizer"]
    assert saved["state"].keys() == before["state"].keys()  # AdamW's state as a 1-process run holds it
    assert all(saved["state"][i]["exp_avg"].shape == before["state"][i]["exp_avg"].shape for i in before["state"])
    assert float(saved["state"][0]["step"]) == 3.0
    _one_process([*args, "--train.save_every", "2", "--train.resume", str(step3)], tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    evals = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    at3 = [r["eval/loss"] for r in evals if r.get("step") == 3 and "eval/loss" in r]
    assert at3 and abs(at3[0] - [r["eval/loss"] for r in ones if r.get("step") == 3 and "eval/loss" in r][0]) < 1e-5


@needs_deepspeed
def test_zero3_resumes_tensors_whose_size_does_not_divide_by_the_processes(task_dir, tmp_path):
    # a GPT-2 of hidden size 33: its norms and biases (33, 99 elements) split 17 + 16, the last partition padded
    from rlhfkit.models.tiny import make_tiny_model

    model = make_tiny_model("gpt2", tmp_path / "gpt2", hidden_size=33, num_layers=1, num_heads=3)
    args = ["sft", "--model", str(model), "--data", str(task_dir / "sft.jsonl"), "--eval_fraction", "0", *TRAIN,
            "--train.save_every", "1", "--train.keep_checkpoints", "3"]
    _one_process([*args, "--train.max_steps", "4"], tmp_path / "one")
    _launch("torchrun", [*args, "--train.max_steps", "4", "--train.deepspeed", "zero3", "--train.resume",
                         str(tmp_path / "one" / "checkpoints" / "step-2")], tmp_path / "two")
    # AdamW's moments after step 3, read back out of the partitions, are the 1-process ones
    states = [torch.load(tmp_path / run / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=False)
              ["optimizers"]["model"]["optimizer"]["state"] for run in ("one", "two")]
    for i, moments in states[0].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert ((states[1][i][key] - moments[key]).norm() / moments[key].norm()).item() < 1e-4, (i, key)
    _one_process([*args, "--train.max_steps", "4", "--train.resume",
                  str(tmp_path / "two" / "checkpoints" / "step-3")], tmp_path / "two")
    # this model amplifies float noise (Adam on c_attn.bias's near-zero gradients): replicas differ from one
    # process by 1.2e-4 there; a misplaced slice of AdamW's state would differ by far more
    _assert_same_weights(tmp_path / "one", tmp_path / "two", tol=1e-3)


COUNTING_CLI = """
import os, sys
import torch
from rlhfkit.cli import main
from rlhfkit.models import load
from rlhfkit.trainers import loop

calls = {"forward": 0, "mlp": 0}  # with gradients on: input embeddings (once a forward), first layer's MLP


def checkpointed(model):
    load.checkpoint_activations(model)
    layer = next(m for n, m in model.named_modules() if n.endswith("layers.0"))
    for module, key in ((model.get_input_embeddings(), "forward"), (layer.mlp, "mlp")):
        module.register_forward_pre_hook(lambda *_, key=key: calls.update({key: calls[key] + torch.is_grad_enabled()}))


loop.checkpoint_activations = checkpointed
code = main(sys.argv[1:])
print(f"rank {os.environ['RANK']} calls {calls['forward']} {calls['mlp']}")
sys.exit(code)
"""


@needs_deepspeed
def test_lora_dpo_under_zero3_with_checkpointed_layers_equals_one_process(tiny_model_dir, task_dir, tmp_path,
                                                                          monkeypatch):
    # frozen base partitioned with the adapters, the output head's too; the reference is the policy with its
    # adapters switched off, inside the same engine forward as the loss (under inference_mode DeepSpeed 0.19 left
    # the weights it gathered for that pass unreadable to its backward: 'NoneType' object has no attribute
    # 'next_functions'); the ZeRO-3 run checkpoints its layers, which run again in the backward
    args = ["dpo", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--beta", "0.5",
            "--lora.enabled", "true", "--lora.target_modules", "all-linear+head", "--reference", "adapter", *TRAIN,
            "--train.grad_accum", "2", "--train.max_steps", "4"]
    _one_process(args, tmp_path / "one")
    (tmp_path / "zero3_counting_cli.py").write_text(COUNTING_CLI)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    printed = _launch("torchrun", [*args, "--train.deepspeed", "zero3", "--train.gradient_checkpointing", "true"],
                      tmp_path / "two", module="zero3_counting_cli")
    assert "deepspeed ZeRO-3 over 2 processes" in printed
    counts = [tuple(map(int, found)) for found in re.findall(r"rank \d calls (\d+) (\d+)", printed)]
    assert len(counts) == 2 and all(forward > 0 and mlp == 2 * forward for forward, mlp in counts), counts
    one = _assert_same_weights(tmp_path / "one", tmp_path / "two")
    assert any(v.abs().max() > 0 for k, v in one.items() if "lora_B" in k)  # the adapters really trained
    assert any("lm_head" in k and "lora_B" in k for k in one)


PADDING_CLI = """
import os, sys
from rlhfkit import distributed
from rlhfkit.cli import main

padded = []  # the spare chunks each call of the head's chunking added in this process
real = distributed.all_max


def counted(value, device):
    most = real(value, device)
    padded.append(max(most, 1) - value)
    return most


distributed.all_max = counted
code = main(sys.argv[1:])
print(f"rank {os.environ['RANK']} chunked {len(padded)} padded {sum(p > 0 for p in padded)}")
sys.exit(code)
"""


def _launch_counting_padding(tmp_path, monkeypatch, args) -> str:
    """``args`` under ZeRO-3 (every weight partitioned) in 2 processes; asserts some call of the chunked head padded
    its chunks (so the padding, not equal counts by luck, kept the processes in step). Returns the output."""
    (tmp_path / "zero3_padding_cli.py").write_text(PADDING_CLI)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    printed = _launch(_zero3_config(tmp_path), args, tmp_path / "two", module="zero3_padding_cli")
    counts = [tuple(map(int, found)) for found in re.findall(r"rank \d chunked (\d+) padded (\d+)", printed)]
    assert len(counts) == 2 and counts[0][0] == counts[1][0] > 0 and sum(p for _, p in counts) > 0, counts
    return printed


@needs_deepspeed
def test_a_chunked_lora_head_under_zero3_equals_one_process(tiny_model_dir, task_dir, tmp_path, monkeypatch):
    # each call of the head gathers its partitioned weights from both processes: each process pads its chunks
    # (its own completion positions) to the most any has, with empty ones, in the forward and the backward's
    # recompute (unpadded, the processes gathered a different number of times and hung); a LoRA head, the
    # reference the adapters off (a pass without gradients)
    args = ["dpo", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), "--beta", "0.5",
            "--lora.enabled", "true", "--lora.target_modules", "all-linear+head", "--reference", "adapter", *TRAIN,
            "--train.grad_accum", "2", "--train.max_steps", "4", "--logits_chunk", "5"]
    _one_process(args, tmp_path / "one")
    assert "deepspeed ZeRO-3" in _launch_counting_padding(tmp_path, monkeypatch, args)
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


@needs_deepspeed
def test_rows_sharing_a_prompt_in_one_process_only_run_under_zero3(tiny_model_dir, tmp_path, monkeypatch):
    # four rows of one prompt and four of distinct ones, a step's 8 split over two processes: where one process's
    # rows share their prompt and the other's do not, the first ran the prompt once (two forwards of the model) and
    # the second whole (one): under ZeRO-3 each forward gathers weights from both, and they hung (found by hand);
    # all share or none does, as under FSDP. The head chunked too: the processes' completion positions differ
    rows = [{"prompt": "User: Describe the cat.\nAssistant:", "completion": f" The cat is calm, number {i}."}
            for i in range(4)] + [{"prompt": f"User: Tell me about thing {i}.\nAssistant:", "completion": " Fine."}
                                  for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["sft", "--model", tiny_model_dir("llama"), "--data", str(data), "--eval_fraction", "0", *TRAIN,
            "--train.max_steps", "6", "--logits_chunk", "5"]
    _one_process(args, tmp_path / "one")
    _launch_counting_padding(tmp_path, monkeypatch, args)
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


@needs_deepspeed
def test_kto_with_a_reference_model_under_the_zero3_config_equals_one_process(tiny_model_dir, task_dir, tmp_path):
    # KTO's reference point z: one pass over the step's batch before its micro-batches, summed over processes;
    # the reference is a second, frozen model, whole in each process
    args = ["kto", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "unpaired.jsonl"),
            "--reference", "model", *TRAIN, "--train.max_steps", "3"]
    _one_process(args, tmp_path / "one")
    assert "deepspeed ZeRO-3" in _launch("zero3.yaml", args, tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")


NAN_STEP = """
import json, sys
import torch
from rlhfkit import distributed
from rlhfkit.config import OptimConfig, TrainConfig
from rlhfkit.trainers.loop import Logger, run

out, deepspeed, autocast = sys.argv[1], sys.argv[2], sys.argv[3] == "bf16"
distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
gen = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
calls, under_autocast = [0], []


def loss_fn(indices):  # step 3's loss is NaN in process 0 only, its gradients finite
    calls[0] += 1
    under_autocast.append(torch.is_autocast_enabled("cpu"))
    loss = ((model(x[indices]) - y[indices]) ** 2).mean()
    if calls[0] == 3 and distributed.rank() == 0:
        loss = loss + torch.tensor(float("nan"))
    return loss.float(), len(indices), {}


cfg = TrainConfig(out=out, batch_size=8, max_steps=5, on_nan="skip", tensorboard=False, deepspeed=deepspeed,
                  log_every=1)
amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else None
run(model=model, loss_fn=loss_fn, n_examples=16, cfg=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=0),
    logger=Logger(out, tensorboard=False), **({"amp": amp} if amp else {}))
if distributed.is_main():
    torch.save(model.state_dict(), out + "/weights.pt")
    json.dump(under_autocast, open(out + "/autocast.json", "w"))
distributed.teardown()
"""


def _script_runs(script: Path, one: list[str], two: list[str]) -> None:
    """``script`` run in 1 process with arguments ``one``, then in 2 (torchrun) with ``two``."""
    import os
    import subprocess
    import sys

    from test_distributed import _free_port, port_taken

    subprocess.run([sys.executable, str(script), *one], check=True, capture_output=True)
    for _ in range(3):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                  "--master_port", str(_free_port())]
        done = subprocess.run([*launch, str(script), *two], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if not port_taken(done.stderr):
            break
    assert done.returncode == 0, done.stderr[-3000:]


def _nan_step_runs(tmp_path, stage: str, autocast: str = "fp32") -> None:
    """NAN_STEP in 1 process (no DeepSpeed) into tmp_path/one, in 2 under ``stage`` into tmp_path/two."""
    script = tmp_path / "nan_step.py"
    script.write_text(NAN_STEP)
    _script_runs(script, [str(tmp_path / "one"), "off", autocast], [str(tmp_path / "two"), stage, autocast])


@needs_deepspeed
@pytest.mark.parametrize("stage", ["zero2", "zero3"])  # stage 1 takes stage 2's optimiser class and its path
def test_a_nan_loss_in_one_process_skips_that_step_everywhere(tmp_path, stage):
    # the NaN is in the loss's value alone (its gradients are finite): the last backward is made non-finite in
    # every process, so DeepSpeed applies nothing; the schedule and AdamW's step count stay put, as in one
    # process skipping the step: the weights of the two runs agree, and the skip is counted
    _nan_step_runs(tmp_path, stage)
    one, two = (torch.load(tmp_path / run / "weights.pt") for run in ("one", "two"))
    for name, value in one.items():
        assert ((two[name] - value).norm() / value.norm()).item() <= 1e-5, name
    logs = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("one", "two")}
    assert [(r["step"], r["train/skipped_steps"]) for r in logs["two"]] == [(1, 0), (2, 0), (4, 1), (5, 1)]
    assert [r["step"] for r in logs["one"]] == [1, 2, 4, 5]  # the skipped step logs nothing of its own
    assert [r["train/lr"] for r in logs["two"]] == pytest.approx([r["train/lr"] for r in logs["one"]], rel=1e-12)


ENGINE_STEPS = """
import contextlib, sys, types
import torch
from rlhfkit import distributed, zero
from rlhfkit.config import OptimConfig
from rlhfkit.trainers.checkpoint import NonFinite
from rlhfkit.trainers.loop import build_optimizer
from rlhfkit.trainers.ppo import apply_update

out, stage = sys.argv[1], int(sys.argv[2])
distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
actor, critic = (torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)) for _ in "ac")
gen = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
optimizers = [build_optimizer(m.parameters(), OptimConfig(lr=1e-2, warmup_steps=3), 5) for m in (actor, critic)]
entered = []  # the forwards that ran inside the run's "autocast" (a stand-in that only records it)


@contextlib.contextmanager
def amp():
    entered.append(torch.is_grad_enabled())
    yield


if stage:
    for model, (optimizer, _) in zip((actor, critic), optimizers):
        zero.Engine(model, optimizer, stage, 1, 8 // distributed.world_size(), 1.0, amp=amp)
roles = types.SimpleNamespace(actor_parameters=lambda: list(actor.parameters()),
                              critic_parameters=lambda: list(critic.parameters()))
cfg = types.SimpleNamespace(vf_coef=0.5, optim=types.SimpleNamespace(max_grad_norm=1.0))
nonfinite, norms = NonFinite("skip", None), []
for step in range(5):  # PPO's learn: each process's share of each loss, zero.backward, then apply_update
    rows = distributed.shard(torch.arange(8 * (step % 2), 8 * (step % 2) + 8))
    losses = []
    for model, (optimizer, _) in zip((actor, critic), optimizers):
        loss = zero.run_as_forward(model, lambda: ((model(x[rows]) - y[rows]) ** 2).sum() / 8)
        if step == 2 and distributed.rank() == 0 and model is actor:
            loss = loss + torch.tensor(float("nan"))  # the actor's loss alone, in process 0 alone
        zero.backward(optimizer, loss)
        losses.append(loss)
    stats = apply_update(roles, losses[0], {}, losses[1], {}, cfg, *optimizers, nonfinite, step + 1, len(rows) / 8)
    norms.append(stats and (stats["grad_norm/actor"], stats["grad_norm/critic"]))
weights = {}
for name, model in (("actor", actor), ("critic", critic)):  # full_params gathers: every process calls it
    names = [n for n, _ in model.named_parameters()]
    weights[name] = zero.full_params(model, names) if stage else model.state_dict()
if distributed.is_main():
    torch.save({"weights": weights, "norms": norms, "lr": [sched.get_last_lr()[0] for _, sched in optimizers],
                "skipped": nonfinite.skipped, "amp": entered}, out)
distributed.teardown()
"""


@needs_deepspeed
@pytest.mark.parametrize("stage", ["2", "3"])  # stage 1 takes stage 2's optimiser class and its skip
def test_a_nan_loss_of_one_role_in_one_process_skips_both_ppo_updates_everywhere(tmp_path, monkeypatch, stage):
    # ppo.apply_update with an engine each for actor and critic: the actor's loss NaN in process 0 (its
    # gradients finite: only the value is NaN) skips the update of both roles in both processes, the critic's
    # too, whose gradients are finite everywhere (Engine.skip), and both schedules stay put, as one process
    # skipping it: the weights agree with one process's, and so do the logged norms and learning rates. ZeRO-3
    # partitions every weight, the 1-element biases too (their partitions padded): the NaN a skip writes into
    # the padding was never written over again, and every later update was skipped
    if stage == "3":
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    script = tmp_path / "engine_steps.py"
    script.write_text(ENGINE_STEPS)
    _script_runs(script, [str(tmp_path / "one.pt"), "0"], [str(tmp_path / "two.pt"), stage])
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["skipped"] == two["skipped"] == 1 and one["norms"][2] is None and two["norms"][2] is None
    assert two["amp"] == [True] * 10 and one["amp"] == []  # each engine forward entered the run's autocast inside
    flat = [[v for pair in run["norms"] if pair for v in pair] for run in (one, two)]  # actor's, critic's
    assert len(flat[0]) == 8 and flat[1] == pytest.approx(flat[0], rel=1e-5)
    assert two["lr"] == pytest.approx(one["lr"], rel=1e-12)  # both schedules skipped the same step
    for role in ("actor", "critic"):
        for name, value in one["weights"][role].items():
            assert ((two["weights"][role][name] - value).norm() / value.norm()).item() <= 1e-5, (role, name)


@needs_deepspeed
def test_the_loss_computes_under_the_run_s_autocast_inside_the_engine(tmp_path):
    # DeepSpeed turns off an autocast entered around its forward unless its config has a torch_autocast
    # section: the loop enters it inside (what a bf16 GPU run does, here on the CPU)
    _nan_step_runs(tmp_path, "zero2", autocast="bf16")
    for name in ("one", "two"):
        assert json.loads((tmp_path / name / "autocast.json").read_text()) == [True] * 5


@needs_deepspeed
def test_the_reward_model_under_zero3_equals_one_process(tiny_model_dir, task_dir, tmp_path):
    # the score head called apart from the body, inside the engine forward; the score statistics written
    # after training agree too
    args = ["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), *TRAIN,
            "--train.max_steps", "3"]
    _one_process(args, tmp_path / "one")
    assert "deepspeed ZeRO-3" in _launch("torchrun", [*args, "--train.deepspeed", "zero3"], tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    one, two = (json.loads((tmp_path / run / "score_normalization.json").read_text()) for run in ("one", "two"))
    assert two == pytest.approx(one, rel=1e-5)


# --------------------------------------------------------------------------- PPO's mode separate


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_separate_ppo_under_zero_equals_one_process_and_its_checkpoints_cross(tiny_model_dir, ppo_setup, tmp_path,
                                                                              stage):
    # an engine for the full actor and one for the critic (from the reward model), AdamW state and gradients
    # partitioned (ZeRO-3: every weight too, each rollout and process 0's held-out evaluation sampling with a
    # whole copy of the actor, zero.gathered); the reference whole. Two epochs of two mini-batches, clipping
    # active on both (0.05), and a checkpoint that crosses 2 → 1 processes (ZeRO-2: micro-batches of one, and
    # 1 → 2 too). ZeRO-3's checkpoint is gathered by every process (process 0 alone had, and waited for ever)
    args = _ppo_args(tiny_model_dir, ppo_setup, "1e-3", "--mode", "separate", "--mini_batch_size", "4",
                     "--ppo_epochs", "2", "--train.save_every", "2")
    if stage == 3:
        args += ["--eval_prompts", str(ppo_setup / "prompts.jsonl"), "--train.eval_every", "2"]
    launcher = "zero2.yaml" if stage == 2 else _zero3_config(tmp_path)
    split = "AdamW state and gradients" if stage == 2 else "weights, gradients and AdamW state"
    _one_process(args, tmp_path / "one")
    printed = _launch(launcher, args, tmp_path / "two")
    for role in ("the actor", "the critic"):
        assert f"deepspeed ZeRO-{stage} over 2 processes ({role}): {split} partitioned" in printed
    weights = _assert_same_weights(tmp_path / "one", tmp_path / "two", pattern="**/*.safetensors")
    assert any(k.startswith("critic/") for k in weights)
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    learned = [r for r in one if "grad_norm/actor" in r]  # (the last row: the final evaluation alone)
    assert len(learned) == 3 and all(min(r["grad_norm/actor"], r["grad_norm/critic"]) > 0.05 for r in learned)
    for key in ("grad_norm/actor", "grad_norm/critic", "loss/policy", "loss/value", "rollout/score", "eval/score"):
        expected = [r[key] for r in one if key in r]
        assert [r[key] for r in two if key in r] == pytest.approx(expected, rel=1e-4, abs=1e-6), key
    assert [r["step"] for r in two if "eval/score" in r] == ([2, 3] if stage == 3 else [])
    # its checkpoint resumes in one process to the same weights
    _one_process([*args, "--train.resume", str(tmp_path / "two" / "checkpoints" / "step-2")], tmp_path / "back")
    _assert_same_weights(tmp_path / "one", tmp_path / "back", pattern="**/*.safetensors")
    if stage == 3:
        return
    # micro-batches of one rollout: each engine's reduction completed after a process's second backward
    _launch(launcher, [*args, "--micro_batch_size", "1"], tmp_path / "micro")
    _assert_same_weights(tmp_path / "one", tmp_path / "micro", pattern="**/*.safetensors")
    # a 1-process checkpoint resumes under ZeRO-2
    _launch(launcher, [*args, "--train.resume", str(tmp_path / "one" / "checkpoints" / "step-2")], tmp_path / "forth")
    _assert_same_weights(tmp_path / "one", tmp_path / "forth", pattern="**/*.safetensors")


@needs_deepspeed
def test_separate_ppo_with_one_update_a_step_under_zero1_equals_one_process(tiny_model_dir, task_dir, ppo_setup,
                                                                           tmp_path):
    # one update a step: the critic's learn forward (through its engine) gives GAE's values, the critic
    # back-propagates first; the held-out gold reward is evaluated by process 0 on the whole actor
    args = _ppo_args(tiny_model_dir, ppo_setup, "1e-3", "--mode", "separate", "--mini_batch_size", "8",
                     "--ppo_epochs", "1", "--task", "describe", "--eval_prompts",
                     str(task_dir / "prompts_valid.jsonl"))
    _one_process(args, tmp_path / "one")
    assert "deepspeed ZeRO-1 over 2 processes (the actor)" in _launch("torchrun", [*args, "--train.deepspeed",
                                                                                   "zero1"], tmp_path / "two")
    _assert_same_weights(tmp_path / "one", tmp_path / "two", pattern="**/*.safetensors")
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert two[-1]["eval/gold"] == pytest.approx(one[-1]["eval/gold"], abs=1e-6)
    for key in ("loss/value", "grad_norm/critic", "grad_norm/actor"):  # of the whole mini-batch, either way
        values = [[r[key] for r in run if key in r] for run in (one, two)]
        assert len(values[0]) == 3 and values[1] == pytest.approx(values[0], rel=1e-4), key


# --------------------------------------------------------------------------- the online methods, the full policy


@needs_deepspeed
@pytest.mark.parametrize("launch", ["zero2.yaml", "fsdp"])  # ZeRO-3: PPO's test below
def test_full_parameter_grpo_under_zero_or_fsdp_equals_one_process(tiny_model_dir, ppo_setup, tmp_path, launch):
    # lora.enabled false: the whole policy trained (an engine over it, or sharded), a frozen copy as the KL
    # term's reference, whole (DeepSpeed) or fully sharded (FSDP); two updates a step, clipping active, each
    # from two micro-batches a process (their backwards collective)
    args = ["grpo", "--model", tiny_model_dir("llama"), "--prompts", str(ppo_setup / "prompts.jsonl"),
            "--rewards", str(ppo_setup / "rm"), "--lora.enabled", "false", "--kl_coef", "0.05",
            "--train.max_steps", "3", "--prompts_per_step", "4", "--group_size", "4", "--mini_batch_size", "8",
            "--optim.lr", "1e-3", "--optim.max_grad_norm", "0.05", "--generation.max_new_tokens", "8",
            "--train.tensorboard", "false", "--train.seed", "1"]
    # (seed 0 draws one uniform within float rounding of a token boundary: batches of 16 and of 8 rows round the
    # random tiny model's near-uniform softmax differently, and that one token differs)
    _one_process(args, tmp_path / "one")
    args += ["--micro_batch_size", "3"]  # each process's 4 rows of a mini-batch in two forwards and backwards
    if launch == "fsdp":
        printed = _launch("torchrun", [*args, "--train.fsdp", "full_shard"], tmp_path / "two")
        assert "fsdp full_shard over 2 processes (the actor)" in printed
        assert "fsdp full_shard over 2 processes (the frozen reference)" in printed
    else:
        printed = _launch(launch, args, tmp_path / "two")
        assert "deepspeed ZeRO-2 over 2 processes (the actor): AdamW state and gradients partitioned" in printed
    _assert_same_weights(tmp_path / "one", tmp_path / "two")
    one, two = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
    assert all(r["grad_norm"] > 0.05 for r in one)  # clipped every update
    for key in ("loss/policy", "loss/kl", "grad_norm", "rollout/kl"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4, abs=1e-6), key
