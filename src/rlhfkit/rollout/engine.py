"""Rollout engines: what samples completions for the trainers (issues #9 and #10).

A ``RolloutEngine`` takes prompts and one seed per prompt and returns ``Generations``; after
each policy update it receives the new weights. ``HFRolloutEngine`` samples with the policy
module itself, on CPU or GPU, with one of two backends that draw the same tokens:

- ``loop`` (ours): one forward per token with a KV cache, explicit positions for left padding
  and none of ``model.generate``'s per-token machinery. Llama-family models (llama, qwen2, qwen3,
  mistral) run their decoder layers here with our attention over a preallocated KV buffer
  (``KVBuffer``) and their linear layers as ``F.linear`` / ``torch.mm`` on weights taken once per
  call, LoRA adapters merged into a copy (``linear_weights``), q/k/v and gate/up stacked into one
  matrix each for the decoding steps (``linear_op``); rows that repeat a prompt (GRPO, RLOO) share
  one prefill (``decode``). Other tested architectures (phi3, gemma, gpt2, gpt_neox) call the model's own
  forward with a ``DynamicCache``.
- ``hf``: ``model.generate`` with our sampling rule as a logits processor, for architectures the
  loop is not tested on.

A vLLM engine would implement the same two methods (``generate`` from prompts and seeds,
``update_weights`` loading new weights or a LoRA adapter) without touching trainers.
Shapes: B rows, T prompt width, A new tokens, V vocabulary, H heads, D head size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from rlhfkit import fsdp, zero
from rlhfkit.config import GenerationConfig
from rlhfkit.data.collate import encode_prompt, pad_batch
from rlhfkit.ops import cache_keyword, distinct_rows, has_hooks
from rlhfkit.rollout.sampling import row_uniforms, sample_next

# Architectures the loop is checked on token for token against HF generate; others use "hf".
LOOP_ARCHS = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gpt2", "gpt_neox"})
BACKENDS = ("auto", "loop", "hf")


@dataclass
class Generations:
    """Sampled completions: ids per row (EOS included when emitted) and decoded text.

    With ``logprobs`` asked for, ``logprobs[i][t]`` is the log-probability the sampling model gave
    completion token t of row i (at ``logprob_temperature``, before top-k / top-p) and
    ``entropy[i][t]`` the entropy of that distribution; otherwise both are None.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    has_eos: list[bool]
    logprobs: list[list[float]] | None = None
    entropy: list[list[float]] | None = None


def as_ids(eos_token_id: int | list[int] | None) -> list[int]:
    """One stop id, several, or none, as a list."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def stop_ids(model, tokenizer) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS and those the model's generation config lists (an
    instruct model's end-of-turn token, Llama 3's <|eot_id|> or Phi-3's <|end|>, is often not the tokenizer's
    EOS; ``model.generate`` stops at either)."""
    config = getattr(model, "generation_config", None)
    extra = as_ids(getattr(config, "eos_token_id", None))
    return list(dict.fromkeys(as_ids(tokenizer.eos_token_id) + extra))


def cut_at_eos(ids: list[int], eos_token_id: int | list[int] | None) -> tuple[list[int], bool]:
    """Ids up to and including the first stop id (``eos_token_id``: one or several), and whether there was one."""
    stops = set(as_ids(eos_token_id))
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1], True
    return ids, False


def end_of_turn(tokenizer) -> int | None:
    """The added token a chat template writes right after an assistant's reply (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``; Llama-2's ``</s>``), or None: no template, or none there."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "REPLY"}], tokenize=False)
    except Exception:  # a template that wants other roles or content: no end of turn known
        return None
    if not isinstance(text, str) or "REPLY" not in text:
        return None
    added = set(tokenizer.added_tokens_decoder)
    tail = tokenizer(text[text.rindex("REPLY") + len("REPLY"):], add_special_tokens=False).input_ids
    return next((t for t in tail if t in added), None)


def completion_text(tokenizer, prompt_ids: list[int], completion: list[int], end: int | None = None) -> str:
    """A completion's text as it reads after its prompt, up to the chat template's end of turn ``end``
    (``end_of_turn``; ``sample_prompts`` stops there, and ids sampled past it, the template's newline after
    ``<|im_end|>``, are not the reply: a reward model would template them again), special
    tokens left out: decoded with the prompt's end, less that end's own text, when that is how the whole begins;
    else decoded alone. A SentencePiece tokenizer of the Llama-2 kind drops the leading space of a text decoded
    alone ('▁The' reads 'The'), which the completion has after the prompt; ``collate.completion_ids`` reads it
    back to the same ids."""
    if end is not None and end in completion:
        completion = completion[: completion.index(end)]
    context = prompt_ids[-16:]  # the prompt's end is context enough (a whole long prompt cost 0.7 ms a row)
    before = tokenizer.decode(context, skip_special_tokens=True)
    whole = tokenizer.decode(context + completion, skip_special_tokens=True)
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(completion, skip_special_tokens=True)


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

    def select_rows(self, index: torch.Tensor) -> None:
        """Row i becomes row ``index[i]`` (B',) of what is cached: rows can be repeated, the batch can grow."""
        self.keys = [None if k is None else k.index_select(0, index) for k in self.keys]
        self.values = [None if v is None else v.index_select(0, index) for v in self.values]


def llama_family(model):
    """The HF causal LM whose decoder layers ``decode`` runs itself, or None.

    Llama, Qwen2, Qwen3 and Mistral with SDPA attention and no sliding window share one layer:
    RMSNorm → q/k/v projections (Qwen3: each head's queries and keys normalised) → rotary → attention → o
    projection, RMSNorm → MLP. A peft model is unwrapped; its LoRA layers stay in place (``linear_weights``
    reads them).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if (config.model_type in ("llama", "qwen2", "qwen3", "mistral") and config._attn_implementation == "sdpa"
            and all(t == "full_attention" for t in layer_types) and getattr(config, "sliding_window", None) is None):
        return lm
    return None


def rope_tables(rotary: torch.nn.Module, width: int, like: torch.Tensor) -> torch.Tensor | None:
    """(width, 2D) cos and sign-folded sin of positions 0 .. width − 1, from the model's rotary module, or None.

    Computed once per ``decode`` call and looked up per step (positions index rows); each entry is
    what the module gives for that position alone, since its angles are position × frequency, one
    product each. The sin half is folded with rotate-half's sign (``rotate``). None for the rope
    types whose frequencies change with the longest position seen so far (dynamic NTK, longrope):
    those call the module every step, as HF does.
    """
    rope_type = getattr(rotary, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope" or has_hooks(rotary):
        return None
    positions = torch.arange(width, device=like.device)[None]  # (1, width)
    cos, sin = (t[0] for t in rotary(like, position_ids=positions))  # (width, D)
    return torch.cat([cos, fold_sign(sin)], -1)


def fold_sign(sin: torch.Tensor) -> torch.Tensor:
    """(…, D) sin → (…, D) with its first half negated: rotate-half's minus moved onto the table."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (…, D) ``x`` (HF's convention: halves, not pairs), broadcast against cos / signed sin.

    HF computes x · cos + cat(−x₂, x₁) · sin; cat(x₂, x₁) is ``x.roll(half)``, and the minus sits in
    ``signed_sin`` (``fold_sign``), so this is the same products and sum, bit for bit, in four operators.
    """
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def linear_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The (out, in) weight and (out,) bias with which ``F.linear`` computes ``module(x)``, or None.

    A plain ``nn.Linear``: its own tensors. A peft LoRA ``Linear`` over one, with one active adapter:
    W + scaling · B A (and b + scaling · b_B with a LoRA bias) as new tensors; the module is left as
    it is, so the reference (the same base, adapters off) stays bit-exact. Adapters disabled, already
    merged into W, or none of the active ones on this layer: the base tensors. None, meaning "call the
    module", for hooks on it and what ``models.lora.plain_lora`` does not reproduce (DoRA and the other
    variants, several active adapters, dropout in training mode, ...) and other tuner types.
    The weights change after every optimiser step: take them anew for each ``decode``.
    """
    if type(module) is torch.nn.Linear:
        return None if has_hooks(module) else (module.weight, module.bias)
    if not type(module).__module__.startswith(("peft.", "rlhfkit.")) or has_hooks(module):
        return None
    from rlhfkit.models.lora import plain_lora

    parts = plain_lora(module)
    if parts is None:
        return None
    base, lora = parts
    if lora is None:
        return base.weight, base.bias
    lora_a, lora_b, scaling = lora
    # (out, r) @ (r, in): the same product peft's merge adds (get_delta_weight), into a new tensor
    weight = torch.addmm(base.weight, lora_b.weight, lora_a.weight, alpha=scaling)
    bias = base.bias
    if lora_b.bias is not None:  # lora_bias=True: B's bias is scaled with B (peft: lora_B(lora_A(x)) * scaling)
        bias = scaling * lora_b.bias if bias is None else bias + scaling * lora_b.bias
    return weight, bias


def linear_op(modules: list[torch.nn.Module], merge: bool = True,
              decode: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Linear layers reading one input as one callable: (N, in) x → (N, Σ out) cat([m(x) for m in modules], −1).

    With ``merge`` and weights for every module (``linear_weights``), two layouts:

    - prefill (``decode=False``): ``F.linear`` on each module's (out, in) weight, the modules' own
      arithmetic. At prompt shapes (tens of rows and more) a row's output has the same bits however
      many rows there are (checked in the tests), which group prefill sharing (``decode``) relies on.
    - decode (``decode=True``): one ``torch.mm`` on the weights stacked by output and transposed into
      one contiguous (in, Σ out) copy, made here, once per ``decode`` call. At a few rows a token MKL
      multiplies a contiguous right operand about 1.5–2× faster than ``F.linear``'s transposed view
      (8 × 512 @ 512 × 4096: 0.78 vs 1.07 ms), and q/k/v (gate/up) cost one operator instead of three
      (two). The same dot products summed in another order: equal to the module's output up to float
      rounding, not bit for bit, as ``model.generate`` at another batch size is.

    The decode layout is for CPUs only: it holds a second copy of every weight, and GPU GEMMs read a transposed
    operand natively (on a GPU the steps use the prefill's layout). Not measured on a GPU here.

    Otherwise (``merge=False``, hooks, DoRA, …) each module is called and the outputs concatenated.
    """
    found = [linear_weights(m) for m in modules] if merge else [None] * len(modules)
    decode = decode and all(f is not None and f[0].device.type == "cpu" for f in found)
    if any(f is None for f in found) or not decode:
        ops = [m if f is None else partial(F.linear, weight=f[0], bias=f[1]) for m, f in zip(modules, found)]
        return ops[0] if len(ops) == 1 else lambda x: torch.cat([op(x) for op in ops], -1)
    weight = found[0][0] if len(found) == 1 else torch.cat([w for w, _ in found])  # (Σ out, in)
    bias = None
    if any(b is not None for _, b in found):  # qwen2: q/k/v have biases; a module without one adds zeros
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in found])
    # cat, then transpose: a transposing copy into a strided destination (cat of .t() views) is ~5× slower
    weight_t = weight.t().contiguous()  # (in, Σ out)
    if bias is None:
        return lambda x: torch.mm(x, weight_t)
    return lambda x: torch.addmm(bias, x, weight_t)


def mlp_op(mlp: torch.nn.Module, merge: bool, decode: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gated MLP of llama / qwen2 / mistral, down(act(gate(x)) · up(x)), gate and up as one ``linear_op``."""
    if not merge or type(mlp).__name__ not in ("LlamaMLP", "Qwen2MLP", "MistralMLP") or has_hooks(mlp):
        return mlp
    gate_up = linear_op([mlp.gate_proj, mlp.up_proj], merge, decode)
    down = linear_op([mlp.down_proj], merge, decode)
    act = mlp.act_fn
    if type(act).__name__ in ("SiLU", "SiLUActivation") and not has_hooks(act):
        act = F.silu  # what the module's forward calls, without the module call
    width = mlp.gate_proj.out_features

    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up(x).split(width, -1)  # (N, I) each
        return down(act(gate) * up)

    return forward


def norm_op(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A llama-family RMSNorm as one ``F.rms_norm`` (float32: the module's arithmetic bit for bit), else the module.

    The module runs six operators (cast, pow, mean, add, rsqrt, two multiplies); in other dtypes it
    normalises in float32 and casts back, which ``F.rms_norm`` does not promise, so those call it.
    """
    if (type(norm).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm") or has_hooks(norm)
            or norm.weight.dtype != torch.float32):
        return norm
    weight, eps = norm.weight, norm.variance_epsilon
    return lambda x: F.rms_norm(x, weight.shape, weight, eps)


class LlamaForward:
    """A forward: (B, q) ids, (B, q) positions → (B, V) logits at the last position, for a llama-family ``lm``.

    The first call is the prefill (q = prompt width), each later one a decoding step (q = 1). The
    layer arithmetic is the HF modules' (norms, MLP activation and rotary tables come from the
    modules, so rope scaling applies); what is ours: the attention over a ``KVBuffer`` with additive
    masks cut from ``valid`` (B, T + A), the keys that may be attended; the rotary cos / sin looked
    up per position in a table made once (``rope_tables``); and, with ``merge``, the linear layers as
    ``F.linear`` / ``torch.mm`` on weights taken here (``linear_op``: per module for the prefill, stacked
    and transposed once for the steps). An unmerged LoRA layer costs five operators a token (base, A,
    B, scale, add) where a merged one costs one, and at small sizes the rollout is bound by operator
    calls, not arithmetic. ``merge=False`` calls every linear as a module. None of the HF forward's
    per-call mask building, cache bookkeeping and output records runs here.
    """

    def __init__(self, lm, valid: torch.Tensor, merge: bool = True):
        self.base, self.merge, self.valid = lm.model, merge, valid
        self.kv = KVBuffer(len(self.base.layers), valid.shape[1])
        self.heads, self.kv_heads = lm.config.num_attention_heads, lm.config.num_key_value_heads
        self.lm_head = lm.lm_head
        weight = self.base.embed_tokens.weight
        # 0 where a key may be attended, −inf where not: SDPA builds this from a boolean mask on every call
        self.step_mask = torch.zeros(valid.shape, dtype=weight.dtype, device=valid.device).masked_fill_(
            ~valid, float("-inf"))[:, None, None]  # (B, 1, 1, T + A)
        self.tables = rope_tables(self.base.rotary_emb, valid.shape[1], weight)
        self.norms = [(norm_op(layer.input_layernorm), norm_op(layer.post_attention_layernorm))
                      for layer in self.base.layers]
        # Qwen3: each head's queries and keys normalised (over D) before the rotary; None elsewhere
        self.qk_norms = [(norm_op(layer.self_attn.q_norm), norm_op(layer.self_attn.k_norm))
                         if hasattr(layer.self_attn, "q_norm") else None for layer in self.base.layers]
        self.final_norm = norm_op(self.base.norm)
        self.decoding = False
        self.layers, self.head = self.linears(decode=False)

    def linears(self, decode: bool):
        """Per layer (qkv, o projection, MLP), and the head, in the prefill or the decode layout (``linear_op``).

        Built anew for each ``decode`` call: the optimiser changes the weights (and LoRA adapters)
        between rollouts. The prefill's are dropped when the decode's are made, so a LoRA actor holds
        one merged copy at a time.
        """
        layers = [(linear_op([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], self.merge,
                             decode),
                   linear_op([layer.self_attn.o_proj], self.merge, decode), mlp_op(layer.mlp, self.merge, decode))
                  for layer in self.base.layers]
        return layers, linear_op([self.lm_head], self.merge, decode)

    def rope(self, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, q) positions → (B, 1, q, D) cos and sign-folded sin."""
        if self.tables is None:
            cos, sin = self.base.rotary_emb(hidden, position_ids=positions)
            return cos[:, None], fold_sign(sin)[:, None]
        return F.embedding(positions, self.tables)[:, None].chunk(2, -1)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, q) ids at (B, q) positions → (B, V) logits.

        ``rows`` (B',), for a prefill shared by repeated prompts: after the layers, row i of the batch
        becomes a copy of row ``rows[i]`` (its KV cache, masks and last hidden state), and the head runs
        on the B' rows, as it would have without sharing; the logits are (B', V) and later calls take B' rows.
        """
        b, q = ids.shape
        kv, heads, kv_heads = self.kv, self.heads, self.kv_heads
        if kv.length == 0:  # prefill: causal over the prompt, pads hidden; a pad query sees itself (no empty row)
            causal = torch.ones((q, q), dtype=torch.bool, device=ids.device).tril()
            allowed = ((causal & self.valid[:, None, :q]) | torch.eye(q, dtype=torch.bool, device=ids.device))[:, None]
            mask = torch.zeros(allowed.shape, dtype=self.step_mask.dtype, device=ids.device).masked_fill_(
                ~allowed, float("-inf"))  # (B, 1, q, q)
        else:
            if not self.decoding:  # the first step: the prefill's weights give way to the decode layout
                self.layers = self.head = None
                self.layers, self.head = self.linears(decode=True)
                self.decoding = True
            mask = self.step_mask[..., : kv.length + q]  # (B, 1, 1, length + q)
        group = heads // kv_heads
        if group > 1 and q > 1:
            mask = mask.repeat(1, 1, group, 1)  # (B, 1, G q, length + q): each query head's rows see the same keys
        hidden = self.base.embed_tokens(ids)  # (B, q, C)
        cos, sin = self.rope(positions, hidden)  # (B, 1, q, D)
        hidden = hidden.view(b * q, -1)  # (B q, C): the linears multiply 2-D operands
        for i, (layer, (qkv_proj, o_proj, mlp), (attn_norm, mlp_norm), qk_norms) in enumerate(
                zip(self.base.layers, self.layers, self.norms, self.qk_norms)):
            attn = layer.self_attn
            qkv = qkv_proj(attn_norm(hidden)).view(b, q, -1, attn.head_dim)  # (B, q, H + 2 H_kv, D)
            if qk_norms is not None:  # as Qwen3's attention: on (B, q, heads, D), before the transpose
                qkv = torch.cat([qk_norms[0](qkv[:, :, :heads]), qk_norms[1](qkv[:, :, heads: heads + kv_heads]),
                                 qkv[:, :, heads + kv_heads:]], 2)
            qkv = qkv.transpose(1, 2)  # (B, H + 2 H_kv, q, D)
            qk = rotate(qkv[:, : heads + kv_heads], cos, sin)  # queries and keys, rotated together
            key, value = kv.update(qk[:, heads:], qkv[:, heads + kv_heads:], i)  # (B, H_kv, length + q, D)
            # grouped-query attention: the G = H / H_kv query heads of a key/value head as G·q rows of one
            # head (heads are grouped consecutively), so no kernel repeats K and V (on CUDA, SDPA's enable_gqa
            # with a mask falls back to its math kernel)
            query = qk[:, :heads].reshape(b, kv_heads, group * q, -1)  # (B, H_kv, G q, D)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scaling
                                                 ).view(b, heads, q, -1)  # (B, H, q, D)
            hidden = hidden + o_proj(out.transpose(1, 2).reshape(b * q, -1))
            hidden = hidden + mlp(mlp_norm(hidden))
        kv.length += q
        last = hidden.view(b, q, -1)[:, -1]  # (B, C)
        if rows is not None:
            kv.select_rows(rows)
            self.valid, self.step_mask, last = self.valid[rows], self.step_mask[rows], last[rows]
        return self.head(self.final_norm(last))


def model_forward(model, valid: torch.Tensor):
    """The same contract through the model's own forward and a ``DynamicCache`` (any HF decoder)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    mask, keyword = valid.long(), cache_keyword(model)

    def forward(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        seen = cache.get_seq_length() + ids.shape[1]
        out = model(input_ids=ids, attention_mask=mask[:, :seen], position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{keyword: cache})
        return out.logits[:, -1]

    return forward


def token_scores(logits: torch.Tensor, token: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits, (B,) sampled tokens → (B,) log-probability of each token under softmax(logits /
    temperature) and (B,) entropy of that distribution: what a scoring forward would give them."""
    # -inf logits (a token a processor ruled out) at the lowest finite value: p is 0 either way, and 0 · -inf is NaN
    logits = (logits.float() / temperature).clamp(min=torch.finfo(torch.float32).min)  # clamped after dividing
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, token[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def stack_scores(scores: list[tuple[torch.Tensor, torch.Tensor]], new: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-step ``token_scores`` → (B, A') log-probs and (B, A') entropies, A' = ``new.shape[1]``
    (zeros when no step ran)."""
    if not scores:
        empty = new.new_zeros(new.shape, dtype=torch.float)
        return empty, empty.clone()
    logprobs, entropy = (torch.stack(column, 1) for column in zip(*scores))
    return logprobs, entropy


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms: torch.Tensor,
           cfg: GenerationConfig, eos_token_id: int | list[int] | None, pad_token_id: int, share: bool = True,
           with_logprobs: bool = False):
    """Our sampling loop: (B, T) left-padded prompts, (B, T) mask, (B, A) uniforms → (B, A') new ids, A' ≤ A.
    ``eos_token_id``: the id, or ids (``stop_ids``), that end a row.

    ``with_logprobs``: also (B, A') log-probs and entropies of the sampled tokens (``token_scores``),
    taken from the logits the loop samples from — the old log-probs of PPO without a scoring pass.

    One prefill forward, then one forward per token. Positions count from each row's first real
    token (as HF generate counts them), so left padding shifts nothing. A row that has emitted
    EOS continues with padding; the loop stops once every row has, or after A tokens.

    With ``share`` (llama family), rows with the same prompt share one prefill. The rows then
    sample what an unshared prefill samples: the layers' prefill matmuls give each row the same
    bits whatever the number of rows at prompt shapes (``linear_op``), and the head and every step
    run on all B rows as unshared. (MKL picks its kernel by shape, so this is what the tests and
    the benchmark shapes check, not a promise for every shape: a different kernel would differ in
    float rounding, as a batch of another size does.)
    """
    batch, steps = input_ids.shape[0], uniforms.shape[1]
    if steps == 0:
        empty = input_ids.new_zeros((batch, 0))
        return (empty, *stack_scores([], empty)) if with_logprobs else empty
    device = input_ids.device
    uniforms = uniforms.to(device)
    # Keys that may be attended: the prompt's real tokens, then every new token.
    valid = torch.cat([attention_mask.bool(), attention_mask.new_ones((batch, steps), dtype=torch.bool)], 1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)  # (B, T)
    lm = llama_family(model)
    first, inverse = distinct_rows(input_ids, attention_mask) if share and lm is not None else (None, None)
    if first is not None and len(first) < batch:
        # Group prefill sharing: GRPO and RLOO send each prompt G times (rows i·G .. i·G + G − 1, seeds
        # differ), and the prefill costs about what all the decoding does at our sizes. Run it once per
        # distinct prompt, then copy its KV cache to every row of the prompt (``LlamaForward``'s ``rows``).
        forward = LlamaForward(lm, valid[first])
        logits = forward(input_ids[first], positions[first], rows=inverse)  # (B, V)
    else:
        forward = LlamaForward(lm, valid) if lm is not None else model_forward(model, valid)
        logits = forward(input_ids, positions)  # (B, V)
    positions = positions[:, -1:]
    stops = torch.tensor(as_ids(eos_token_id), dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, scores = [], []
    check_every = 1 if device.type == "cpu" else 8  # a GPU would stall on a host sync every token
    for t in range(steps):
        token = sample_next(logits, uniforms[:, t], cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p)  # (B,)
        token = token.masked_fill_(done, pad_token_id)
        tokens.append(token)
        if with_logprobs:
            scores.append(token_scores(logits, token, cfg.logprob_temperature))
        if len(stops):
            done |= torch.isin(token, stops)
        if t == steps - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        positions = positions + 1
        logits = forward(token[:, None], positions)
    new = torch.stack(tokens, 1)
    return (new, *stack_scores(scores, new)) if with_logprobs else new


class _InverseCDF:
    """HF logits processor that leaves only our inverse-CDF sample finite, so greedy decoding picks it."""

    def __init__(self, uniforms: torch.Tensor, prompt_width: int, cfg: GenerationConfig, record: bool = False):
        self.uniforms, self.prompt_width, self.cfg = uniforms, prompt_width, cfg
        self.scores: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if record else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_width
        token = sample_next(scores, self.uniforms[:, t], self.cfg.temperature, self.cfg.top_k, self.cfg.top_p,
                            self.cfg.min_p)
        if self.scores is not None:
            self.scores.append(token_scores(scores, token, self.cfg.logprob_temperature))
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


@contextlib.contextmanager
def neutral_generation_config(model) -> Iterator[None]:
    """``model``'s own generation config set aside inside: ``generate`` fills what a config passed to it leaves
    unset from the model's (a repetition penalty, suppressed tokens, a minimum length, as instruct models ship
    them), which would change the distribution our sampler draws from and records log-probs of."""
    from transformers import GenerationConfig as HFGenerationConfig

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = lm.generation_config
    lm.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        lm.generation_config = saved


@torch.inference_mode()
def decode_hf(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms: torch.Tensor,
              cfg: GenerationConfig, eos_token_id: int | list[int] | None, pad_token_id: int,
              with_logprobs: bool = False):
    """``decode`` through ``model.generate``: same arguments, same tokens up to float rounding. Only our
    sampling rule shapes the distribution: none of the processors the model's generation config asks for."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LogitsProcessorList

    if uniforms.shape[1] == 0:  # generate refuses max_new_tokens 0
        return decode(model, input_ids, attention_mask, uniforms, cfg, eos_token_id, pad_token_id,
                      with_logprobs=with_logprobs)
    stops = as_ids(eos_token_id)
    hf_cfg = HFGenerationConfig(max_new_tokens=uniforms.shape[1], do_sample=False, pad_token_id=pad_token_id,
                                eos_token_id=stops or None)
    processors = None
    if cfg.temperature > 0 or with_logprobs:
        sampler = _InverseCDF(uniforms.to(input_ids.device), input_ids.shape[1], cfg, record=with_logprobs)
        processors = LogitsProcessorList([sampler])
    # each process decodes alone: a sharded policy samples gathered (``fsdp.gathered``), so nothing is synced per
    # token (generate would, seeing FSDP, and hang a process-0 evaluation)
    with neutral_generation_config(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=hf_cfg,
                             logits_processor=processors, synced_gpus=False)
    new = out[:, input_ids.shape[1]:]
    # the steps generate ran, one per column of new (A' ≤ A; none with A = 0)
    return (new, *stack_scores(sampler.scores, new)) if with_logprobs else new


def resolve_backend(model, backend: str) -> str:
    """``auto`` → ``loop`` for the architectures it is tested on, else ``hf``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "loop" if getattr(model.config, "model_type", None) in LOOP_ARCHS else "hf"


def sample_prompts(model, tokenizer, prompts: list, seeds: list[int], cfg: GenerationConfig, backend: str = "auto",
                   progress: bool = False, logprobs: bool = False) -> Generations:
    """One completion per prompt, prompt i sampled with ``seeds[i]``, ``cfg.batch_size`` prompts at a time.
    A row stops at a stop id (``stop_ids``) and, after chat messages, at the chat template's end of turn
    (``end_of_turn``): a base model whose EOS is not the template's (Qwen2's <|endoftext|> after <|im_end|>)
    would run on past the reply, sampling tokens that are not scored and cost only KL. Chat and plain prompts
    in one call are sampled apart (a plain row does not stop there, whatever its batch).

    ``logprobs``: also each completion token's log-prob and entropy under the sampling model."""
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
    chat = [not isinstance(p, str) for p in prompts]
    if any(chat) and not all(chat):  # each kind apart: only a chat row stops at the end of turn, whatever its batch
        kinds = [[i for i, c in enumerate(chat) if c is kind] for kind in (True, False)]
        parts = [sample_prompts(model, tokenizer, [prompts[i] for i in rows], [seeds[i] for i in rows], cfg, backend,
                                progress, logprobs) for rows in kinds]
        order = {i: (k, j) for k, rows in enumerate(kinds) for j, i in enumerate(rows)}
        return Generations(**{f.name: None if getattr(parts[0], f.name) is None else
                              [getattr(parts[order[i][0]], f.name)[order[i][1]] for i in range(len(prompts))]
                              for f in fields(Generations)})
    run = decode if resolve_backend(model, backend) == "loop" else decode_hf
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id
    end = end_of_turn(tokenizer) if any(chat) else None  # chat prompts (all of them, here): their texts end there
    if end is not None:  # after chat prompts a reply ends at the template's end of turn, whatever the EOS
        eos = list(dict.fromkeys([*eos, end]))
    result = Generations([], [], [], [], [] if logprobs else None, [] if logprobs else None)
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
            new = run(model, input_ids, attention_mask, uniforms, cfg, eos, pad, with_logprobs=logprobs)
            new, logps, entropy = new if logprobs else (new, None, None)
            for i, (ids, row) in enumerate(zip(prompt_ids, new.tolist())):
                completion, has_eos = cut_at_eos(row, eos)
                result.prompt_ids.append(ids)
                result.completion_ids.append(completion)
                result.has_eos.append(has_eos)
                result.texts.append(completion_text(tokenizer, ids, completion, end))
                if logprobs:
                    result.logprobs.append(logps[i, : len(completion)].tolist())
                    result.entropy.append(entropy[i, : len(completion)].tolist())
    finally:
        model.train(was_training)
    return result


class RolloutEngine(Protocol):
    """What trainers sample through: completions from prompts and per-prompt seeds, then new weights."""

    def generate(self, prompts: list, seeds: list[int], logprobs: bool = False) -> Generations:
        """One completion per prompt; sample i depends only on prompts[i], the weights and seeds[i].

        ``logprobs``: fill ``Generations.logprobs`` / ``entropy`` from the sampling distribution (an engine
        that cannot, or whose numbers differ from the trainer's forward, e.g. another precision, says so by
        leaving them None; trainers then recompute them)."""

    def update_weights(self, model_or_state) -> None:
        """Take the policy after an optimiser step: a module, or a state dict (full, or adapter weights)."""


class HFRolloutEngine:
    """Samples with the policy module itself (Hugging Face model, CPU or GPU)."""

    def __init__(self, model, tokenizer, cfg: GenerationConfig, backend: str = "auto"):
        resolve_backend(model, backend)  # fail early on an unknown name
        self.model, self.tokenizer, self.cfg, self.backend = model, tokenizer, cfg, backend

    def generate(self, prompts: list, seeds: list[int], logprobs: bool = False) -> Generations:
        """``logprobs`` are given for a policy computing in float32 only: there the loop's logits equal a
        training forward's up to float rounding; in half precision (bf16 weights, or float32 ones under
        autocast) they differ by more, and trainers recompute them."""
        device = next(self.model.parameters()).device
        exact = (all(p.dtype == torch.float32 for p in self.model.parameters())  # adapters: fp32 on a bf16 base
                 and not torch.is_autocast_enabled(device.type))
        # a sharded or partitioned policy samples with its full weights (every process enters)
        with fsdp.gathered(self.model), zero.gathered(self.model) as model:
            return sample_prompts(model, self.tokenizer, prompts, seeds, self.cfg, self.backend,
                                  logprobs=logprobs and exact)

    def update_weights(self, model_or_state) -> None:
        """The policy module itself: nothing to do (it is shared). Another module: sample with it.
        A state dict, copied into the module: its own key names (a LoRA-only one is fine), or, for a peft
        model, an adapter as peft saves it (``adapter_model.safetensors``: key names without the adapter's),
        loaded into the active adapter."""
        if isinstance(model_or_state, torch.nn.Module):
            self.model = model_or_state
            return
        own = self.model.state_dict().keys()
        # peft's key names leave the adapter's out (beside them, with the head adapted, the head's own weight
        # under its own name: peft's save_embedding_layers)
        if hasattr(self.model, "peft_config") and any("lora_" in k and k not in own for k in model_or_state):
            from peft import set_peft_model_state_dict

            unexpected = set_peft_model_state_dict(self.model, model_or_state,
                                                   adapter_name=self.model.active_adapter).unexpected_keys
        else:
            unexpected = self.model.load_state_dict(model_or_state, strict=False).unexpected_keys
        if unexpected:
            raise KeyError(f"weights for parameters the policy does not have: {unexpected[:5]}")
