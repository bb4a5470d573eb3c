"""The output head run at selected positions only gives the full forward's log-probs and gradients."""

import pytest
import torch

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.data.collate import collate, encode_example
from rlhfkit.models.forward import backbone_and_head, logprobs_of, masked_logprobs
from rlhfkit.models.load import add_lora, load_causal_lm, load_tokenizer

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]
EXAMPLES = [("User: Describe the cat.\nAssistant:", " The cat is calm and lovely."),
            ("User: What is the lake you saw today like?\nAssistant:", " The lake is dull."),
            ("User: Hi.\nAssistant:", " Hello.")]


def _model_and_batch(tiny_model_dir, arch, lora, side):
    path = tiny_model_dir(arch)
    torch.manual_seed(0)
    model, tok = load_causal_lm(ModelConfig(path=path), torch.device("cpu")), load_tokenizer(path)
    if lora:
        model = add_lora(model, LoraConfig(enabled=True, r=4, target_modules=lora))
        with torch.no_grad():  # a fresh adapter adds zero: make it count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    batch = collate([encode_example(tok, p, c, 64) for p, c in EXAMPLES], tok.pad_token_id, side)
    batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)  # garbage in pad slots
    return model, batch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [None, "all-linear", "all-linear+head"])
def test_masked_logprobs_equal_full_logits(tiny_model_dir, arch, lora):
    for side in ("left", "right"):
        model, batch = _model_and_batch(tiny_model_dir, arch, lora, side)
        assert backbone_and_head(model) is not None  # the fast path is the one under test
        mask = batch["completion_mask"][:, 1:]
        full = logprobs_of(model, batch["input_ids"], batch["attention_mask"]) * mask  # (B, T-1)
        (full.sum()).backward()
        full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        fast = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
        fast.sum().backward()
        assert fast.shape == full.shape
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
        assert (fast[mask == 0] == 0).all()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad, full_grads[n], atol=1e-6, rtol=1e-5, msg=n)
        if lora:  # with the adapter switched off, the base model's log-probs
            with torch.no_grad(), model.disable_adapter():
                off = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
            with torch.no_grad(), model.disable_adapter():
                base = logprobs_of(model, batch["input_ids"], batch["attention_mask"]) * mask
            torch.testing.assert_close(off, base, atol=1e-6, rtol=0)
            assert not torch.allclose(off, fast.detach(), atol=1e-4)  # the adapter did matter


def test_models_that_transform_logits_take_the_full_forward(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir, "llama", None, "right")
    model.config.final_logit_softcapping = 30.0  # e.g. Gemma 2: the head alone would not give the logits
    assert backbone_and_head(model) is None
    mask = batch["completion_mask"][:, 1:]
    torch.testing.assert_close(masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask),
                               logprobs_of(model, batch["input_ids"], batch["attention_mask"]) * mask)
