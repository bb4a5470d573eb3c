"""Rollout engines: what samples completions for the trainers (issues #9 and #10).

A ``RolloutEngine`` takes prompts and one seed per prompt and returns ``Generations``; after
each policy update it receives the new weights. ``HFRolloutEngine`` samples with the policy
module itself, on CPU or GPU, with one of two backends that draw the same tokens:

- ``loop`` (ours): one forward per token with a KV cache, explicit positions for left padding
  and none of ``model.generate``'s per-token machinery. Llama-family models (llama, qwen2,
  mistral) run their decoder layers here with our attention over a preallocated KV buffer
  (``KVBuffer``) and their linear layers as ``F.linear`` on weights taken once per call, LoRA
  adapters merged into a copy (``linear_weights``); other tested architectures (gpt2, gpt_neox)
  call the model's own forward with a ``DynamicCache``.
- ``hf``: ``model.generate`` with our sampling rule as a logits processor, for architectures the
  loop is not tested on.

A vLLM engine would implement the same two methods (``generate`` from prompts and seeds,
``update_weights`` loading new weights or a LoRA adapter) without touching trainers.
Shapes: B rows, T prompt width, A new tokens, V vocabulary, H heads, D head size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from rlhfkit.config import GenerationConfig
from rlhfkit.data.collate import encode_prompt, pad_batch
from rlhfkit.rollout.sampling import row_uniforms, sample_next

# Architectures the loop is checked on token for token against HF generate; others use "hf".
LOOP_ARCHS = frozenset({"llama", "qwen2", "mistral", "gpt2", "gpt_neox"})
BACKENDS = ("auto", "loop", "hf")


@dataclass
class Generations:
    """Sampled completions: ids per row (EOS included when emitted) and decoded text."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    has_eos: list[bool]


def cut_at_eos(ids: list[int], eos_token_id: int | None) -> tuple[list[int], bool]:
    """Ids up to and including the first EOS, and whether there was one."""
    if eos_token_id is not None and eos_token_id in ids:
        return ids[: ids.index(eos_token_id) + 1], True
    return ids, False


class KVBuffer:
    """A KV cache of fixed width: per layer (B, H, T + A, D) keys and values, written in place."""

    def __init__(self, num_layers: int, width: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.width, self.length = width, 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, q, D) new keys and values → (B, H, length + q, D) views of all so far."""
        if self.keys[layer] is None:
            b, h, _, d = key.shape
            self.keys[layer] = key.new_zeros((b, h, self.width, d))
            self.values[layer] = value.new_zeros((b, h, self.width, value.shape[-1]))
        end = self.length + key.shape[2]
        self.keys[layer][:, :, self.length: end] = key
        self.values[layer][:, :, self.length: end] = value
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def llama_family(model):
    """The HF causal LM whose decoder layers ``decode`` runs itself, or None.

    Llama, Qwen2 and Mistral with SDPA attention and no sliding window share one layer:
    RMSNorm → q/k/v projections → rotary → attention → o projection, RMSNorm → MLP. A peft
    model is unwrapped; its LoRA layers stay in place (``linear_weights`` reads them).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if (config.model_type in ("llama", "qwen2", "mistral") and config._attn_implementation == "sdpa"
            and all(t == "full_attention" for t in layer_types) and getattr(config, "sliding_window", None) is None):
        return lm
    return None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, q, D) ``x`` at (B, 1, q, D) cos / sin (the HF convention: halves, not pairs)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (accelerate's offloading, user probes) besides its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def linear_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (out, in) weight and (out,) bias with which ``F.linear`` computes ``module(x)``, or None.

    A plain ``nn.Linear``: its own tensors. A peft LoRA ``Linear`` over one, with one active adapter:
    W + scaling · B A (and b + scaling · b_B with a LoRA bias) as new tensors; the module is left as
    it is, so the reference (the same base, adapters off) stays bit-exact. Adapters disabled, already
    merged into W, or none of the active ones on this layer: the base tensors. None, meaning "call the
    module", for what this does not reproduce: hooks, DoRA and the other LoRA variants, several
    active adapters, dropout in training mode, ``fan_in_fan_out``, adapter and base of different
    dtypes, disabled adapters still merged (peft unmerges them on the call), other tuner types.
    The weights change after every optimiser step: take them anew for each ``decode``.
    """
    if type(module) is torch.nn.Linear:
        return None if has_hooks(module) else (module.weight, module.bias)
    if not type(module).__module__.startswith("peft."):
        return None
    from peft.tuners.lora import Linear as LoraLinear

    base = getattr(module, "base_layer", None)
    if type(module) is not LoraLinear or type(base) is not torch.nn.Linear or has_hooks(module) or has_hooks(base):
        return None
    if module.disable_adapters:
        return None if module.merged else (base.weight, base.bias)
    if module.merged:  # peft's forward then calls the base layer alone
        return base.weight, base.bias
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return base.weight, base.bias
    name = active[0]
    variant = name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False)
    if len(active) > 1 or variant or module.fan_in_fan_out:
        return None
    lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    dropout_off = isinstance(dropout, torch.nn.Identity) or not dropout.training or getattr(dropout, "p", 1) == 0
    if (not dropout_off or type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear
            or lora_a.weight.dtype != base.weight.dtype):
        return None
    scaling = module.scaling[name]
    # (out, r) @ (r, in): the same product peft's merge adds (get_delta_weight), into a new tensor
    weight = torch.addmm(base.weight, lora_b.weight, lora_a.weight, alpha=scaling)
    bias = base.bias
    if lora_b.bias is not None:  # lora_bias=True: B's bias is scaled with B (peft: lora_B(lora_A(x)) * scaling)
        bias = scaling * lora_b.bias if bias is None else bias + scaling * lora_b.bias
    return weight, bias


def linear_op(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` as one ``F.linear`` on the weights ``linear_weights`` finds, else the module itself."""
    found = linear_weights(module)
    if found is None:
        return module
    weight, bias = found
    return lambda x: F.linear(x, weight, bias)


def mlp_op(mlp: torch.nn.Module, merge: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP of llama / qwen2 / mistral, down(act(gate(x)) · up(x)), with its linears as ``linear_op``."""
    if not merge or type(mlp).__name__ not in ("LlamaMLP", "Qwen2MLP", "MistralMLP") or has_hooks(mlp):
        return mlp
    gate, up, down, act = linear_op(mlp.gate_proj), linear_op(mlp.up_proj), linear_op(mlp.down_proj), mlp.act_fn
    return lambda x: down(act(gate(x)) * up(x))


def llama_forward(lm, valid: torch.Tensor, merge: bool = True):
    """A forward: (B, q) ids, (B, q) positions → (B, V) logits at the last position, for a llama-family ``lm``.

    The layer arithmetic is the HF modules' (norms, MLP activation and rotary tables are called as
    modules, so rope scaling applies); what is ours is the attention over a ``KVBuffer`` with
    boolean masks cut from ``valid`` (B, T + A), the keys that may be attended, and, with ``merge``,
    the linear layers as ``F.linear`` on weights taken here, once per call (``linear_weights``). An
    unmerged LoRA layer costs five operators a token (base, A, B, scale, add) where a merged one
    costs one, and the rollout is operator-bound at small batch sizes. ``merge=False`` calls every
    linear as a module. This skips the per-call mask building, cache bookkeeping and output records
    of the HF model forward.
    """
    base = lm.model
    kv = KVBuffer(len(base.layers), valid.shape[1])
    op = linear_op if merge else (lambda module: module)
    # (q, k, v, o projections, MLP) per layer; for a LoRA actor these are new tensors, rebuilt per call
    # since the optimiser changes the adapters between rollouts
    layers = [(op(layer.self_attn.q_proj), op(layer.self_attn.k_proj), op(layer.self_attn.v_proj),
               op(layer.self_attn.o_proj), mlp_op(layer.mlp, merge)) for layer in base.layers]
    head = op(lm.lm_head)

    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, q = ids.shape
        if kv.length == 0:  # prefill: causal over the prompt, pads hidden; a pad query sees itself (no empty row)
            causal = torch.ones((q, q), dtype=torch.bool, device=ids.device).tril()
            mask = ((causal & valid[:, None, :q]) | torch.eye(q, dtype=torch.bool, device=ids.device))[:, None]
        else:
            mask = valid[:, None, None, : kv.length + q]  # (B, 1, 1, length + q)
        hidden = base.embed_tokens(ids)  # (B, q, hidden)
        cos, sin = (t[:, None] for t in base.rotary_emb(hidden, position_ids=positions))  # (B, 1, q, D)
        for i, (layer, (q_proj, k_proj, v_proj, o_proj, mlp)) in enumerate(zip(base.layers, layers)):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            query = q_proj(x).view(b, q, -1, attn.head_dim).transpose(1, 2)  # (B, H, q, D)
            key = k_proj(x).view(b, q, -1, attn.head_dim).transpose(1, 2)
            value = v_proj(x).view(b, q, -1, attn.head_dim).transpose(1, 2)
            key, value = kv.update(rotate(key, cos, sin), value, i)  # (B, H_kv, length + q, D)
            out = F.scaled_dot_product_attention(rotate(query, cos, sin), key, value, attn_mask=mask,
                                                 scale=attn.scaling, enable_gqa=attn.num_key_value_groups > 1)
            hidden = hidden + o_proj(out.transpose(1, 2).reshape(b, q, -1))
            hidden = hidden + mlp(layer.post_attention_layernorm(hidden))
        kv.length += q
        return head(base.norm(hidden[:, -1]))

    return forward


def model_forward(model, valid: torch.Tensor):
    """The same contract through the model's own forward and a ``DynamicCache`` (any HF decoder)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask = valid.long()

    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        seen = cache.get_seq_length() + ids.shape[1]
        out = model(input_ids=ids, attention_mask=mask[:, :seen], position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    return forward


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms: torch.Tensor,
           cfg: GenerationConfig, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """Our sampling loop: (B, T) left-padded prompts, (B, T) mask, (B, A) uniforms → (B, A') new ids, A' ≤ A.

    One prefill forward, then one forward per token. Positions count from each row's first real
    token (as HF generate counts them), so left padding shifts nothing. A row that has emitted
    EOS continues with padding; the loop stops once every row has, or after A tokens.
    """
    batch, steps = input_ids.shape[0], uniforms.shape[1]
    if steps == 0:
        return input_ids.new_zeros((batch, 0))
    device = input_ids.device
    uniforms = uniforms.to(device)
    # Keys that may be attended: the prompt's real tokens, then every new token.
    valid = torch.cat([attention_mask.bool(), attention_mask.new_ones((batch, steps), dtype=torch.bool)], 1)
    lm = llama_family(model)
    forward = llama_forward(lm, valid) if lm is not None else model_forward(model, valid)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)  # (B, T)
    logits = forward(input_ids, positions)  # (B, V)
    positions = positions[:, -1:]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    check_every = 1 if device.type == "cpu" else 8  # a GPU would stall on a host sync every token
    for t in range(steps):
        token = sample_next(logits, uniforms[:, t], cfg.temperature, cfg.top_k, cfg.top_p)  # (B,)
        token = token.masked_fill_(done, pad_token_id)
        tokens.append(token)
        if eos_token_id is not None:
            done |= token == eos_token_id
        if t == steps - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        positions = positions + 1
        logits = forward(token[:, None], positions)
    return torch.stack(tokens, 1)


class _InverseCDF:
    """HF logits processor that leaves only our inverse-CDF sample finite, so greedy decoding picks it."""

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, cfg: GenerationConfig):
        self.uniforms, self.prompt_width, self.cfg = uniforms, prompt_width, cfg

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_width
        token = sample_next(scores, self.uniforms[:, t], self.cfg.temperature, self.cfg.top_k, self.cfg.top_p)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


@torch.inference_mode()
def decode_hf(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms: torch.Tensor,
              cfg: GenerationConfig, eos_token_id: int | None, pad_token_id: int) -> torch.Tensor:
    """``decode`` through ``model.generate``: same arguments, same tokens up to float rounding."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    hf_cfg = HFGenerationConfig(max_new_tokens=uniforms.shape[1], do_sample=False, pad_token_id=pad_token_id,
                                eos_token_id=eos_token_id)
    processors = None
    if cfg.temperature > 0:
        processors = LogitsProcessorList([_InverseCDF(uniforms.to(input_ids.device), input_ids.shape[1], cfg)])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=hf_cfg,
                         logits_processor=processors)
    return out[:, input_ids.shape[1]:]


def resolve_backend(model, backend: str) -> str:
    """``auto`` → ``loop`` for the architectures it is tested on, else ``hf``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "loop" if getattr(model.config, "model_type", None) in LOOP_ARCHS else "hf"


def sample_prompts(model, tokenizer, prompts: list, seeds: list[int], cfg: GenerationConfig, backend: str = "auto",
                   progress: bool = False) -> Generations:
    """One completion per prompt, prompt i sampled with ``seeds[i]``, ``cfg.batch_size`` prompts at a time."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    run = decode if resolve_backend(model, backend) == "loop" else decode_hf
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    result = Generations([], [], [], [])
    batches = range(0, len(prompts), cfg.batch_size)
    if progress:
        from rlhfkit.progress import progress as bar

        batches = bar(batches, "generate")
    try:
        for start in batches:
            prompt_ids = [encode_prompt(tokenizer, p) for p in prompts[start: start + cfg.batch_size]]
            input_ids = pad_batch(prompt_ids, pad, side="left").to(device)
            attention_mask = pad_batch([[1] * len(p) for p in prompt_ids], 0, side="left").to(device)
            uniforms = row_uniforms(seeds[start: start + cfg.batch_size], cfg.max_new_tokens)
            new = run(model, input_ids, attention_mask, uniforms, cfg, eos, pad)
            for ids, row in zip(prompt_ids, new.tolist()):
                completion, has_eos = cut_at_eos(row, eos)
                result.prompt_ids.append(ids)
                result.completion_ids.append(completion)
                result.has_eos.append(has_eos)
                result.texts.append(tokenizer.decode(completion, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return result


class RolloutEngine(Protocol):
    """What trainers sample through: completions from prompts and per-prompt seeds, then new weights."""

    def generate(self, prompts: list, seeds: list[int]) -> Generations:
        """One completion per prompt; sample i depends only on prompts[i], the weights and seeds[i]."""

    def update_weights(self, model_or_state) -> None:
        """Take the policy after an optimiser step: a module, or a state dict (full, or adapter weights)."""


class HFRolloutEngine:
    """Samples with the policy module itself (Hugging Face model, CPU or GPU)."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, backend: str = "auto"):
        resolve_backend(model, backend)  # fail early on an unknown name
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend

    def generate(self, prompts: list, seeds: list[int]) -> Generations:
        return sample_prompts(self.model, self.tokenizer, prompts, seeds, self.cfg, self.backend)

    def update_weights(self, model_or_state) -> None:
        """The policy module itself: nothing to do (it is shared). Another module: sample with it.
        A state dict (this module's key names; a LoRA-only one is fine): copied into the module."""
        if isinstance(model_or_state, torch.nn.Module):
            self.model = model_or_state
            return
        unexpected = self.model.load_state_dict(model_or_state, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"weights for parameters the policy does not have: {unexpected[:5]}")
