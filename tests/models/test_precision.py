"""bf16 mixed precision (``dtype: auto`` on a bf16 GPU), checked on the CPU by letting it count as one:
trained weights stay float32 and compute in bf16 under autocast; frozen weights are bf16."""

import json

import pytest
import torch
from safetensors.torch import load_file

import rlhfkit.models.load as load
from rlhfkit.cli import main


@pytest.fixture
def bf16_cpu(monkeypatch):
    """The CPU taken for a GPU with bfloat16: what ``auto`` does there, runnable here (slowly)."""
    monkeypatch.setattr(load, "bf16_gpu", lambda device: True)


def test_auto_keeps_trained_weights_in_float32_and_frozen_ones_in_bf16(bf16_cpu):
    cpu = torch.device("cpu")
    assert load.resolve_dtype("auto", cpu) == torch.bfloat16  # a reference, a reward model, a LoRA base
    assert load.resolve_dtype("auto", cpu, trainable=True) == torch.float32  # full fine-tuning: master weights
    assert load.resolve_dtype("bfloat16", cpu, trainable=True) == torch.bfloat16  # asked for: as asked
    with load.mixed_precision("auto", cpu)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with load.mixed_precision("float32", cpu)():
        assert not torch.is_autocast_enabled("cpu")


def test_full_sft_updates_float32_weights_from_bf16_compute(bf16_cpu, tiny_model_dir, task_dir, tmp_path,
                                                             monkeypatch):
    seen = []  # the dtype the first attention projection computes in, during training
    original = torch.nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        if self.training:
            seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    path, out = tiny_model_dir("llama"), tmp_path / "sft"
    assert main(["sft", "--model", path, "--data", str(task_dir / "sft.jsonl"), "--out", str(out),
                 "--train.max_steps", "1", "--train.batch_size", "8", "--optim.lr", "1e-5", "--optim.warmup_steps", "0",
                 "--train.tensorboard", "false", "--eval_fraction", "0"]) == 0
    assert seen and set(seen) == {torch.bfloat16}
    before, after = load_file(f"{path}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in after.values())
    # one Adam step of ~lr on every weight: float32 keeps it; bf16 weights (~0.02, spacing ~1e-4) would mostly not
    changed = sum((after[k] != before[k]).sum().item() for k in before if before[k].dim() == 2)
    total = sum(before[k].numel() for k in before if before[k].dim() == 2)
    assert changed / total > 0.9


@pytest.fixture
def fp32_lora_rm(tiny_model_dir, task_dir, tmp_path):
    """A LoRA reward model trained in float32 (its score head saved as float32)."""
    out = tmp_path / "rm"
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--lora.enabled", "true", "--lora.r", "4", "--train.max_steps", "2",
                 "--train.batch_size", "8", "--train.tensorboard", "false", "--model.dtype", "float32"]) == 0
    return str(out)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_shared_ppo_runs_on_a_bf16_base_with_a_float32_reward_adapter(bf16_cpu, tiny_model_dir, task_dir,
                                                                       fp32_lora_rm, tmp_path, dtype, monkeypatch):
    """auto: bf16 base, float32 adapters and heads, forwards under autocast (the held-out evaluation's
    sampling too); bfloat16: no autocast, the float32 value and reward heads read bf16 hidden states (cast to
    their dtype)."""
    import rlhfkit.evaluate

    autocast, gold_eval = [], rlhfkit.evaluate.gold_eval

    def spy(*args, **kwargs):
        autocast.append(torch.is_autocast_enabled("cpu"))
        return gold_eval(*args, **kwargs)

    monkeypatch.setattr(rlhfkit.evaluate, "gold_eval", spy)
    out, prompts = tmp_path / "ppo", tmp_path / "eval.jsonl"
    prompts.write_text("".join((task_dir / "prompts_test.jsonl").read_text().splitlines(keepends=True)[:4]))
    assert main(["ppo", "--model", tiny_model_dir("llama"), "--prompts", str(task_dir / "prompts_train.jsonl"),
                 "--reward_model", fp32_lora_rm, "--out", str(out), "--model.dtype", dtype,
                 "--train.max_steps", "2", "--rollout_batch_size", "8", "--mini_batch_size", "4",
                 "--generation.max_new_tokens", "6", "--train.tensorboard", "false", "--lora.r", "4",
                 "--optim.lr", "1e-2", "--task", "describe", "--eval_prompts", str(prompts)]) == 0
    assert autocast == [dtype == "auto"]  # one evaluation, at the end
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and "eval/gold" in logs[-1]
    for row in logs:
        assert all(v == v for v in row.values() if isinstance(v, float))  # no NaN
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in adapter.items() if "lora_" in k)  # trained in float32
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # and trained


def test_full_model_grpo_keeps_a_float32_policy_and_reference_and_evaluates_under_autocast(
        bf16_cpu, tiny_model_dir, tmp_path, monkeypatch):
    import rlhfkit.trainers.online as online
    from rlhfkit.data.tasks import arithmetic

    autocast, evaluate_rewards = [], online.evaluate_rewards

    def spy(model, *args, **kwargs):
        autocast.append((torch.is_autocast_enabled("cpu"), next(model.parameters()).dtype))
        return evaluate_rewards(model, *args, **kwargs)

    monkeypatch.setattr(online, "evaluate_rewards", spy)
    data, out = tmp_path / "arithmetic", tmp_path / "grpo"
    arithmetic.write(data)
    assert main(["grpo", "--model", tiny_model_dir("llama"), "--prompts", str(data / "prompts_train.jsonl"),
                 "--eval_prompts", str(data / "prompts_valid.jsonl"), "--out", str(out), "--lora.enabled", "false",
                 "--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer", "--kl_coef", "0.05",
                 "--train.max_steps", "2", "--prompts_per_step", "2", "--group_size", "4",
                 "--mini_batch_size", "8", "--optim.lr", "1e-3", "--generation.max_new_tokens", "6",
                 "--train.tensorboard", "false"]) == 0
    assert autocast == [(True, torch.float32)]  # the float32 policy samples under bf16 autocast
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(v == v for row in logs for v in row.values() if isinstance(v, float))
    # before the first update the reference is the policy: both float32 under the same autocast, the KL exactly 0
    # (a bf16 reference computed its norms and residuals in bf16: 0.03 a token apart on a sharper model)
    assert logs[0]["loss/kl"] == 0.0
    assert all(v.dtype == torch.float32 for v in load_file(str(out / "model.safetensors")).values())


@pytest.mark.parametrize("reference, lora, tolerance", [
    ("precomputed", "false", 1e-7),  # the policy's own forwards, before training: as exact as the adapter's
    ("adapter", "true", 1e-7),
    ("model", "false", 1e-7),  # a copy in the policy's float32, under the same autocast
])
def test_a_precomputed_reference_is_computed_as_the_policy_is(bf16_cpu, tiny_model_dir, task_dir, tmp_path, reference,
                                                              lora, tolerance):
    # at lr 0 the policy is its reference: with both under the run's bf16 autocast, DPO's first loss is log 2; the
    # precomputed pass ran outside autocast and missed it by 3.1e-5
    import math

    out = tmp_path / reference
    assert main(["dpo", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"),
                 "--out", str(out), "--reference", reference, "--lora.enabled", lora, "--lora.r", "4",
                 "--train.max_steps", "1", "--train.batch_size", "8", "--train.log_every", "1", "--optim.lr", "0",
                 "--train.tensorboard", "false"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(math.log(2), abs=tolerance)


def test_auto_is_bf16_on_gpus_that_compute_in_it_natively(monkeypatch):
    # a V100 (7.0) or T4 (7.5) emulates bf16, slowly, though torch.cuda.is_bf16_supported() says yes there
    cuda = torch.device("cuda")
    for capability, native in (((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert load.bf16_gpu(cuda) is native
        assert load.resolve_dtype("auto", cuda) == (torch.bfloat16 if native else torch.float32)
    assert not load.bf16_gpu(torch.device("cpu"))


def test_float16_is_refused_for_weights_trained_in_full(tiny_model_dir, task_dir, tmp_path, capsys):
    # no loss scaling here: their small gradients would underflow; frozen weights may be float16
    assert load.resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert main(["sft", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "sft.jsonl"),
                 "--out", str(tmp_path / "sft"), "--model.dtype", "float16", "--train.max_steps", "1"]) != 0
    assert "model.dtype float16 for weights that are trained in full" in capsys.readouterr().err


def test_a_lora_reward_model_on_a_bf16_base_saves_its_score_statistics(bf16_cpu, tiny_model_dir, task_dir, tmp_path):
    # the statistics pass ran outside autocast: bf16 hidden states met the float32 score head and the run failed at
    # its end, with nothing saved
    out = tmp_path / "rm"
    assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference_valid.jsonl"),
                 "--out", str(out), "--lora.enabled", "true", "--train.max_steps", "1", "--train.batch_size", "8",
                 "--train.tensorboard", "false"]) == 0
    stats = json.loads((out / "score_normalization.json").read_text())
    assert stats["std"] > 0 and (out / "adapter_config.json").is_file()
