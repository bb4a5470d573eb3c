"""The output head run at selected positions only gives the full forward's log-probs and gradients."""

import pytest
import torch

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.data.collate import collate, encode_example
from rlhfkit.models.forward import backbone_and_head, logprobs_of, masked_logprobs
from rlhfkit.models.load import add_lora, load_causal_lm, load_tokenizer

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2", "gpt_neox"]
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
                scale = full_grads[n].abs().max().item()  # float32 rounding, relative to the gradient's size
                torch.testing.assert_close(p.grad, full_grads[n], atol=1e-5 * scale, rtol=1e-5, msg=n)
        if lora:  # with the adapter switched off, the base model's log-probs
            with torch.no_grad(), model.disable_adapter():
                off = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask)
            with torch.no_grad(), model.disable_adapter():
                base = logprobs_of(model, batch["input_ids"], batch["attention_mask"]) * mask
            torch.testing.assert_close(off, base, atol=1e-6, rtol=0)
            assert not torch.allclose(off, fast.detach(), atol=1e-4)  # the adapter did matter


@pytest.mark.parametrize("lora", [None, "all-linear+head"])
@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_the_head_run_in_chunks_gives_the_same_logprobs_and_gradients(tiny_model_dir, lora, chunk):
    # chunks of 1, 4 and 7 of the batch's completion positions (the last chunk shorter); with and without
    # gradients (each chunk checkpointed, or freed); the LoRA head's gradients too
    model, batch = _model_and_batch(tiny_model_dir, "llama", lora, "right")
    mask = batch["completion_mask"][:, 1:]
    assert 7 < int(mask.sum())
    grads = []
    for size in (0, chunk):
        model.zero_grad()
        lp = masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask, chunk=size)
        lp.logsumexp(0).sum().backward()  # a loss that weighs positions unevenly
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        with torch.no_grad():
            torch.testing.assert_close(masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask,
                                                       chunk=size), lp.detach(), atol=1e-6, rtol=0)
        if size == 0:
            whole = lp.detach()
    torch.testing.assert_close(lp.detach(), whole, atol=1e-6, rtol=0)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-6 * g.abs().max().item(), rtol=1e-5, msg=n)


def test_chunks_under_bf16_autocast_sum_the_head_s_gradient_as_precisely_as_one_pass():
    # each chunk casts the weights itself: a cast shared by the chunks summed their gradients in bf16, the error
    # growing with their number (0.27% whole, 0.99% in chunks of 64, against float32)
    from rlhfkit.models.forward import _masked_head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 512, bias=False)
    hidden, ids = torch.randn(4, 1025, 64), torch.randint(0, 512, (4, 1025))
    mask = torch.ones(4, 1024, dtype=torch.bool)

    def weight_grad(chunk, amp):
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            lp = _masked_head_logprobs(head, hidden, ids, mask, chunk)
        lp.sum().backward()
        return head.weight.grad.clone()

    exact = weight_grad(0, amp=False)
    errors = {c: ((weight_grad(c, amp=True) - exact).norm() / exact.norm()).item() for c in (0, 64)}
    assert 0 < errors[64] <= 1.1 * errors[0], errors


def test_models_that_transform_logits_take_the_full_forward(tiny_model_dir):
    model, batch = _model_and_batch(tiny_model_dir, "llama", None, "right")
    model.config.final_logit_softcapping = 30.0  # e.g. Gemma 2: the head alone would not give the logits
    assert backbone_and_head(model) is None
    mask = batch["completion_mask"][:, 1:]
    torch.testing.assert_close(masked_logprobs(model, batch["input_ids"], batch["attention_mask"], mask),
                               logprobs_of(model, batch["input_ids"], batch["attention_mask"]) * mask)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("lora", [None, "all-linear+head"])
def test_response_logprobs_and_entropies_in_chunks_equal_the_whole_window(tiny_model_dir, arch, lora):
    """The rollout trainers' layout (left-padded prompts, right-padded responses of 1 to 5 tokens, and an empty
    one) at temperature 0.7: the head run on response tokens alone, 3 at a time, gives the log-probs and entropies
    of the whole response window (and an oracle from the full forward's logits), 0 off the responses, and the
    gradients of a loss reading both."""
    from rlhfkit.models.forward import join_prompt_response, response_logprobs

    model, _ = _model_and_batch(tiny_model_dir, arch, lora, "left")
    tok = load_tokenizer(tiny_model_dir(arch))
    grouped = _grouped_batch(tok)
    cut = -grouped["action_mask"].shape[1]
    prompt_ids = [row[m.bool()].tolist() for row, m in zip(grouped["input_ids"][:, :cut],
                                                           grouped["attention_mask"][:, :cut])]
    responses = [row[m.bool()].tolist() for row, m in zip(grouped["input_ids"][:, cut:], grouped["action_mask"])]
    batch = join_prompt_response(prompt_ids + prompt_ids[:1], responses + [[]], tok.pad_token_id)
    mask, width = batch["action_mask"], batch["action_mask"].shape[1]
    assert mask.sum(-1).tolist() == [1, 2, 3, 3, 5, 3, 0]  # tokens as the tokenizer splits them
    with torch.no_grad():  # the oracle: the full forward's logits at the positions that predict response tokens
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
        logp = torch.log_softmax(logits[:, -width - 1:-1].float() / 0.7, -1)  # (B, A, V)
        oracle_lp = logp.gather(-1, batch["input_ids"][:, -width:, None]).squeeze(-1) * mask
        oracle_entropy = -(logp.exp() * logp).sum(-1) * mask
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(0))  # positions weighed unevenly
    grads = {}
    for chunk in (0, 3):
        model.zero_grad()
        lp, entropy = response_logprobs(model, batch, 0.7, entropy="grad", chunk=chunk)
        torch.testing.assert_close(lp, oracle_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(entropy, oracle_entropy, atol=1e-5, rtol=0)
        assert (lp[mask == 0] == 0).all() and (entropy[mask == 0] == 0).all()
        (weights * (lp - 0.3 * entropy)).sum().backward()
        grads[chunk] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            torch.testing.assert_close(response_logprobs(model, batch, 0.7, chunk=chunk), lp.detach(), atol=1e-6,
                                       rtol=0)
        # the rollout's metric: the same entropies, without a graph (nothing softmax-sized kept for them)
        metric = response_logprobs(model, batch, 0.7, entropy="detached", chunk=chunk)
        assert metric[0].requires_grad and not metric[1].requires_grad
        torch.testing.assert_close(metric[1], entropy.detach(), atol=1e-6, rtol=0)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[3][n], g, atol=1e-5 * g.abs().max().item(), rtol=1e-4, msg=n)
    # a batch whose every response is empty: zeros (the head run on no position)
    empty = join_prompt_response(prompt_ids[:2], [[], []], tok.pad_token_id)
    for chunk in (0, 3):
        lp, entropy = response_logprobs(model, empty, entropy="grad", chunk=chunk)
        assert torch.equal(lp, torch.zeros(2, 1)) and torch.equal(entropy, torch.zeros(2, 1))


def _grouped_batch(tok, group: int = 3):
    """Two prompts of different lengths, each ``group`` times, with responses of different lengths."""
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.models.forward import join_prompt_response

    prompts = [encode_prompt(tok, p) for p, _ in EXAMPLES[:2]]
    responses = [" calm", " The lake is dull and grey today.", " Hello.", " It is", " Fine, thanks.", " No"]
    prompt_ids = [prompts[i // group] for i in range(2 * group)]
    response_ids = [tok(r, add_special_tokens=False)["input_ids"][: 1 + i] for i, r in enumerate(responses)]
    response_ids = response_ids[: len(prompt_ids)]
    return join_prompt_response(prompt_ids, response_ids, tok.pad_token_id)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [None, "all-linear+head"])
def test_shared_prefix_logprobs_equal_the_full_forward(tiny_model_dir, arch, lora):
    """Repeated prompts run once (GRPO's groups): same log-probs and gradients as every row in full."""
    from rlhfkit.models.forward import _shared_prefix_logits

    model, _ = _model_and_batch(tiny_model_dir, arch, lora, "left")
    tok = load_tokenizer(tiny_model_dir(arch))
    batch = _grouped_batch(tok)
    ids, attn, width = batch["input_ids"], batch["attention_mask"], batch["action_mask"].shape[1]
    assert _shared_prefix_logits(model, ids, attn, width) is not None  # the shared path is the one under test
    full = logprobs_of(model, ids, attn)[:, -width:] * batch["action_mask"]  # (B, A): every row in full
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    shared, entropy = logprobs_of(model, ids, attn, keep=width, entropy="grad")
    (shared * batch["action_mask"]).sum().backward()
    assert shared.shape == full.shape and entropy.shape == full.shape
    torch.testing.assert_close(shared * batch["action_mask"], full, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            scale = full_grads[n].abs().max().item()  # float32 rounding, relative to the gradient's size
            torch.testing.assert_close(p.grad, full_grads[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    if lora:  # the reference pass (adapters off) takes the same path
        with torch.no_grad(), model.disable_adapter():
            torch.testing.assert_close(logprobs_of(model, ids, attn, keep=width) * batch["action_mask"],
                                       logprobs_of(model, ids, attn)[:, -width:] * batch["action_mask"],
                                       atol=1e-5, rtol=0)


def test_distinct_prefixes_take_the_plain_forward(tiny_model_dir):
    from rlhfkit.models.forward import _shared_prefix_logits

    model, _ = _model_and_batch(tiny_model_dir, "llama", None, "left")
    batch = _grouped_batch(load_tokenizer(tiny_model_dir("llama")), group=1)
    assert _shared_prefix_logits(model, batch["input_ids"], batch["attention_mask"],
                                 batch["action_mask"].shape[1]) is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lora", [None, "all-linear+head"])
def test_masked_logprobs_share_the_prompts_of_pairs(tiny_model_dir, arch, lora):
    """DPO's batch (every chosen row, then every rejected one, prompts of different lengths): each
    prompt's columns run once, with the full forward's log-probs and gradients, on either padding side."""
    from rlhfkit.models.forward import shared_prefix_forward

    path = tiny_model_dir(arch)
    tok = load_tokenizer(path)
    rejected = [" The dog is loud.", " The lake is bright and very clear.", " Go away."]
    for side in ("right", "left"):
        model, _ = _model_and_batch(tiny_model_dir, arch, lora, side)
        examples = ([encode_example(tok, p, c, 64) for p, c in EXAMPLES]
                    + [encode_example(tok, p, r, 64) for (p, _), r in zip(EXAMPLES, rejected)])
        batch = collate(examples, tok.pad_token_id, side)
        mask = batch["completion_mask"][:, 1:]
        ids, attn = batch["input_ids"], batch["attention_mask"]
        width = int(mask.float().argmax(-1).min()) + 1
        backbone = backbone_and_head(model)[0]
        assert shared_prefix_forward(backbone, ids, attn, width) is not None  # the shared path is under test
        full = logprobs_of(model, ids, attn) * mask
        full.sum().backward()
        full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        fast = masked_logprobs(model, ids, attn, mask)
        fast.sum().backward()
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=0)
        for n, p in model.named_parameters():
            if p.requires_grad:  # float rounding of sums of a gradient's size (30 or so here): 1e-6 of it
                scale = float(full_grads[n].abs().max())
                torch.testing.assert_close(p.grad, full_grads[n], atol=1e-6 * scale + 1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_forwards_use_the_model_s_own_cache_keyword(tiny_model_dir, arch, caplog):
    import logging
    import warnings

    from rlhfkit.config import GenerationConfig
    from rlhfkit.models.forward import shared_prefix_forward
    from rlhfkit.ops import cache_keyword
    from rlhfkit.rollout.engine import decode

    model, batch = _model_and_batch(tiny_model_dir, arch, "all-linear", "left")
    assert cache_keyword(model) == cache_keyword(model.get_base_model())  # a peft model: its HF model's
    ids, mask = batch["input_ids"][[0, 0]], batch["attention_mask"][[0, 0]]  # one prompt twice: shared
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as warned, torch.no_grad():
        warnings.simplefilter("always")
        assert shared_prefix_forward(model, ids, mask, 5) is not None
        decode(model.get_base_model(), ids[:, :5], mask[:, :5], torch.rand(2, 3), GenerationConfig(max_new_tokens=3),
               None, 0, share=False)
    said = " ".join([str(w.message) for w in warned] + [r.getMessage() for r in caplog.records])
    assert "past_key_values" not in said  # no deprecated keyword where the model takes ``cache``


def test_a_model_that_changes_its_logits_after_its_head_keeps_its_full_forward(tiny_model_dir):
    # Falcon-H1's muP multiplier, RecurrentGemma's softcap: under names no list can know in advance, so a probe
    # compares the full forward with the head on the body's hidden states, once
    model = load_causal_lm(ModelConfig(path=tiny_model_dir("llama")), torch.device("cpu"))
    assert backbone_and_head(model) is not None  # the plain model: the head-only paths apply
    scaled = load_causal_lm(ModelConfig(path=tiny_model_dir("llama")), torch.device("cpu"))
    del scaled._rlhfkit_logits_after_head  # probed again, after the hook: a model built in Python is probed lazily
    scaled.register_forward_hook(lambda module, args, out: out.__setitem__("logits", out.logits * 4) or out)
    assert backbone_and_head(scaled) is None
    ids = torch.randint(3, 100, (2, 9))
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, 3:] = True
    with torch.no_grad():
        expected = torch.log_softmax(scaled(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        torch.testing.assert_close(masked_logprobs(scaled, ids, torch.ones_like(ids), mask),
                                   expected.masked_fill(~mask, 0.0), rtol=0, atol=1e-5)
