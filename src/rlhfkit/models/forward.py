"""Forward passes every trainer shares: token log-probs of given sequences, hidden states.

Shapes: B batch, T sequence, P prompt width (left-padded), A response width
(right-padded), V vocabulary, H hidden size. Positions come from the attention mask, so
results do not depend on the padding side. Rows that begin with the same columns (a prompt
repeated: GRPO's groups, preference pairs) run those columns once (``shared_prefix_forward``).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from rlhfkit import distributed, zero
from rlhfkit.data.collate import pad_batch
from rlhfkit.fsdp import collective, run_as_forward
from rlhfkit.losses import entropy_from_logits
from rlhfkit.ops import cache_keyword, cache_of, distinct_rows, position_ids_from_mask, shifted_logprobs, token_logprobs

Entropy = Literal["none", "detached", "grad"]  # the entropies a log-prob pass also returns: none, or without or with
# their gradient

LOGITS_CHUNK_HELP = ("output-head positions computed at a time (0 = all at once): the (positions, vocabulary) "
                     "logits, their softmax and gradients held for this many, not for every completion token of the "
                     "batch; each chunk's logits made again in the backward (one more head product; what Liger's "
                     "fused cross-entropy saves on GPUs)")

ROLLOUT_LOGITS_CHUNK_HELP = ("response tokens the output head runs on at a time in the actor's and the "
                             "reference's forwards (0 = the whole response window at once, padding included): "
                             "(positions, vocabulary) logits, softmax and gradients held for this many, not for "
                             "every response column of the micro-batch; each chunk's logits made again in the "
                             "backward (one more head product)")

# config fields under which a model changes its logits after the output head (softcapping, scaling):
# such models keep the full forward, whose code applies them. Others are found by a probe (logits_after_head)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "logits_soft_cap", "lm_head_multiplier")
_PROBED = "_rlhfkit_logits_after_head"  # the probe's finding, kept on the model


def logprobs_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int | None = None,
                temperature: float = 1.0, entropy: Entropy = "none"):
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) under ``model``.

    input_ids, attention_mask (B, T) → (B, T-1); with ``keep`` = k only the last k
    predictions are returned, (B, k), and the LM head runs on those positions alone.
    ``temperature`` divides the logits, matching the distribution that was sampled.
    ``entropy`` ``grad`` / ``detached`` also returns the entropy of each of those (temperature-scaled)
    distributions, same shape, with gradient or without (a metric: no softmax-sized graph kept for it).
    """
    pieces = _shared_prefix_logits(model, input_ids, attention_mask, keep) if keep else None
    if pieces is None:
        kwargs = {"logits_to_keep": keep + 1} if keep else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask,  # no KV cache kept: one pass
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **kwargs).logits
        ids = input_ids[:, -(keep + 1):] if keep else input_ids
        pieces = [(logits[:, :-1], ids[:, 1:])]
    # each piece's (B, n) results put side by side: not its (B, n, V) logits, a copy as large as them
    lps, entropies = [], []
    for logits, targets in pieces:
        if temperature != 1.0:
            logits = logits.float() / temperature  # one rounding fewer for bf16 logits
        lps.append(token_logprobs(logits.float(), targets))
        if entropy != "none":
            entropies.append(_entropy(logits, entropy))
    lp = torch.cat(lps, 1) if len(lps) > 1 else lps[0]
    if entropy == "none":
        return lp
    return lp, torch.cat(entropies, 1) if len(entropies) > 1 else entropies[0]


def _entropy(logits: torch.Tensor, entropy: Entropy) -> torch.Tensor:
    """``entropy_from_logits``, with gradient (``grad``) or as a metric (``detached``)."""
    return entropy_from_logits(logits if entropy == "grad" else logits.detach())


def _checkpointing(module) -> bool:
    """Whether a layer of ``module`` would recompute its activations now (gradient checkpointing on, the layer in
    training mode: ``load.learn_mode``): transformers then turns its KV cache off. In eval mode (sampling, the
    rollout's no-grad passes) the cache works, checkpointing or not."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layer = next((m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)), None)
    return layer is not None and layer.gradient_checkpointing and layer.training


def shared_prefix_forward(module, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int,
                          head_kwargs: dict | None = None, tail_kwargs: dict | None = None):
    """Run ``module`` with each distinct prefix of ``width`` columns once: (head, tail, inverse) or None.

    Batches of repeated prompts (GRPO's groups, DPO's chosen and rejected rows) have rows whose
    first ``width`` columns (ids and mask) are equal, and so, under causal attention, are their
    keys, values and hidden states there. The U distinct prefixes run once (``head``, outputs
    (U, width, ...)), their KV cache is indexed out to the B rows (row b's prefix is head row
    ``inverse[b]``), and the remaining T - width columns run on top of it (``tail``, outputs
    (B, T - width, ...)). Forward and backward pay the prefix for U rows instead of B; the
    gradients of the rows sharing a prefix add up through the indexing, as they would in full.
    None when every prefix is distinct or the module cannot run on a cache here (gradient
    checkpointing turns the cache off; an architecture without ``past_key_values``): run it whole.
    """
    shares = 1 <= width < input_ids.shape[1] and not _checkpointing(module)
    if shares:
        first, inverse = distinct_rows(input_ids[:, :width], attention_mask[:, :width])
        shares = len(first) < input_ids.shape[0]
    # a sharded forward (FSDP, ZeRO-3) gathers weights from every process: all make the same forwards, so all share
    # or none does
    if collective(module) or zero.gathers_collectively(module):
        shares = distributed.all_sum([float(not shares)], input_ids.device)[0] == 0
    if not shares:
        return None
    positions = position_ids_from_mask(attention_mask)
    try:
        head = module(input_ids=input_ids[first, :width], attention_mask=attention_mask[first, :width],
                      position_ids=positions[first, :width], use_cache=True, **(head_kwargs or {}))
    except TypeError:  # no cache (or no logits_to_keep) in this architecture's forward
        return None
    cache = cache_of(head)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(inverse)  # (U, ...) → (B, ...), differentiable indexing
    tail = module(input_ids=input_ids[:, width:], attention_mask=attention_mask, position_ids=positions[:, width:],
                  use_cache=True, **{cache_keyword(module): cache}, **(tail_kwargs or {}))
    return head, tail, inverse


def _shared_prefix_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
                          ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The logits predicting the last ``keep`` tokens, the prompt columns shared (``shared_prefix_forward``), as
    (logits, targets) pieces in column order: the prefix's last position, (B, 1, V) with the first kept token,
    then the tail's, (B, keep - 1, V) with the rest. None where it does not apply."""
    out = shared_prefix_forward(model, input_ids, attention_mask, input_ids.shape[1] - keep,
                                {"logits_to_keep": 1}, {"logits_to_keep": keep})
    if out is None:
        return None
    head, tail, inverse = out[0].logits, out[1].logits, out[2]  # (U, 1, V), (B, keep, V)
    targets = input_ids[:, -keep:]
    return [(head[inverse], targets[:, :1]), (tail[:, :-1], targets[:, 1:])]


def backbone_and_head(model):
    """(the transformer body, the output head) of a causal LM, plain or peft-wrapped, or None
    where calling the head on hidden states would not reproduce the model's logits.

    Inside a peft wrapper both are the live modules: LoRA layers (a LoRA-adapted head too) stay
    active, and ``disable_adapter()`` switches them off here as in the full forward.
    """
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if backbone is None or head is None or logits_after_head(hf, backbone, head):
        return None
    return backbone, head


def logits_after_head(hf, backbone, head) -> bool:
    """Whether the causal LM ``hf`` changes its logits after its output ``head`` (a softcap, a muP multiplier):
    its config says so (``_LOGIT_TRANSFORMS``, its text config's too), or a probe finds it, the full forward
    and the head on the body's hidden states compared on four tokens once (kept on the model; ``load_causal_lm``
    probes before a model is sharded, which is never probed here). A probe that fails counts as a yes."""
    configs = [hf.config, *([hf.config.get_text_config()] if hasattr(hf.config, "get_text_config") else [])]
    if any(getattr(c, k, None) for c in configs for k in _LOGIT_TRANSFORMS):
        return True
    found = getattr(hf, _PROBED, None)
    if found is None and not (distributed.is_shard(next(hf.parameters())) or zero.partitioned(hf)):
        found = _probe(hf, backbone, head)
        setattr(hf, _PROBED, found)
    return bool(found)


def _probe(hf, backbone, head) -> bool:
    from rlhfkit.models.load import eval_mode

    weight = next(hf.parameters())
    ids = torch.arange(4, device=weight.device)[None] % max(1, getattr(hf.config, "vocab_size", 4) or 4)
    try:  # no dropout: the two passes must see the same body
        with eval_mode(hf), torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            full = hf(input_ids=ids, use_cache=False).logits.float()
            mine = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
        return not torch.allclose(full, mine, rtol=1e-3, atol=1e-3)
    except Exception:  # a body that will not run alone so: the full forward, whatever the model does
        return True


def prompt_width(completion_mask: torch.Tensor) -> int:
    """Columns before the first completion token of every row: the shortest prompt's length.

    completion_mask (B, T) → int; 0 when no row has a completion token."""
    rows = completion_mask.bool().any(-1)
    return int(completion_mask[rows].float().argmax(-1).min()) if rows.any() else 0


def backbone_hidden(backbone, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int = 0) -> torch.Tensor:
    """The body's last hidden states, (B, T, H), rows that agree on their first ``width`` columns
    running them once (``shared_prefix_forward``; rows of one prompt, such as a preference pair)."""
    shared = shared_prefix_forward(backbone, input_ids, attention_mask, width)
    if shared is None:
        return backbone(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    head, tail, inverse = shared
    return torch.cat([head.last_hidden_state[inverse], tail.last_hidden_state], 1)


def masked_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                    chunk: int = 0) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) where ``mask`` is set, 0 elsewhere.

    input_ids, attention_mask (B, T), mask (B, T-1) → (B, T-1). The body runs over every
    position, the output head and the log-softmax only over the N positions of ``mask`` (a loss
    on completion tokens pays nothing for prompt and padding positions: with vocabulary V that
    is the (N, H) x (H, V) product instead of (B T, H) x (H, V), and a (N, V) softmax). ``chunk`` > 0 runs the
    head ``chunk`` positions at a time (``_masked_head_logprobs``): (chunk, V) logits alive at once, not (N, V).
    A model whose logits are transformed after its head (softcapping) runs whole, unchunked.
    """
    parts = backbone_and_head(model)
    if parts is None:
        return logprobs_of(model, input_ids, attention_mask).masked_fill(~mask.bool(), 0.0)
    # the parts are called, not the model: under FSDP the call still counts as the model's forward
    return run_as_forward(model, _head_on_mask, *parts, input_ids, attention_mask, mask.bool(), chunk)


def _head_on_mask(backbone, head, input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                  chunk: int = 0, temperature: float = 1.0, entropy: Entropy = "none"):
    """``masked_logprobs`` from the body and the head: (B, T), (B, T), mask (B, T-1) bool → (B, T-1)
    (``_masked_head_logprobs``: with an ``entropy`` a pair)."""
    # columns up to every row's first target (the shortest prompt) may be shared by rows (DPO's pairs)
    hidden = backbone_hidden(backbone, input_ids, attention_mask, prompt_width(mask) + 1)  # (B, T, H)
    return _masked_head_logprobs(head, hidden, input_ids, mask, chunk, temperature, entropy)


def packed_logprobs(model, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                    chunk: int = 0) -> torch.Tensor:
    """``masked_logprobs`` of a packed batch (``collate.pack``): examples laid end to end in each row, told apart
    by ``position_ids`` restarting at 0, with no attention mask (``packing_works``). input_ids, position_ids
    (B, T), mask (B, T-1) → (B, T-1), 0 off the mask; the head runs on the mask's positions alone, ``chunk`` of
    them at a time when > 0."""
    _quiet_about_the_missing_attention_mask()
    parts = backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        return shifted_logprobs(logits, input_ids).masked_fill(~mask.bool(), 0.0)

    def body_and_head(backbone, head):
        hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        return _masked_head_logprobs(head, hidden, input_ids, mask.bool(), chunk)

    return run_as_forward(model, body_and_head, *parts)


def _quiet_about_the_missing_attention_mask() -> None:
    """transformers warns when ids that end in the pad token come without an attention mask, as a packed row's
    padding (or its last example's EOS, where that is the pad token) does: its packed-sequence masks need none.
    That one message is dropped from its log, no other."""
    import logging

    log = logging.getLogger("transformers.modeling_utils")
    if not any(getattr(f, "rlhfkit_packing", False) for f in log.filters):
        drop = logging.Filter()
        drop.filter = lambda record: not record.getMessage().startswith("We strongly recommend passing in an "
                                                                        "`attention_mask`")
        drop.rlhfkit_packing = True
        log.addFilter(drop)


@torch.no_grad()
def packing_works(model) -> bool:
    """Whether ``model`` (a causal LM, or a reward model's body) keeps examples packed in rows apart
    (``packed_logprobs``, ``reward.packed_sequence_scores``): the logits (a body's hidden states) of 4 tokens alone and
    after 5 others in the first of two packed rows, positions restarting, agree (transformers builds block-diagonal
    masks from such positions for sdpa and eager attention; its flash attention reads them from one row only, and
    a model that ignores them would let an example read the one before). One tiny forward of each, in eval mode,
    the mode restored."""
    _quiet_about_the_missing_attention_mask()
    device = next(model.parameters()).device
    ids = torch.randint(0, min(model.get_input_embeddings().num_embeddings, 1000), (2, 9),
                        generator=torch.Generator().manual_seed(0)).to(device)
    training = model.training
    model.eval()
    try:
        alone = _per_position(model(input_ids=ids[:1, 5:], use_cache=False))
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2, 3, 4, 5]], device=device)
        packed = _per_position(model(input_ids=ids, position_ids=positions, use_cache=False))[:1, 5:]
    finally:
        model.train(training)
    return bool(((packed - alone).abs().max() <= 1e-3 + 0.02 * alone.abs().max()).item())


def _per_position(output) -> torch.Tensor:
    """A causal LM's logits, or a body's (a reward model's) last hidden states: (B, T, ·) float32."""
    return (output.logits if getattr(output, "logits", None) is not None else output.last_hidden_state).float()


def check_packing(model) -> None:
    """ConfigError unless ``model`` keeps packed examples apart (``packing_works``)."""
    from rlhfkit.config import ConfigError

    if not packing_works(model):
        raise ConfigError(f"{type(model).__name__} ({model.config.model_type}, attention "
                          f"{model.config._attn_implementation}) lets a packed example attend to the one before it: "
                          "set packing false")


def _masked_head_logprobs(head, hidden: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                          chunk: int = 0, temperature: float = 1.0, entropy: Entropy = "none"):
    """log p of each next token where ``mask`` is set, the head run there alone: hidden (B, T, H), input_ids (B, T),
    mask (B, T-1) bool → (B, T-1), 0 elsewhere. ``temperature`` divides the logits; ``entropy`` ``grad`` /
    ``detached`` also returns the entropy of each of those distributions, (B, T-1), 0 elsewhere (a detached one is
    computed after the log-probs: a checkpointed chunk's recompute stops before it).

    With ``chunk`` > 0 the N positions go through the head and the log-softmax ``chunk`` at a time: without
    gradients each chunk's (chunk, V) logits are freed before the next; with them each chunk is checkpointed
    (its logits made again in the backward, one chunk at a time: one more head product), so neither pass holds
    the (N, V) logits and their softmax at once. The same log-probs and gradients up to float rounding: under an
    autocast each chunk casts the head's weights itself (no cast shared by the chunks), so their gradients are
    summed in the weights' own precision, not in bf16. Where each call of the head gathers its weights from every
    process (ZeRO-3), every process makes as many calls: the most any process needs, spare ones on no positions."""
    picked, labels = hidden[:, :-1][mask], input_ids[:, 1:][mask]  # (N, H), (N,)
    padded = chunk > 0 and zero.gathers_collectively(head)  # ZeRO-3: every process calls the head as often
    chunked, device = padded or 0 < chunk < len(labels), hidden.device.type
    uncached = (torch.autocast(device, dtype=torch.get_autocast_dtype(device), cache_enabled=False)
                if chunked and torch.is_autocast_enabled(device) else contextlib.nullcontext())

    def head_logprobs(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with uncached:
            logits = head(h).float()  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        lp = token_logprobs(logits, y)
        return (lp,) if entropy == "none" else (lp, _entropy(logits, entropy))

    if chunked:
        inputs = list(zip(picked.split(chunk), labels.split(chunk)))
        if padded:  # each call gathers the head's partitioned weights: as many calls (empty ones) everywhere
            inputs += [(picked[:0], labels[:0])] * (max(distributed.all_max(len(inputs), hidden.device), 1)
                                                    - len(inputs))
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            pieces = [checkpoint(head_logprobs, h, y, use_reentrant=False) for h, y in inputs]
        else:
            pieces = [head_logprobs(h, y) for h, y in inputs]
        columns = [torch.cat(c) for c in zip(*pieces)]
    else:
        columns = head_logprobs(picked, labels)  # (N,) each
    out = [c.new_zeros(mask.shape).masked_scatter(mask, c) for c in columns]  # (B, T-1) each
    return out[0] if entropy == "none" else tuple(out)


def join_prompt_response(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_token_id: int
                         ) -> dict[str, torch.Tensor]:
    """Prompts padded on the left and responses on the right, side by side.

    Returns ``input_ids`` and ``attention_mask`` (B, P + A) and ``action_mask`` (B, A),
    1 on response tokens. Response token j of row b sits at column P + j, so its
    log-prob is column P - 1 + j of ``logprobs_of(...)``, i.e. the last A columns.
    """
    prompts = pad_batch(prompt_ids, pad_token_id, side="left")
    prompt_mask = pad_batch([[1] * len(p) for p in prompt_ids], 0, side="left")
    responses = pad_batch([r or [pad_token_id] for r in response_ids], pad_token_id, side="right")
    action_mask = pad_batch([[1] * len(r) for r in response_ids], 0, side="right")
    if action_mask.shape[1] < responses.shape[1]:  # every response empty: keep one masked column
        action_mask = torch.zeros_like(responses)
    return {"input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": torch.cat([prompt_mask, action_mask], 1),
            "action_mask": action_mask}


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, entropy: Entropy = "none",
                      chunk: int = 0):
    """Log-probs of the response tokens of a ``join_prompt_response`` batch: (B, A), 0 where masked; with an
    ``entropy`` (``grad``: with gradient, ``detached``: without) also each one's entropy, (B, A), 0 where masked.

    ``chunk`` > 0 runs the output head on the response tokens alone, ``chunk`` of them at a time
    (``_masked_head_logprobs``: (chunk, V) logits alive at once, not (B, A, V)); a model whose logits are
    transformed after its head (softcapping) runs whole."""
    action_mask = batch["action_mask"]
    parts = backbone_and_head(model) if chunk else None
    if parts is None:
        out = logprobs_of(model, batch["input_ids"], batch["attention_mask"], keep=action_mask.shape[1],
                          temperature=temperature, entropy=entropy)
        return out * action_mask if entropy == "none" else tuple(o * action_mask for o in out)
    # response token j (column T - A + j) is predicted at column T - A - 1 + j of the (B, T-1) shifted positions
    before = batch["input_ids"].shape[1] - 1 - action_mask.shape[1]
    mask = torch.cat([action_mask.new_zeros(action_mask.shape[0], before), action_mask], 1).bool()
    out = run_as_forward(model, _head_on_mask, *parts, batch["input_ids"], batch["attention_mask"], mask, chunk,
                         temperature, entropy)
    return out[:, before:] if entropy == "none" else tuple(o[:, before:] for o in out)
