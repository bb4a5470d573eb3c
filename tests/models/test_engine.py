"""The rollout engine on tiny models of eight architectures: our loop against HF generate, per-sample
seeds whatever the batch, EOS, lengths, the RolloutEngine contract, LoRA (merged per call and not)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import GenerationConfig, LoraConfig
from rlhfkit.models.load import add_lora, load_tokenizer
from rlhfkit.ops import distinct_rows
from rlhfkit.rollout import engine
from rlhfkit.rollout.engine import HFRolloutEngine, LlamaForward, decode, decode_hf, linear_weights, llama_family
from rlhfkit.rollout.generate import generate
from rlhfkit.rollout.sampling import prompt_seeds, row_uniforms

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2", "gpt_neox"]
# Grouped-query attention (4 query heads, 2 key/value heads), as in most current models: our loop's attention
# groups the queries of each key/value head itself.
GQA = ["llama-gqa", "qwen2-gqa", "qwen3-gqa", "mistral-gqa"]
# Different lengths, so the batch is left-padded.
PROMPTS = ["User: Describe the cat.\nAssistant:", "User: Tell me about the old lake you saw today.\nAssistant:",
           "User: What is the park like?\nAssistant:", "Hello",
           "User: Tell me about the bridge from your childhood, and the river under it.\nAssistant:"]


def load(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    return AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)


def batch_of(tokenizer, prompts):
    ids = [tokenizer(p).input_ids for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    return input_ids, mask


@pytest.mark.parametrize("arch", ARCHS + GQA)
def test_greedy_loop_equals_hf_generate_token_for_token(tiny_model_dir, arch):
    model, tok = load(tiny_model_dir, arch)
    input_ids, mask = batch_of(tok, PROMPTS)
    assert mask.min() == 0  # left padding is exercised
    cfg = GenerationConfig(max_new_tokens=24, temperature=0)
    ours = decode(model, input_ids, mask, row_uniforms(prompt_seeds(0, 5), 24), cfg, None, tok.pad_token_id)
    with torch.inference_mode():
        hf = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                            pad_token_id=tok.pad_token_id, eos_token_id=None)[:, input_ids.shape[1]:]
    assert ours.shape == (5, 24)
    assert torch.equal(ours, hf)
    assert (llama_family(model) is not None) == (arch.removesuffix("-gqa") in ("llama", "qwen2", "qwen3", "mistral"))
    heads = model.config.num_attention_heads
    assert (getattr(model.config, "num_key_value_heads", heads) < heads) == (arch in GQA)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_prompt_sampled_alone_equals_it_inside_a_padded_batch(tiny_model_dir, arch):
    model, tok = load(tiny_model_dir, arch)
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, batch_size=8)
    seeds = [101, 202, 303, 404, 505]
    together = generate(model, tok, PROMPTS, cfg, seeds=seeds)
    for i in (0, 3, 4):
        alone = generate(model, tok, [PROMPTS[i]], cfg, seeds=[seeds[i]])
        assert alone.completion_ids[0] == together.completion_ids[i]
    # Another place in another batch: reversed order, batches of two.
    pairs = GenerationConfig(max_new_tokens=20, batch_size=2)
    reordered = generate(model, tok, PROMPTS[::-1], pairs, seeds=seeds[::-1])
    assert reordered.completion_ids[::-1] == together.completion_ids


@pytest.mark.parametrize("arch", ARCHS + GQA)
def test_loop_and_hf_backends_draw_the_same_samples(tiny_model_dir, arch):
    model, tok = load(tiny_model_dir, arch)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.7}):
        cfg = GenerationConfig(max_new_tokens=16, temperature=0.8, **kw)
        ours = generate(model, tok, PROMPTS, cfg, seed=3, backend="loop")
        hf = generate(model, tok, PROMPTS, cfg, seed=3, backend="hf")
        assert ours.completion_ids == hf.completion_ids, kw


def test_sampling_repeats_with_a_seed_and_changes_without(tiny_model_dir):
    model, tok = load(tiny_model_dir, "llama")
    cfg = GenerationConfig(max_new_tokens=16)
    a, b = generate(model, tok, PROMPTS, cfg, seed=0), generate(model, tok, PROMPTS, cfg, seed=0)
    c = generate(model, tok, PROMPTS, cfg, seed=1)
    assert a.completion_ids == b.completion_ids and a.texts == b.texts
    assert a.completion_ids != c.completion_ids
    # A prompt repeated with different seeds gets different samples (the seed is per row, not per batch).
    rep = generate(model, tok, [PROMPTS[0]] * 4, cfg, seed=0)
    assert len({tuple(r) for r in rep.completion_ids}) > 1


def test_top_k_one_and_tiny_top_p_sample_the_greedy_completion(tiny_model_dir):
    model, tok = load(tiny_model_dir, "qwen2")
    greedy = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=16, temperature=0)).completion_ids
    assert generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=16, top_k=1), seed=5).completion_ids == greedy
    nucleus = GenerationConfig(max_new_tokens=16, top_p=1e-6)
    assert generate(model, tok, PROMPTS, nucleus, seed=6).completion_ids == greedy
    for backend in ("loop", "hf"):  # min_p 1 keeps the most likely token alone, in either sampler
        top = GenerationConfig(max_new_tokens=16, min_p=1.0, backend=backend)
        assert generate(model, tok, PROMPTS, top, seed=7).completion_ids == greedy, backend
    assert generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=16), seed=7).completion_ids != greedy


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_completions_are_cut_after_the_first_eos_and_the_loop_stops(tiny_model_dir, arch):
    model, tok = load(tiny_model_dir, arch)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    free = generate(model, tok, PROMPTS[:2], cfg)
    assert [len(c) for c in free.completion_ids] == [12, 12] and free.has_eos == [False, False]
    # Declare row 0's fourth greedy token the EOS: row 0 stops there, row 1 goes on unless it meets it too.
    eos = free.completion_ids[0][3]
    tok_eos = copy.deepcopy(tok)
    tok_eos.eos_token = tok_eos.convert_ids_to_tokens(eos)
    cut = generate(model, tok_eos, PROMPTS[:2], cfg)
    first = free.completion_ids[0].index(eos)
    assert cut.completion_ids[0] == free.completion_ids[0][: first + 1] and cut.has_eos[0]
    row1 = free.completion_ids[1]
    assert cut.completion_ids[1] == (row1[: row1.index(eos) + 1] if eos in row1 else row1)
    # One row alone: the loop ends at its EOS instead of running to max_new_tokens.
    input_ids, mask = batch_of(tok, PROMPTS[:1])
    new = decode(model, input_ids, mask, row_uniforms([0], 12), cfg, eos, tok.pad_token_id)
    assert new.shape == (1, first + 1)


def test_after_chat_prompts_a_row_stops_at_the_templates_end_of_turn(tiny_model_dir, monkeypatch):
    model, tok = load(tiny_model_dir, "llama")
    chats = [[{"role": "user", "content": p}] for p in ("Describe the cat.", "What is the park like?")]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    monkeypatch.setattr(engine, "end_of_turn", lambda tokenizer: None)
    free = generate(model, tok, chats, cfg)
    assert [len(c) for c in free.completion_ids] == [12, 12]
    # Declare row 0's fourth greedy token the template's end of turn (a base model's EOS is another token).
    end = free.completion_ids[0][3]
    monkeypatch.setattr(engine, "end_of_turn", lambda tokenizer: end)
    cut = generate(model, tok, chats, cfg)
    first = free.completion_ids[0].index(end)
    assert cut.completion_ids[0] == free.completion_ids[0][: first + 1] and cut.has_eos[0]
    assert cut.texts[0] == engine.completion_text(tok, cut.prompt_ids[0], free.completion_ids[0][:first])
    row1 = free.completion_ids[1]
    assert cut.completion_ids[1] == (row1[: row1.index(end) + 1] if end in row1 else row1)
    # A plain prompt's row runs on to its EOS: its text is not a chat reply, beside chat prompts too.
    plain = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    assert generate(model, tok, plain, cfg).completion_ids[0] == free.completion_ids[0]
    mixed = generate(model, tok, [plain[0], chats[0], plain[1]], cfg)
    assert mixed.completion_ids == [free.completion_ids[0], cut.completion_ids[0], free.completion_ids[1]]
    assert mixed.has_eos == [False, True, False] and mixed.texts[1] == cut.texts[0]


def test_max_new_tokens_bounds_every_completion(tiny_model_dir):
    model, tok = load(tiny_model_dir, "gpt_neox")
    for n in (0, 1, 7):
        gens = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=n), seed=2)
        assert all(len(c) <= n for c in gens.completion_ids)
        assert all(len(c) == n for c, e in zip(gens.completion_ids, gens.has_eos) if not e)
    # A longer budget extends the same samples (step t draws the same uniform).
    short = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=5), seed=2).completion_ids
    long = generate(model, tok, PROMPTS, GenerationConfig(max_new_tokens=10), seed=2).completion_ids
    assert [c[:5] for c in long] == short


@pytest.mark.parametrize("backend", ["hf", "loop"])
def test_rollout_engine_contract(tiny_model_dir, backend):
    model, tok = load(tiny_model_dir, "llama")
    engine = HFRolloutEngine(model, tok, GenerationConfig(max_new_tokens=12, batch_size=3), backend=backend)
    seeds = prompt_seeds(7, len(PROMPTS))
    whole = engine.generate(PROMPTS, seeds)
    # Two processes splitting the batch get exactly the rollouts of one process.
    halves = [engine.generate(PROMPTS[:2], seeds[:2]), engine.generate(PROMPTS[2:], prompt_seeds(7, 3, start=2))]
    assert halves[0].completion_ids + halves[1].completion_ids == whole.completion_ids
    # The shared policy module: updating with it changes nothing.
    engine.update_weights(model)
    assert engine.generate(PROMPTS, seeds).completion_ids == whole.completion_ids
    # New weights (a state dict) reach the samples, as a fresh engine on the new model would draw them.
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items() if "mlp" in k}
    other = copy.deepcopy(model)
    other.load_state_dict(state, strict=False)
    engine.update_weights(state)
    updated = engine.generate(PROMPTS, seeds)
    assert updated.completion_ids != whole.completion_ids
    fresh = HFRolloutEngine(other, tok, engine.cfg, backend)
    assert updated.completion_ids == fresh.generate(PROMPTS, seeds).completion_ids
    with pytest.raises(KeyError, match="does not have"):
        engine.update_weights({"not.a.parameter": torch.zeros(1)})
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(PROMPTS, seeds[:2])
    with pytest.raises(ValueError, match="choose one of"):
        HFRolloutEngine(model, tok, engine.cfg, backend="vllm-someday")


def test_lora_adapters_apply_in_the_loop(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, tok = load(tiny_model_dir, "llama")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                                  init_lora_weights=False)).eval()
    assert llama_family(peft_model) is not None
    input_ids, mask = batch_of(tok, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0)
    uniforms = row_uniforms(prompt_seeds(0, 5), 16)
    with_lora = decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
    assert torch.equal(with_lora, decode_hf(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id))
    with peft_model.disable_adapter():
        without = decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
    assert not torch.equal(with_lora, without)


def lora_actor(tiny_model_dir, arch, targets):
    """A tiny model with a LoRA adapter as rlhfkit adds it, B made non-zero (a fresh adapter is a no-op)."""
    model, tok = load(tiny_model_dir, arch)
    peft_model = add_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=targets)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return peft_model, tok


def logits_along(lm, input_ids, mask, tokens, merge):
    """(A + 1, B, V) logits of ``LlamaForward`` over a prompt batch and then ``tokens`` (B, A), fed in."""
    valid = torch.cat([mask.bool(), torch.ones(tokens.shape, dtype=torch.bool)], 1)
    forward = LlamaForward(lm, valid, merge=merge)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = [forward(input_ids, positions)]
        positions = positions[:, -1:]
        for t in range(tokens.shape[1]):
            positions = positions + 1
            out.append(forward(tokens[:, t: t + 1], positions))
    return torch.stack(out)


@pytest.mark.parametrize("targets", ["all-linear", "all-linear+head"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "llama-gqa", "qwen3-gqa"])
def test_merged_lora_weights_sample_what_the_lora_modules_sample(tiny_model_dir, arch, targets):
    peft_model, tok = lora_actor(tiny_model_dir, arch, targets)
    lm = llama_family(peft_model)
    wrapped = [m for m in (lm.model.layers[0].self_attn.q_proj, lm.model.layers[0].mlp.down_proj, lm.lm_head)
               if hasattr(m, "lora_A")]
    assert len(wrapped) == (3 if targets == "all-linear+head" else 2)
    assert all(linear_weights(m) is not None for m in wrapped)  # the merged path, not the fallback
    input_ids, mask = batch_of(tok, PROMPTS)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    uniforms = row_uniforms(prompt_seeds(1, 5), 16)
    greedy = GenerationConfig(max_new_tokens=16, temperature=0)
    for cfg in (greedy, GenerationConfig(max_new_tokens=16, top_p=0.9)):
        merged = decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
        modules = decode_hf(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
        assert torch.equal(merged, modules)
        if cfg is greedy:
            first_greedy = merged
    # Logits along the same tokens, one F.linear on W + s·BA against base + A + B + scale + add per layer
    ours = logits_along(lm, input_ids, mask, merged, merge=True)
    theirs = logits_along(lm, input_ids, mask, merged, merge=False)
    assert (ours - theirs).abs().max() < 1e-5
    # The module is untouched: base and adapter weights bit for bit, nothing merged into it
    after = peft_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    # An optimiser step between rollouts: the next decode samples with the new adapter
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p.mul_(-1.5)
    stepped = decode(peft_model, input_ids, mask, uniforms, greedy, None, tok.pad_token_id)
    assert torch.equal(stepped, decode_hf(peft_model, input_ids, mask, uniforms, greedy, None, tok.pad_token_id))
    assert not torch.equal(stepped, first_greedy)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_disabled_adapters_decode_exactly_as_the_base_model(tiny_model_dir, arch):
    peft_model, tok = lora_actor(tiny_model_dir, arch, "all-linear+head")
    base, _ = load(tiny_model_dir, arch)  # a fresh copy of the same checkpoint, no peft
    input_ids, mask = batch_of(tok, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=16, temperature=1.0)
    uniforms = row_uniforms(prompt_seeds(2, 5), 16)
    plain = decode(base, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
    with peft_model.disable_adapter():
        off = decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
        off_logits = logits_along(llama_family(peft_model), input_ids, mask, off, merge=True)
    assert torch.equal(off, plain)
    assert torch.equal(off_logits, logits_along(base, input_ids, mask, off, merge=True))
    assert not torch.equal(decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id), plain)


def test_peft_merged_and_unsupported_adapters_take_the_module_path_or_the_merged_base(tiny_model_dir):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model, tok = lora_actor(tiny_model_dir, "llama", "all-linear")
    input_ids, mask = batch_of(tok, PROMPTS)
    cfg = GenerationConfig(max_new_tokens=12, temperature=0)
    uniforms = row_uniforms(prompt_seeds(3, 5), 12)
    unmerged = decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)
    q_proj = llama_family(peft_model).model.layers[0].self_attn.q_proj
    # peft's own merge: W already holds the adapter, the base tensors are used as they are
    peft_model.merge_adapter()
    assert linear_weights(q_proj)[0] is q_proj.base_layer.weight
    assert torch.equal(decode(peft_model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id), unmerged)
    peft_model.unmerge_adapter()
    # dropout in training mode is random per call: the module is called
    train_dropout = get_peft_model(load(tiny_model_dir, "llama")[0],
                                   PeftLoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    layer = llama_family(train_dropout).model.layers[0].self_attn.q_proj
    assert linear_weights(layer) is None
    train_dropout.eval()
    assert linear_weights(layer) is not None
    # DoRA: not a weight merge this function knows; the loop calls the module and still draws HF's tokens
    dora = get_peft_model(load(tiny_model_dir, "llama")[0],
                          PeftLoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                         init_lora_weights=False)).eval()
    assert linear_weights(llama_family(dora).model.layers[0].self_attn.q_proj) is None
    assert torch.equal(decode(dora, input_ids, mask, uniforms, cfg, None, tok.pad_token_id),
                       decode_hf(dora, input_ids, mask, uniforms, cfg, None, tok.pad_token_id))


def repeated_batch(tokenizer, prompts, group):
    """Each prompt ``group`` times in a row (GRPO's batch), left-padded to one width."""
    return batch_of(tokenizer, [p for p in prompts for _ in range(group)])


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "qwen2-gqa", "qwen3-gqa"])
def test_group_prefill_sharing_samples_the_unshared_tokens(tiny_model_dir, arch, lora, monkeypatch):
    model, tok = lora_actor(tiny_model_dir, arch, "all-linear") if lora else load(tiny_model_dir, arch)
    # Three prompts of different lengths x 4: three pad widths (one none) among the rows
    input_ids, mask = repeated_batch(tok, [PROMPTS[3], PROMPTS[0], PROMPTS[4]], 4)
    assert len(set(mask.sum(1).tolist())) == 3 and mask.min() == 0
    first, inverse = distinct_rows(input_ids, mask)
    assert first.tolist() == [0, 4, 8] and inverse.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # the rows the prefill runs on: 3 shared, 12 unshared
    prefill_rows = []
    spy = lambda lm, valid: prefill_rows.append(len(valid)) or LlamaForward(lm, valid)  # noqa: E731
    monkeypatch.setattr(engine, "LlamaForward", spy)
    uniforms = row_uniforms(prompt_seeds(4, 12), 16)
    for cfg in (GenerationConfig(max_new_tokens=16, temperature=1.0), GenerationConfig(max_new_tokens=16, top_p=0.8)):
        shared = decode(model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id, share=True)
        unshared = decode(model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id, share=False)
        assert prefill_rows[-2:] == [3, 12]
        assert shared.shape == (12, 16)
        assert torch.equal(shared, unshared)
        # the seeds differ inside a group, so the rows of one prompt do not all sample one completion
        assert len({tuple(r) for r in shared[:4].tolist()}) > 1
    # The prefill's logits and the first step's, bit for bit: what the rows continue from is the same cache
    valid = torch.cat([mask.bool(), torch.ones((12, 2), dtype=torch.bool)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    lm = llama_family(model)
    with torch.inference_mode():
        alone, together = LlamaForward(lm, valid), LlamaForward(lm, valid[first])
        assert torch.equal(together(input_ids[first], positions[first], rows=inverse), alone(input_ids, positions))
        step = torch.arange(3, 15)[:, None]
        assert torch.equal(together(step, positions[:, -1:] + 1), alone(step, positions[:, -1:] + 1))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_group_prefill_sharing_with_repeated_and_unique_prompts_mixed(tiny_model_dir, arch):
    model, tok = load(tiny_model_dir, arch)
    # not in groups: a repeat far from its first row, unique prompts in between, an uneven group
    order = [PROMPTS[1], PROMPTS[3], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[3], PROMPTS[0], PROMPTS[1]]
    input_ids, mask = batch_of(tok, order)
    first, inverse = distinct_rows(input_ids, mask)
    assert first.tolist() == [0, 1, 3, 6] and inverse.tolist() == [0, 1, 0, 2, 1, 1, 3, 0]
    cfg = GenerationConfig(max_new_tokens=14, temperature=1.0)
    uniforms = row_uniforms(prompt_seeds(9, len(order)), 14)
    shared = decode(model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id)  # shares by default
    assert torch.equal(shared, decode(model, input_ids, mask, uniforms, cfg, None, tok.pad_token_id, share=False))
    # and through generate: each row equals its prompt sampled alone with its seed
    seeds = prompt_seeds(9, len(order))
    together = generate(model, tok, order, GenerationConfig(max_new_tokens=14, batch_size=8), seeds=seeds)
    for i in (0, 2, 3, 7):
        alone = generate(model, tok, [order[i]], GenerationConfig(max_new_tokens=14), seeds=[seeds[i]])
        assert alone.completion_ids[0] == together.completion_ids[i]


def test_rows_with_the_same_ids_but_other_padding_are_not_one_prompt():
    # the pad id (0) is a real token of row 1: same ids, different masks, two prompts
    input_ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1]])
    first, inverse = distinct_rows(input_ids, mask)
    assert first.tolist() == [0, 1] and inverse.tolist() == [0, 1, 0]


@pytest.mark.parametrize("arch, backend, lora", [("llama", "loop", False), ("llama", "loop", True),
                                                 ("llama", "hf", True), ("mistral-gqa", "loop", True),
                                                 ("gpt2", "loop", False), ("gpt2", "hf", False)])
def test_rollout_logprobs_equal_a_scoring_forward(tiny_model_dir, arch, backend, lora):
    from rlhfkit.models.forward import join_prompt_response, logprobs_of

    model, tok = load(tiny_model_dir, arch)
    if lora:
        model = add_lora(model, LoraConfig(enabled=True, r=4, target_modules="all-linear+head"))
        with torch.no_grad():  # a fresh adapter adds nothing: make it count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    # temperature and top-k: the log-probs are of the tempered distribution before filtering, what learn scores
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20, backend=backend)
    # declare a token the EOS that some rows sample, so completions have different lengths
    probe = generate(model, tok, PROMPTS, cfg, seed=3)
    tok_eos = copy.deepcopy(tok)
    tok_eos.eos_token = tok_eos.convert_ids_to_tokens(probe.completion_ids[0][4])
    gens = HFRolloutEngine(model, tok_eos, cfg, backend).generate(PROMPTS, prompt_seeds(3, len(PROMPTS)),
                                                                  logprobs=True)
    assert gens.completion_ids == generate(model, tok_eos, PROMPTS, cfg, seed=3).completion_ids  # the same samples
    lengths = [len(c) for c in gens.completion_ids]
    assert len(set(lengths)) > 1 and any(gens.has_eos)
    assert [len(r) for r in gens.logprobs] == [len(r) for r in gens.entropy] == lengths
    batch = join_prompt_response(gens.prompt_ids, gens.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        expected, entropy = logprobs_of(model, batch["input_ids"], batch["attention_mask"],
                                        keep=batch["action_mask"].shape[1], temperature=0.7, entropy="grad")
    for i, n in enumerate(lengths):
        torch.testing.assert_close(torch.tensor(gens.logprobs[i]), expected[i, :n], rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(gens.entropy[i]), entropy[i, :n], rtol=0, atol=1e-5)
    # the engine leaves them out unless asked, and for a policy in half precision (they would differ from the
    # trainer's forward by more than rounding)
    assert HFRolloutEngine(model, tok, cfg, backend).generate(PROMPTS[:2], [0, 1]).logprobs is None
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert HFRolloutEngine(half, tok, cfg, backend).generate(PROMPTS[:2], [0, 1], logprobs=True).logprobs is None
    if lora:  # peft's default: float32 adapters on a half-precision base, still not the trainer's numbers
        for name, p in half.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
        assert HFRolloutEngine(half, tok, cfg, backend).generate(PROMPTS[:2], [0, 1], logprobs=True).logprobs is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights computing in bf16 (mixed precision)
        assert HFRolloutEngine(model, tok, cfg, backend).generate(PROMPTS[:2], [0, 1], logprobs=True).logprobs is None


@pytest.mark.parametrize("backend", ["hf", "loop"])
def test_the_models_generation_config_neither_reshapes_sampling_nor_hides_its_stop_token(tiny_model_dir, backend):
    # instruct models ship a repetition penalty, suppressed tokens, an end-of-turn id besides the tokenizer's EOS:
    # generate would apply the first two (samples and log-probs then differ from the policy's distribution,
    # entropies NaN where a token is -inf); the end-of-turn id must stop a row as generate's stop would
    from rlhfkit.models.forward import join_prompt_response, response_logprobs
    from rlhfkit.rollout.experience import per_token

    model, tok = load(tiny_model_dir, "llama")
    cfg = GenerationConfig(max_new_tokens=12)
    seeds = prompt_seeds(3, len(PROMPTS))
    plain = engine.sample_prompts(model, tok, PROMPTS, seeds, cfg, backend, logprobs=True)
    eot = plain.completion_ids[0][2]  # taken for the model's end-of-turn token
    model.generation_config.repetition_penalty = 1.3
    model.generation_config.suppress_tokens = [plain.completion_ids[1][0]]
    model.generation_config.eos_token_id = [tok.eos_token_id, eot]
    gens = engine.sample_prompts(model, tok, PROMPTS, seeds, cfg, backend, logprobs=True)
    for row, (before, after) in enumerate(zip(plain.completion_ids, gens.completion_ids)):
        cut, stopped = engine.cut_at_eos(before, [tok.eos_token_id, eot])  # the same draws, cut at either stop
        assert after == cut and gens.has_eos[row] == stopped
    assert gens.completion_ids[0][-1] == eot and gens.has_eos[0]
    batch = join_prompt_response(gens.prompt_ids, gens.completion_ids, tok.pad_token_id)
    with torch.no_grad():
        forward = response_logprobs(model, batch)
    torch.testing.assert_close(per_token(gens.logprobs, forward.shape[1]) * batch["action_mask"],
                               forward * batch["action_mask"], atol=1e-5, rtol=0)
    assert all(e == e for row in gens.entropy for e in row)  # no NaN
    assert model.generation_config.repetition_penalty == 1.3  # the model's own config is left as it was


def test_hf_backend_with_no_new_tokens_returns_none(tiny_model_dir):
    model, tok = load(tiny_model_dir, "llama")
    input_ids, mask = batch_of(tok, PROMPTS[:2])
    new, logprobs, entropy = decode_hf(model, input_ids, mask, torch.rand(2, 0), GenerationConfig(max_new_tokens=1),
                                       tok.eos_token_id, tok.pad_token_id, with_logprobs=True)
    assert new.shape == logprobs.shape == entropy.shape == (2, 0)


@pytest.mark.parametrize("targets", ["all-linear", "all-linear+head"])
def test_a_peft_saved_adapter_updates_the_engine(tiny_model_dir, targets):
    # what adapter_model.safetensors holds (peft's key names, without the adapter's) loads into the active adapter;
    # with the head adapted (PPO's default) peft saves the head's own weight beside, under the model's name for it
    from peft.utils.save_and_load import get_peft_model_state_dict

    model, tok = load(tiny_model_dir, "llama")
    policy = add_lora(model, LoraConfig(enabled=True, r=4, target_modules=targets)).eval()
    trained = copy.deepcopy(policy)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    rollout = HFRolloutEngine(policy, tok, GenerationConfig(max_new_tokens=8))
    seeds = prompt_seeds(1, len(PROMPTS))
    before = rollout.generate(PROMPTS, seeds).completion_ids
    rollout.update_weights(get_peft_model_state_dict(trained))
    after = rollout.generate(PROMPTS, seeds).completion_ids
    assert after != before
    assert after == HFRolloutEngine(trained, tok, rollout.cfg).generate(PROMPTS, seeds).completion_ids


def test_the_stacked_transposed_decode_layout_is_made_for_cpu_weights_only():
    # it holds a second copy of every weight; off the CPU the steps multiply the module's own weights
    from functools import partial

    from rlhfkit.rollout.engine import linear_op

    cpu, meta = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, device="meta")
    assert not isinstance(linear_op([cpu], decode=True), partial)  # torch.mm on a transposed copy
    op = linear_op([meta], decode=True)
    assert isinstance(op, partial) and op.keywords["weight"] is meta.weight  # F.linear on the module's weight
    assert linear_op([meta], decode=True)(torch.zeros(2, 8, device="meta")).shape == (2, 4)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_token_scores_stay_finite_where_a_token_is_ruled_out(temperature):
    # -inf logits (a processor's) divided by a temperature below 1 overflowed back to -inf after the clamp
    logits = torch.tensor([[2.0, 0.5, float("-inf"), -1.0]])
    logp, entropy = engine.token_scores(logits, torch.tensor([0]), temperature)
    expected = torch.log_softmax(torch.tensor([[2.0, 0.5, -1.0]]) / temperature, -1)
    torch.testing.assert_close(logp, expected[:, 0])
    torch.testing.assert_close(entropy, -(expected.exp() * expected).sum(-1))
