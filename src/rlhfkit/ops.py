"""Small tensor operations shared by every trainer: positions, log-probabilities, masks.

Imports only torch and the standard library. Shapes: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import inspect
import math
from statistics import mean, stdev

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left and right padding give the same logits.

    attention_mask (B, T) of 0/1 → (B, T) long; padded positions get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] at every position, without a (B, T, V) log-softmax copy.

    logits (B, T, V), labels (B, T) long → (B, T). Labels outside [0, V) must be replaced
    by the caller (they are masked out anyway).
    """
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def shifted_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each token given the ones before it.

    logits (B, T, V) from a causal LM over input_ids (B, T) → (B, T-1), entry t is
    log p(input_ids[:, t+1] | input_ids[:, :t+1]).
    """
    return token_logprobs(logits[:, :-1].float(), input_ids[:, 1:])


def sequence_logprobs(token_lp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of token log-probs over masked tokens: (B, T), (B, T) → (B,); an empty row gives 0.

    For the length-averaged form use ``rlhfkit.advantages.masked_mean(token_lp, mask, dim=-1)``.
    """
    return torch.where(mask.bool(), token_lp, 0.0).sum(-1)  # a product would keep a padded -inf or NaN


def scalar_head(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A one-output head (a value or score head) on hidden states ``hidden`` (..., H) → (..., 1). A head of
    float32 weights computes in float32, outside any autocast (under it its matmul ran in bf16, rounding every
    value and score to bf16's 3 significant digits); any other (bf16 weights, or peft's wrapper holding a bf16
    original beside its float32 trained copy) as the surrounding autocast has it, on hidden states in its dtype."""
    dtypes = {p.dtype for p in head.parameters()}
    if dtypes != {torch.float32}:
        return head(hidden.to(next(iter(dtypes))) if len(dtypes) == 1 else hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.float())


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n); 0 error for fewer than two values."""
    if not values:
        raise ValueError("no values to average")
    err = stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean(values), err


def mean_of(records: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the ``records`` that have it (one record per mini-batch, rollout, ...)."""
    keys = sorted({k for r in records for k in r})
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}


def cache_keyword(model) -> str:
    """The keyword an HF model's forward takes its KV cache by: ``cache`` (recent transformers 5 releases,
    where ``past_key_values`` is deprecated, to be removed in 5.40) or ``past_key_values`` (earlier ones)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: the HF model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def cache_of(output):
    """The KV cache an HF model's output holds (``cache``, or ``past_key_values`` in earlier releases), or None."""
    return output.cache if hasattr(output, "cache") else getattr(output, "past_key_values", None)


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (accelerate's offloading, user probes) besides its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask → (U,) the first row of each distinct row, in order of appearance, and
    (B,) each row's index into them (0 .. U − 1).

    Rows are equal when their ids and their masks are (the pad id may be a real token).
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    _, inverse = torch.unique(torch.cat([input_ids, attention_mask.to(input_ids.dtype)], 1), dim=0,
                              return_inverse=True)  # sorted: relabelled below by first appearance
    count = int(inverse.max()) + 1
    first = inverse.new_full((count,), input_ids.shape[0]).scatter_reduce(0, inverse, rows, "amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=order.device)
    return first[order], rank[inverse]
