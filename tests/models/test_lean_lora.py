"""The lean LoRA forward: bit for bit peft's, outputs and gradients, and peft's own forward wherever it is not plain."""

import copy

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from rlhfkit.config import LoraConfig
from rlhfkit.models.load import add_lora, peft_lora_config
from rlhfkit.models.lora import LeanLoraLinear, lean_lora, plain_lora
from rlhfkit.rollout.engine import linear_weights

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _models(tiny_model_dir, arch, **lora):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    cfg = LoraConfig(enabled=True, r=4, target_modules="all-linear+head", **lora)
    other = peft_lora_config(cfg, base)  # resolved before LoRA layers wrap the base's modules
    lean = add_lora(base, cfg)
    lean.add_adapter("other", other)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lean.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # B starts at zero: make every adapter count
    peft = copy.deepcopy(lean)
    for module in peft.modules():
        if type(module) is LeanLoraLinear:
            module.__class__ = LoraLinear  # peft's own forward
    return lean, peft


def _grads(model, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks, where there is dropout
    out = model(input_ids=IDS).logits
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_forward_and_gradients_are_peft_s_bit_for_bit(tiny_model_dir, arch):
    lean, peft = _models(tiny_model_dir, arch)
    layers = [m for m in lean.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is LeanLoraLinear for m in layers)
    # gpt2's Conv1D layers are not plain (fan_in_fan_out): they take peft's forward, the same answer either way
    plain = sum(plain_lora(m) is not None for m in layers)
    assert plain == (len(layers) if arch == "llama" else 0) or (arch == "gpt2" and plain < len(layers))
    for adapter in ("default", "other"):
        lean.set_adapter(adapter), peft.set_adapter(adapter)
        out, grads = _grads(lean)
        expected, expected_grads = _grads(peft)
        assert torch.equal(out, expected)
        assert grads.keys() == expected_grads.keys() and grads
        for name, g in grads.items():
            assert torch.equal(g, expected_grads[name]), name
    with lean.disable_adapter(), peft.disable_adapter(), torch.no_grad():
        off = lean(input_ids=IDS).logits
        assert torch.equal(off, peft(input_ids=IDS).logits)
    assert (off - out).abs().max() > 1e-3  # the adapters change the output: the comparisons mean something


def test_dropout_in_training_takes_peft_s_forward(tiny_model_dir):
    lean, peft = _models(tiny_model_dir, "llama", dropout=0.5)
    lean.train(), peft.train()
    layer = next(m for m in lean.modules() if type(m) is LeanLoraLinear)
    assert plain_lora(layer) is None  # random masks: only peft's forward draws them
    out, grads = _grads(lean, seed=3)
    expected, expected_grads = _grads(peft, seed=3)
    assert torch.equal(out, expected)
    assert all(torch.equal(g, expected_grads[n]) for n, g in grads.items())
    lean.eval()
    assert plain_lora(layer) is not None  # dropout off in eval: the lean forward again


def test_rollout_engine_still_merges_lean_layers(tiny_model_dir):
    lean, _ = _models(tiny_model_dir, "llama")
    layer = next(m for m in lean.modules() if type(m) is LeanLoraLinear)
    weight, bias = linear_weights(layer)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), layer(x), rtol=1e-5, atol=1e-6)
    assert lean_lora(lean) is lean  # idempotent


def test_adapters_off_is_peft_s_disable_adapter(tiny_model_dir):
    from rlhfkit.models.lora import adapters_off

    lean, _ = _models(tiny_model_dir, "llama")
    flags = {n: p.requires_grad for n, p in lean.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    with torch.no_grad():
        with lean.disable_adapter():
            expected = lean(input_ids=IDS).logits
        with adapters_off(lean):
            off = lean(input_ids=IDS).logits
        on = lean(input_ids=IDS).logits
    assert torch.equal(off, expected)
    assert (on - off).abs().max() > 1e-3  # back on afterwards
    assert {n: p.requires_grad for n, p in lean.named_parameters()} == flags


LONG_IDS = torch.arange(5, 5 + 4 * 12).reshape(4, 12)  # 48 rows: above every tiny layer's break-even


def test_merged_forward_and_gradients_equal_peft_s_products(tiny_model_dir):
    from rlhfkit.models.lora import merges

    lean, peft = _models(tiny_model_dir, "llama")
    layers = [m for m in lean.modules() if type(m) is LeanLoraLinear]
    x_of = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: x_of.__setitem__(m, a[0])) for m in layers]
    with torch.no_grad():
        lean(input_ids=LONG_IDS)
    for h in hooks:
        h.remove()  # a hook would send the call to peft's forward
    assert all(merges(x_of[m], m.base_layer, plain_lora(m)[1][1]) for m in layers)  # every layer merges here
    assert not any(merges(x_of[m][:1, :2], m.base_layer, plain_lora(m)[1][1]) for m in layers)  # 2 rows: none

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=LONG_IDS).logits
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run(lean)
    expected, expected_grads = run(peft)
    atol = 1e-5 * expected.abs().max().item()  # float32 rounding of a sum in another order
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=atol)
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * len(layers)  # A and B of each layer
    for name, g in grads.items():
        scale = expected_grads[name].abs().max().item()
        torch.testing.assert_close(g, expected_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=LONG_IDS).logits, expected, rtol=1e-5, atol=atol)
        with lean.disable_adapter():
            assert (lean(input_ids=LONG_IDS).logits - out).abs().max() > 1e-3  # the adapters count


def test_merged_lora_gradients_by_finite_differences():
    from rlhfkit.models.lora import MergedLoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: MergedLoraLinear.apply(x, weight, bias, a, b, 0.5), (x, a, b))
    out = MergedLoraLinear.apply(x, weight, bias, a, b, 0.5)
    torch.testing.assert_close(out, x @ weight.T + bias + 0.5 * (x @ a.T) @ b.T)


def test_merging_only_where_it_is_exact_enough_and_cheaper():
    from rlhfkit.models.lora import merges

    base, lora_b = torch.nn.Linear(32, 32), torch.nn.Linear(4, 32, bias=False)
    base.requires_grad_(False)
    assert merges(torch.randn(17, 32), base, lora_b)  # 17·64 > 32·32
    assert not merges(torch.randn(16, 32), base, lora_b)  # at the break-even: the skinny products
    assert not merges(torch.randn(2, 40, 32).bfloat16(), base.bfloat16(), lora_b.bfloat16())  # float32 only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not merges(torch.randn(64, 32), base.float(), lora_b.float())
    assert not merges(torch.randn(64, 32), base.float(), torch.nn.Linear(4, 32))  # a LoRA bias
    base.weight.requires_grad_(True)
    assert not merges(torch.randn(64, 32), base, lora_b)  # the base trains: its gradient is not given
    with torch.no_grad():
        assert merges(torch.randn(64, 32), base, lora_b)


def test_wrapping_says_nothing_a_user_cannot_act_on(tiny_model_dir):
    import warnings

    # the tiny model ties its head to its input embeddings: PPO's and GRPO's targets (the head too) made peft warn
    # that merging would change both, which rlhfkit export does not (test_ppo: the exported actor's logits)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        add_lora(base, LoraConfig(enabled=True, r=4, target_modules="all-linear+head"))
    assert not [str(w.message) for w in said if "is_gradient_checkpointing" in str(w.message)
                or "tied layer" in str(w.message)]
