"""Gradient checkpointing (``train.gradient_checkpointing``): each layer runs its forward again in the backward,
in eval mode too (the DPO family and the rollout trainers learn without dropout), and every trainer ends with
the weights it gives without it."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.cli import main
from rlhfkit.config import LoraConfig
from rlhfkit.models import load, roles
from rlhfkit.models.load import add_lora, checkpoint_activations, learn_mode
from rlhfkit.trainers import loop


def _counting(model) -> dict[str, int]:
    """Calls with gradients on of the input embeddings (outside every checkpointed layer: once a forward) and of
    the first layer's MLP (inside: run again by the backward when the layer is checkpointed). Not the layer's own
    hooks: transformers 5.17 checkpoints a layer's ``__call__``, hooks included, 5.2x its ``forward`` alone."""
    calls = {"forward": 0, "mlp": 0}
    layer = next(m for n, m in model.named_modules() if n.endswith(("layers.0", "h.0")))

    def count(key):
        def hook(*_):
            calls[key] += torch.is_grad_enabled()
        return hook

    model.get_input_embeddings().register_forward_pre_hook(count("forward"))
    layer.mlp.register_forward_pre_hook(count("mlp"))  # before it runs: the recompute stops once it has what it needs
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [False, True])
def test_a_checkpointed_layer_runs_again_in_the_backward_in_eval_mode_too(tiny_model_dir, arch, lora):
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    if lora:
        plain = add_lora(plain, LoraConfig(enabled=True, r=4))
        with torch.no_grad():  # B = 0 at the start would leave A without a gradient
            for name, p in plain.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.1)
    checkpointed = copy.deepcopy(plain)
    checkpoint_activations(checkpointed)
    ids = torch.randint(3, 500, (2, 12))
    grads = []
    for model in (plain, checkpointed):
        learn_mode(model, dropout=False)  # eval mode: no dropout, as the DPO family and the rollouts learn
        calls = _counting(model)
        model(input_ids=ids).logits.logsumexp(-1).mean().backward()
        assert calls == {"forward": 1, "mlp": 2 if model is checkpointed else 1}
        assert not model.training
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-9, msg=name)
    # an evaluation (eval()) or a pass without gradients does not recompute anything
    checkpointed.eval()
    calls = _counting(checkpointed)
    checkpointed(input_ids=ids).logits.sum().backward()
    learn_mode(checkpointed, dropout=False)
    with torch.no_grad():
        checkpointed(input_ids=ids)
    assert calls == {"forward": 1, "mlp": 1}


def test_prompt_prefixes_are_shared_in_eval_mode_and_not_while_layers_recompute(tiny_model_dir):
    # the rollout's no-grad passes keep their KV cache (eval mode); a checkpointed layer in training mode drops it
    from rlhfkit.models.forward import logprobs_of, shared_prefix_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    checkpoint_activations(model)
    ids = torch.randint(3, 500, (1, 10)).repeat(2, 1)
    ids[1, 6:] = torch.randint(3, 500, (4,))  # one prompt, two completions
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        assert shared_prefix_forward(model, ids, mask, 6) is not None
        shared = logprobs_of(model, ids, mask, keep=4)
    learn_mode(model, dropout=False)
    assert shared_prefix_forward(model, ids, mask, 6) is None
    torch.testing.assert_close(logprobs_of(model, ids, mask, keep=4).detach(), shared, rtol=1e-5, atol=1e-5)


def _weights(out):
    return {f"{p.relative_to(out)}:{k}": v for p in sorted(out.rglob("*.safetensors")) if "checkpoints" not in p.parts
            for k, v in load_file(str(p)).items()}


@pytest.fixture
def length_reward(tmp_path, monkeypatch):
    (tmp_path / "ckpt_length_reward.py").write_text(
        "def length(prompts, completions, **columns):\n    return [len(c) / 20 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.parametrize("command", ["sft", "dpo", "dpo-adapter", "kto-adapter", "ppo", "grpo"])
def test_every_trainer_learns_the_same_weights_with_its_layers_checkpointed(tiny_model_dir, task_dir, ppo_setup,
                                                                            length_reward, tmp_path, monkeypatch,
                                                                            command):
    model = tiny_model_dir("llama")
    quick = ["--train.max_steps", "2", "--optim.lr", "1e-3", "--train.tensorboard", "false"]
    args = {"sft": ["--data", str(task_dir / "sft.jsonl"), "--train.batch_size", "4", "--eval_fraction", "0"],
            "dpo": ["--data", str(task_dir / "preference.jsonl"), "--train.batch_size", "4"],  # eval mode
            # the reference: the policy's adapters off, in eval mode; the checkpointed layers' mode comes back after
            "dpo-adapter": ["--data", str(task_dir / "preference.jsonl"), "--train.batch_size", "4",
                            "--lora.enabled", "true", "--reference", "adapter"],
            "kto-adapter": ["--data", str(task_dir / "unpaired.jsonl"), "--train.batch_size", "4",
                            "--lora.enabled", "true", "--reference", "adapter"],
            "ppo": ["--reward_model", str(ppo_setup / "rm"), "--prompts", str(task_dir / "prompts_train.jsonl"),
                    "--rollout_batch_size", "4", "--mini_batch_size", "2", "--generation.max_new_tokens", "6"],
            "grpo": ["--rewards", "ckpt_length_reward:length", "--prompts", str(task_dir / "prompts_train.jsonl"),
                     "--prompts_per_step", "2", "--group_size", "2", "--mini_batch_size", "2",
                     "--generation.max_new_tokens", "6", "--lora.enabled", "false"]}[command]
    calls = []

    def counted(enable):
        def wrapped(model, *rest):
            enable(model, *rest)
            calls.append(_counting(model))
        return wrapped

    monkeypatch.setattr(loop, "checkpoint_activations", counted(load.checkpoint_activations))
    monkeypatch.setattr(roles, "checkpoint_activations", counted(load.checkpoint_activations))
    runs = {}
    for name, extra in (("plain", []), ("checkpointed", ["--train.gradient_checkpointing", "true"])):
        assert main([command.split("-")[0], "--model", model, *args, *quick, *extra, "--out",
                     str(tmp_path / name)]) == 0
        runs[name] = _weights(tmp_path / name)
    # every forward with gradients ran its layers' insides twice: once, then again in the backward
    assert calls and all(c["forward"] > 0 and c["mlp"] == 2 * c["forward"] for c in calls), calls
    plain, checkpointed = runs["plain"], runs["checkpointed"]
    # float rounding apart, through Adam: checkpointed layers keep no KV cache, so a DPO pair's shared prompt runs
    # in each row's forward instead of once (forward.shared_prefix_forward)
    assert plain.keys() == checkpointed.keys() and plain
    for name, value in plain.items():
        assert (checkpointed[name] - value).norm() <= 1e-5 * value.norm().clamp(min=1e-12), name
